#!/usr/bin/env python3
"""Pea's UNet (`pea bench unet --json`) side by side with diffusers' UNet2DConditionModel on PyTorch, on the CPU
(default) or on a CUDA GPU (--device cuda).

Both sides build the full-size UNet of a published config (benchmarks/configs/) with random weights in float32
(speed does not depend on the values), and time one denoiser evaluation: latent [B, C, H, W], one timestep per
sample, encoder_hidden_states [B, 77, cross_attention_dim], and for SDXL-style configs (addition_embed_type
"text_time") text_embeds [B, projection_class_embeddings_input_dim − 6·addition_time_embed_dim] and time_ids
[B, 6]. Each side gets the same thread count, one warm-up evaluation, then --repeats timed ones; the table
shows the best and the median. torch runs under torch.inference_mode() with torch.set_num_threads(T) and
diffusers' default attention (scaled_dot_product_attention).

Each side runs in its own subprocess, so its peak resident memory is its own: the ru_maxrss that os.wait4
reports for that child (weights, activations and the runtime itself: Python + torch on one side, the pea
binary on the other).

    python3 benchmarks/unet_vs_torch.py [--config benchmarks/configs/sd15_unet.json ...] [--latent 64x64]
                                        [--batch 1] [--threads 2] [--repeats 3] [--weights f32,bf16] [--pea .build/release/pea]
                                        [--python tools/reference/.venv/bin/python] [--write benchmarks/RESULTS.md]

On a GPU (--device cuda [--precision fp16] [--lib .build-cuda/libpea_cuda.so]): pea runs `--backend cuda
--precision P`, torch runs the model and inputs in that dtype on cuda:0; each evaluation is timed between two
torch.cuda.synchronize() calls (pea's between upload-free launches and the download of the output), and memory
is the device's peak: pea's caching allocator peak, torch.cuda.max_memory_allocated. Results go to the section
"CUDA UNet vs PyTorch".

--weights f32,bf16 (CPU): pea runs once per listed mode, one row each: bf16/f16 holds pea's weight matrices at
half size (`pea bench unet --weights`), computing in f32; torch stays in float32.

--config may be given several times (one table row each). The torch side needs a Python with torch and
diffusers; by default the reference venv (`make fixtures` creates it). Without a pea binary, or when
`pea bench unet` fails, the torch figures are still printed.
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

SECTION = "## CPU UNet vs PyTorch"
CUDA_SECTION = "## CUDA UNet vs PyTorch"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_PYTHON = os.path.join(ROOT, "tools", "reference", ".venv", "bin", "python")

# Runs in the torch subprocess: reads its settings as JSON on stdin, prints one JSON result on stdout.
TORCH_CHILD = r"""
import json, statistics, sys, time
cfg = json.load(sys.stdin)
import torch
import diffusers
from diffusers import UNet2DConditionModel
diffusers.utils.logging.set_verbosity_error()
torch.set_num_threads(cfg["threads"])
torch.manual_seed(0)
device = cfg.get("device", "cpu")
dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.get("precision", "fp32")]
if device == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
with open(cfg["config"]) as f:
    config = json.load(f)
t0 = time.perf_counter()
unet = UNet2DConditionModel.from_config(config).to(device=device, dtype=dtype).eval()
build_s = time.perf_counter() - t0
b, h, w = cfg["batch"], cfg["height"], cfg["width"]
cross = config["cross_attention_dim"]
cross = cross if isinstance(cross, int) else cross[0]
sample = torch.randn(b, config.get("in_channels", 4), h, w).to(device=device, dtype=dtype)
timestep = torch.full((b,), 999, dtype=torch.int64, device=device)
states = torch.randn(b, 77, cross).to(device=device, dtype=dtype)
kwargs = {}
if config.get("addition_embed_type") == "text_time":
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    size = [8 * h, 8 * w]
    kwargs["added_cond_kwargs"] = {
        "text_embeds": torch.randn(b, pooled).to(device=device, dtype=dtype),
        "time_ids": torch.tensor([size + [0, 0] + size] * b, dtype=dtype, device=device),
    }
def sync():
    if device == "cuda":
        torch.cuda.synchronize()
times = []
with torch.inference_mode():
    for i in range(1 + cfg["repeats"]):
        sync()
        t0 = time.perf_counter()
        unet(sample, timestep, encoder_hidden_states=states, **kwargs)
        sync()
        dt = time.perf_counter() - t0
        if i > 0:
            times.append(dt)
        print(f"torch: eval {i} ({'warm-up' if i == 0 else 'timed'}) {dt * 1e3:.0f} ms", file=sys.stderr, flush=True)
hwm = 0.0
with open("/proc/self/status") as f:
    for line in f:
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
print(json.dumps({
    "best_ms": min(times) * 1e3, "median_ms": statistics.median(times) * 1e3, "repeats": len(times),
    "vmhwm_mb": hwm, "build_s": build_s,
    "device_peak_mb": torch.cuda.max_memory_allocated() / 1048576 if device == "cuda" else None,
    "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "params": sum(p.numel() for p in unet.parameters()),
    "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
}), flush=True)
"""


def run_child(cmd, stdin_text=None, env=None):
    """Runs cmd with stdout captured and stderr passed through. Returns (exit status, stdout, peak RSS in MB),
    the peak being this child's own ru_maxrss (os.wait4), not a maximum over every child so far."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, text=True, env=env)
    if stdin_text is not None:
        proc.stdin.write(stdin_text)
        proc.stdin.close()
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keeps Popen from waiting again
    return proc.returncode, out, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON object in the output")


def thread_env(threads, hide_gpus=False):
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    if hide_gpus:  # the torch side is a CPU measurement: keep a CUDA build of torch from probing the driver
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_torch(python, config, height, width, batch, threads, repeats, device="cpu", precision="fp32"):
    settings = json.dumps({"config": os.path.abspath(config), "height": height, "width": width, "batch": batch,
                           "threads": threads, "repeats": repeats, "device": device, "precision": precision})
    rc, out, rss = run_child([python, "-c", TORCH_CHILD], settings, thread_env(threads, hide_gpus=device == "cpu"))
    if rc != 0:
        sys.exit(f"unet_vs_torch.py: the torch side failed (exit {rc}); see its messages above")
    result = last_json(out)
    result["peak_rss_mb"] = rss
    return result


def torch_baseline_rss(python, threads):
    """Peak RSS of the torch side's runtime alone (Python, torch and diffusers imported, no model), in MB."""
    rc, _, rss = run_child([python, "-c", "import torch, diffusers.models"], env=thread_env(threads, hide_gpus=True))
    return rss if rc == 0 else None


def run_pea(pea, config, height, width, batch, threads, repeats, device="cpu", precision="fp32", lib=None, weights="f32"):
    """Returns pea's JSON result with peak_rss_mb measured here, or None (after saying why) when it cannot run."""
    if not os.path.exists(pea):
        print(f"unet_vs_torch.py: {pea} not found (build it with 'make'); showing the torch side only",
              file=sys.stderr)
        return None
    cmd = [pea, "bench", "unet", "--config", config, "--latent", f"{height}x{width}", "--batch", str(batch),
           "--threads", str(threads), "--repeats", str(repeats), "--json"]
    env = thread_env(threads)
    if device == "cuda":
        cmd += ["--backend", "cuda", "--precision", precision]
        if lib:
            env["PEA_CUDA_LIB"] = os.path.abspath(lib)
    else:
        cmd += ["--backend", "cpu", "--weights", weights]
    rc, out, rss = run_child(cmd, env=env)
    if rc != 0:
        print(f"unet_vs_torch.py: '{' '.join(cmd)}' failed (exit {rc}); showing the torch side only",
              file=sys.stderr)
        return None
    try:
        result = last_json(out)
    except ValueError:
        print(f"unet_vs_torch.py: '{' '.join(cmd)}' printed no JSON result; showing the torch side only",
              file=sys.stderr)
        return None
    result["self_reported_peak_rss_mb"] = result.get("peak_rss_mb")
    result["peak_rss_mb"] = rss
    return result


def machine_description():
    model = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        found = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if found:
            model = found.group(1).strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} online CPUs"


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "—"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append",
                        help="a UNet config.json; repeatable (default: benchmarks/configs/sd15_unet.json)")
    parser.add_argument("--latent", default="64x64", help="latent H×W, e.g. 64x64 or 128x128 (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both sides (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed evaluations per side, after one warm-up (default: %(default)s)")
    parser.add_argument("--pea", default=".build/release/pea", help="the pea binary (default: %(default)s)")
    parser.add_argument("--python", default=DEFAULT_PYTHON if os.path.exists(DEFAULT_PYTHON) else sys.executable,
                        help="a Python with torch and diffusers for the torch side (default: %(default)s)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both sides run (default: %(default)s)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                        help="storage dtype of weights and activations; fp16/bf16 need --device cuda (default: %(default)s)")
    parser.add_argument("--weights", default="f32",
                        help="comma-separated pea weight modes on the CPU, one row each: f32, bf16, f16 (default: %(default)s)")
    parser.add_argument("--lib", help="the CUDA library pea loads (PEA_CUDA_LIB), e.g. .build-cuda/libpea_cuda.so")
    parser.add_argument("--write", metavar="RESULTS.md", help="record the table in this markdown file")
    args = parser.parse_args()
    if args.device == "cpu" and args.precision != "fp32":
        sys.exit("unet_vs_torch.py: --precision fp16/bf16 needs --device cuda")
    weight_modes = args.weights.split(",")
    if any(mode not in ("f32", "bf16", "f16") for mode in weight_modes):
        sys.exit(f"unet_vs_torch.py: --weights takes f32, bf16 and f16, got '{args.weights}'")
    if args.device == "cuda" and weight_modes != ["f32"]:
        sys.exit("unet_vs_torch.py: --weights is for the CPU; on cuda pea stores weights in --precision")
    configs = args.config or [os.path.relpath(os.path.join(HERE, "configs", "sd15_unet.json"))]
    found = re.fullmatch(r"(\d+)[x×](\d+)", args.latent)
    if not found:
        sys.exit(f"unet_vs_torch.py: --latent must look like 64x64, got '{args.latent}'")
    height, width = int(found.group(1)), int(found.group(2))
    if args.repeats < 1 or args.batch < 1 or args.threads < 1:
        sys.exit("unet_vs_torch.py: --repeats, --batch and --threads must be at least 1")
    check = subprocess.run([args.python, "-c", "import torch, diffusers"], capture_output=True, text=True)
    if check.returncode != 0:
        sys.exit(f"unet_vs_torch.py: {args.python} cannot import torch and diffusers (run 'make fixtures' to create "
                 f"tools/reference/.venv, or pass --python):\n{check.stderr.strip()}")

    memory = "peak device MB" if args.device == "cuda" else "peak RSS MB"
    header = ("| UNet | latent × batch | pea weights | pea best / median ms | torch best / median ms | time pea / torch "
              f"| pea {memory} | torch {memory} | memory pea / torch |\n"
              "|---|---|---|---:|---:|---:|---:|---:|---:|")
    rows, versions, pea_missing = [], "", False
    for config in configs:
        name = os.path.splitext(os.path.basename(config))[0]
        if name == "config":  # a model folder's config.json: name it by its folder
            name = os.path.basename(os.path.dirname(os.path.abspath(config)))
        print(f"{name}: torch side ...", file=sys.stderr, flush=True)
        ref = run_torch(args.python, config, height, width, args.batch, args.threads, args.repeats, args.device, args.precision)
        versions = f"torch {ref['torch']}, diffusers {ref['diffusers']}"
        for mode in weight_modes:
            print(f"{name}: pea side (weights {mode}) ...", file=sys.stderr, flush=True)
            pea = run_pea(args.pea, config, height, width, args.batch, args.threads, args.repeats, args.device,
                          args.precision, args.lib, mode)
            if args.device == "cuda":  # memory is the device's peak on both sides
                ref["peak_rss_mb"] = ref["device_peak_mb"]
                if pea is not None:
                    pea["peak_rss_mb"] = pea.get("peak_device_mb")
            pea_missing |= pea is None
            shape = f"{height}×{width} × {args.batch}"
            torch_ms = f"{ref['best_ms']:.0f} / {ref['median_ms']:.0f}"
            stored = mode if args.device == "cpu" else args.precision
            if pea is None:
                row = (f"| {name} | {shape} | {stored} | — | {torch_ms} | — | — | {ref['peak_rss_mb']:.0f} | — |")
            else:
                row = (f"| {name} | {shape} | {stored} | {pea['best_ms']:.0f} / {pea['median_ms']:.0f} | {torch_ms} "
                       f"| {ratio(pea['best_ms'], ref['best_ms'])} | {pea['peak_rss_mb']:.0f} | {ref['peak_rss_mb']:.0f} "
                       f"| {ratio(pea['peak_rss_mb'], ref['peak_rss_mb'])} |")
            rows.append(row)
        print(f"{name}: torch {ref['params'] / 1e6:.0f}M parameters, built in {ref['build_s']:.1f} s, "
              f"VmHWM {ref['vmhwm_mb']:.0f} MB", file=sys.stderr)

    baseline = torch_baseline_rss(args.python, args.threads)
    print(header)
    for row in rows:
        print(row)
    if baseline:
        print(f"\n(torch's runtime alone, imported with no model: {baseline:.0f} MB peak RSS)")

    if args.write:
        command = "python3 " + " ".join(shlex.quote(a) for a in sys.argv)
        section = "\n".join([
            SECTION,
            "",
            f"- date: {datetime.date.today().isoformat()}",
            (f"- device: {ref.get('gpu')} (pea --backend cuda --precision {args.precision})" if args.device == "cuda"
             else f"- machine: {machine_description()}; {args.threads} threads on both sides"),
            f"- reference: {versions}, {args.precision}, torch.inference_mode, default (SDPA) attention"
            + (", TF32 off" if args.device == "cuda" else ""),
            f"- timing: one warm-up evaluation, then {args.repeats} timed; best / median of those; "
            + ("memory is each side's peak of device memory in use (pea's caching allocator, "
               "torch.cuda.max_memory_allocated)" if args.device == "cuda" else
               "peak RSS is each side's own process (os.wait4 ru_maxrss), runtime included"
               + (f" (torch's runtime alone, imported with no model: {baseline:.0f} MB)" if baseline else "")),
            "- configs: benchmarks/configs/ (published UNet configs, random weights; see its README)",
            f"- command: `{command}`",
            *(["- pea side missing: the binary was absent or `pea bench unet` failed"] if pea_missing else []),
            "",
            header,
            *rows,
            "",
        ])
        section_name = CUDA_SECTION if args.device == "cuda" else SECTION
        section = section.replace(SECTION, section_name, 1)
        write_section(args.write, section_name, section)
        print(f"\nwrote {args.write}")


if __name__ == "__main__":
    main()
