#!/usr/bin/env python3
"""`pea serve` under load: N concurrent clients on 127.0.0.1, each sending its share of a bounded number of
txt2img requests one after another, against a server with and without dynamic batching.

For each --max-batch value (default 1,8: one image at a time, then batches of up to 8) a fresh
`pea serve --port 0` is started on --model (default: the bundled toy world, models/toyworld, 64×64), warmed up
with one request, and then --clients threads send --requests requests in all (request i: seed --seed + i, the
same prompt, size, steps and guidance, so every request can be batched with every other). Measured here, by the
client: requests/s = requests / (time from the first send to the last response); p50/p99 latency of the
requests. From the server's /metrics: the mean batch size (images / batches, the warm-up's batch excluded).
Every response must be 200 with one image; anything else fails the run. The server is stopped with SIGTERM and
must exit 0.

Writes the table to stdout and, with --results, into the "## Serving under load" section of that file
(benchmarks/RESULTS.md). Python standard library only.
"""
import argparse
import base64
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_file import write_section  # noqa: E402

HEADING = "## Serving under load"


def post(url, body, timeout=600):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.loads(response.read())


def metrics(base):
    with urllib.request.urlopen(base + "/metrics", timeout=30) as response:
        text = response.read().decode()
    batches = {int(m.group(1)): int(m.group(2)) for m in re.finditer(r'^pea_batches_total\{images="(\d+)"\} (\d+)$', text, re.M)}
    return batches


def run_one(args, max_batch):
    command = [args.pea, "serve", "--model", args.model, "--port", "0", "--max-batch", str(max_batch),
               "--max-queue", str(max(64, args.clients * 2)), "--backend", args.backend]
    if args.threads:
        command += ["--threads", str(args.threads)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        base = server.stdout.readline().strip()
        if not base.startswith("http://"):
            raise SystemExit(f"pea serve did not start: {' '.join(command)}")
        body = {"prompt": args.prompt, "steps": args.steps, "cfg_scale": args.guidance, "width": args.size, "height": args.size}
        status, _ = post(base + "/sdapi/v1/txt2img", dict(body, seed=args.seed - 1))   # warm-up
        assert status == 200
        warm = metrics(base)
        latencies = [None] * args.requests
        errors = []
        next_index = [0]
        lock = threading.Lock()

        def client():
            while True:
                with lock:
                    index = next_index[0]
                    next_index[0] += 1
                if index >= args.requests:
                    return
                start = time.perf_counter()
                try:
                    status, answer = post(base + "/sdapi/v1/txt2img", dict(body, seed=args.seed + index))
                    if status != 200 or len(answer.get("images", [])) != 1:
                        raise RuntimeError(f"status {status}")
                    base64.b64decode(answer["images"][0], validate=True)
                except Exception as error:  # noqa: BLE001 - reported below, fails the run
                    errors.append(f"request {index}: {error}")
                latencies[index] = time.perf_counter() - start

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        if errors:
            raise SystemExit("failed requests:\n" + "\n".join(errors[:10]))
        after = metrics(base)
        sizes = {size: after.get(size, 0) - warm.get(size, 0) for size in after}
        batches = sum(sizes.values())
        images = sum(size * count for size, count in sizes.items())
        ordered = sorted(latencies)

        def percentile(p):
            return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

        return {"max_batch": max_batch, "rps": args.requests / elapsed, "p50": percentile(50), "p99": percentile(99),
                "mean_batch": images / batches if batches else 0, "seconds": elapsed}
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=600)
        if code != 0:
            print(f"pea serve exited {code}", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pea", default=".build/release/pea", help="the pea binary (default: %(default)s)")
    parser.add_argument("--model", default="models/toyworld", help="pipeline folder (default: %(default)s)")
    parser.add_argument("--backend", default="auto", help="pea's --backend (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="pea's --threads (default: every online CPU)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=64, help="requests in all (default: %(default)s)")
    parser.add_argument("--max-batch", default="1,8", help="--max-batch values to compare (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default: %(default)s)")
    parser.add_argument("--size", type=int, default=64, help="width = height (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--prompt", default="a red circle")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--results", help="write the table into this file's section (e.g. benchmarks/RESULTS.md)")
    args = parser.parse_args()

    rows = [run_one(args, int(value)) for value in args.max_batch.split(",")]
    table = ["| --max-batch | requests/s | p50 latency (s) | p99 latency (s) | mean batch (images) |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        table.append(f"| {row['max_batch']} | {row['rps']:.2f} | {row['p50']:.3f} | {row['p99']:.3f} | {row['mean_batch']:.2f} |")
    print("\n".join(table))
    if args.results:
        machine = f"{platform.machine()}, {os.cpu_count()} CPUs visible"
        section = (f"{HEADING}\n\n`python3 benchmarks/serve_load.py {' '.join(sys.argv[1:])}`: {args.clients} clients, "
                   f"{args.requests} txt2img requests, model {args.model}, {args.size}×{args.size}, {args.steps} steps, "
                   f"guidance {args.guidance}, backend {args.backend} ({machine}).\n\n" + "\n".join(table) + "\n")
        write_section(args.results, HEADING, section)


if __name__ == "__main__":
    main()
