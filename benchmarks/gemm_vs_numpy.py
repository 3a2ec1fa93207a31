#!/usr/bin/env python3
"""Pea's CPU GEMM (`pea bench gemm --json`) side by side with numpy's matmul (OpenBLAS), float32.

Shapes: square 512/1024/2048 and the SD-1.5 UNet's real ones at 512×512 — the im2col GEMMs of its 3×3
convolutions (M = Cout, N = H·W, K = Cin·9) and its linear layers (x·Wᵀ: M = tokens, N = out, K = in,
B transposed). Both sides use the same thread count, a warm-up run, and the best of the same number of
timed runs (by default: as many as fit in ~1 s, at least 3). Each shape is measured in --rounds rounds
that alternate the two sides, and each side keeps its best round, so that a burst of other load on the
machine hits both sides alike rather than one of them.

numpy runs in a subprocess with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE removed from the environment (they
pin OpenBLAS to a slower kernel on some machines) and OPENBLAS_NUM_THREADS set to the thread count.

On a machine shared with other work, --realtime runs both sides under `chrt -f 10` (SCHED_FIFO; needs root
or CAP_SYS_NICE) so that other processes do not preempt the timed runs; both sides get the same treatment.

    python3 benchmarks/gemm_vs_numpy.py [--pea .build/release/pea] [--threads 2] [--repeats R]
                                        [--rounds 3] [--realtime] [--write benchmarks/RESULTS.md]
"""
import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys

from results_file import write_section

SECTION = "## CPU GEMM vs numpy (OpenBLAS)"

# (label, M, N, K, transB)
SHAPES = [
    ("square 512", 512, 512, 512, False),
    ("square 1024", 1024, 1024, 1024, False),
    ("square 2048", 2048, 2048, 2048, False),
    ("conv 320→320 @64²", 320, 4096, 2880, False),
    ("conv 640→640 @32²", 640, 1024, 5760, False),
    ("conv 1280→1280 @16²", 1280, 256, 11520, False),
    ("conv 1280→1280 @8²", 1280, 64, 11520, False),
    ("linear 320→320 (4096 tok)", 4096, 320, 320, True),
    ("linear 320→1280 (4096 tok)", 4096, 1280, 320, True),
    ("linear 1280→320 (4096 tok)", 4096, 320, 1280, True),
]

# Runs in the numpy subprocess: reads the shapes as JSON on stdin, prints one JSON result per line.
NUMPY_CHILD = r"""
import json, sys, time
import numpy as np
cfg = json.load(sys.stdin)
rng = np.random.default_rng(0)
for m, n, k, trans_b in cfg["shapes"]:
    a = rng.uniform(-1, 1, (m, k)).astype(np.float32)
    b = rng.uniform(-1, 1, (n, k) if trans_b else (k, n)).astype(np.float32)
    bop = b.T if trans_b else b
    c = np.empty((m, n), dtype=np.float32)
    np.matmul(a, bop, out=c)  # warm-up
    times, start = [], time.perf_counter()
    while True:
        t0 = time.perf_counter()
        np.matmul(a, bop, out=c)
        times.append(time.perf_counter() - t0)
        if cfg["repeats"]:
            if len(times) >= cfg["repeats"]:
                break
        elif len(times) >= 3 and time.perf_counter() - start >= 1.0:
            break
    best = min(times)
    print(json.dumps({"best_ms": best * 1e3, "gflops": 2.0 * m * n * k / best / 1e9}), flush=True)
"""


REALTIME = ["chrt", "-f", "10"]


def run_pea(pea, m, n, k, trans_b, threads, repeats, prefix):
    cmd = prefix + [pea, "bench", "gemm", "--m", str(m), "--n", str(n), "--k", str(k), "--threads", str(threads), "--json"]
    if trans_b:
        cmd.append("--transb")
    if repeats:
        cmd += ["--repeats", str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def numpy_env(threads):
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("OPENBLAS_L2_SIZE", None)
    env["OPENBLAS_NUM_THREADS"] = str(threads)
    return env


def run_numpy(m, n, k, trans_b, threads, repeats, prefix):
    cfg = json.dumps({"shapes": [[m, n, k, trans_b]], "repeats": repeats})
    out = subprocess.run(prefix + [sys.executable, "-c", NUMPY_CHILD], input=cfg, check=True, capture_output=True,
                         text=True, env=numpy_env(threads)).stdout
    return json.loads(out.strip().splitlines()[-1])


def numpy_description(threads):
    code = ("import numpy as np\n"
            "try:\n"
            "    blas = np.show_config(mode='dicts')['Build Dependencies']['blas']\n"
            "    print(f\"numpy {np.__version__}, {blas.get('name', 'blas')} {blas.get('version', '')}\")\n"
            "except Exception:\n"
            "    print(f'numpy {np.__version__}')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=numpy_env(threads))
    return out.stdout.strip() or "numpy (version unknown)"


def machine_description():
    """lscpu's model name (with family/model, since VMs often show a bare "AMD EPYC"), the online CPUs, and
    which of the GEMM's SIMD extensions the CPU reports."""
    model, extra = "unknown CPU", []
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(re.findall(r"^([^:\n]+):\s*(.*)$", out, re.M))
        model = fields.get("Model name", model).strip()
        if "CPU family" in fields and "Model" in fields:
            extra.append(f"family {fields['CPU family'].strip()} model {fields['Model'].strip()}")
        flags = set(fields.get("Flags", "").split())
        if flags:
            simd = [f for f in ("avx2", "fma", "avx512f") if f in flags]
            extra.append("SIMD: " + (", ".join(simd) if simd else "none of avx2/fma/avx512f")
                         + ("" if "avx512f" in flags else " (no AVX-512)"))
    except OSError:
        pass
    return f"{model}" + (f" ({'; '.join(extra)})" if extra else "") + f", {os.cpu_count()} online CPUs"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pea", default=".build/release/pea", help="the pea binary (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both sides (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=0,
                        help="timed runs per shape and side (default: as many as fit in ~1 s, at least 3)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds per shape; each side keeps its best (default: %(default)s)")
    parser.add_argument("--realtime", action="store_true",
                        help="run both sides under chrt -f 10 (SCHED_FIFO), for machines shared with other work")
    parser.add_argument("--write", metavar="RESULTS.md", help="record the table in this markdown file")
    args = parser.parse_args()
    if not os.path.exists(args.pea):
        sys.exit(f"gemm_vs_numpy.py: {args.pea} not found (build it with 'make' first)")
    prefix = REALTIME if args.realtime else []

    rows = []
    kernel = "?"
    header = "| shape | M×N×K | pea GFLOP/s | numpy GFLOP/s | pea / numpy |\n|---|---|---:|---:|---:|"
    print(header)
    for label, m, n, k, trans_b in SHAPES:
        pea = ref = None
        for _ in range(max(1, args.rounds)):
            p = run_pea(args.pea, m, n, k, trans_b, args.threads, args.repeats, prefix)
            r = run_numpy(m, n, k, trans_b, args.threads, args.repeats, prefix)
            pea = p if pea is None or p["gflops"] > pea["gflops"] else pea
            ref = r if ref is None or r["gflops"] > ref["gflops"] else ref
        kernel = pea["kernel"]
        dims = f"{m}×{n}×{k}" + (" (Bᵀ)" if trans_b else "")
        row = f"| {label} | {dims} | {pea['gflops']:.1f} | {ref['gflops']:.1f} | {pea['gflops'] / ref['gflops']:.2f} |"
        rows.append(row)
        print(row, flush=True)

    if args.write:
        command = "python3 " + " ".join(shlex.quote(a) for a in sys.argv)
        section = "\n".join([
            SECTION,
            "",
            f"- date: {datetime.date.today().isoformat()}",
            f"- machine: {machine_description()}; {args.threads} threads on both sides",
            f"- pea kernel: {kernel}; numpy: {numpy_description(args.threads)}",
            "- timing: one warm-up, then the best of "
            + (f"{args.repeats} runs" if args.repeats else "as many runs as fit in ~1 s (at least 3)")
            + f", best of {max(1, args.rounds)} alternating rounds per side"
            + "; GFLOP/s = 2·M·N·K / best time"
            + ("; both sides under SCHED_FIFO (chrt -f 10)" if args.realtime else ""),
            f"- command: `{command}`",
            "",
            header,
            *rows,
            "",
        ])
        write_section(args.write, SECTION, section)
        print(f"\nwrote {args.write}")


if __name__ == "__main__":
    main()
