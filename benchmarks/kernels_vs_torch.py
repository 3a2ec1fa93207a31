#!/usr/bin/env python3
"""Pea's CUDA kernels (`pea bench kernels --backend cuda --json`) side by side with their PyTorch equivalents.

The pea side prints, per kernel, its problem (a `params` object of dimensions) and its best / median time; this
script builds the same problems in torch on the same GPU, in the same run and dtype, and times them the way pea
does (`pea bench kernels --help`): after a warm-up, each of --repeats samples is a spin kernel that holds the
stream for --gate-us µs (torch.cuda._sleep, its cycles calibrated against CUDA events), a start event, --launches
back-to-back runs and an end event, all queued while the GPU spins; the sample is the GPU time between the two
events divided by --launches (best and median of the samples). The runs thus execute back to back on the GPU on
both sides, not paced by the host's launch rate. Inputs stay resident across runs, so the UNet-sized tensors
(≤ 10 MB) are served largely from the 50 MB L2 cache; the *_vae rows (VAE decoder at 512×512, 17-67 MB per fp16
tensor) measure DRAM.

    group_norm_silu_*  F.silu(F.group_norm(x, G, w, b))            x [B, C, H, W]
    layer_norm         F.layer_norm(x, (C,), w, b)                  x [R, C]
    attn_*             F.scaled_dot_product_attention(q, k, v)     q/k/v [B, H, T, D] (FlashAttention when it applies)
    conv3x3_*          F.conv2d(x, w, b, padding=1)                 cuDNN (benchmark mode, TF32 off for fp32)
    conv3x3_*_residual F.conv2d(x, w, b, padding=1) + r             (pea: the residual in the conv's epilogue)
    linear_*           F.linear(x, w, b)                            cuBLAS
    gemm_*             torch.matmul(a, b)                           cuBLAS (TF32 off for fp32)
    conv3x3_320_gemm   torch.matmul(w, cols)                        w [M, K], cols [B, K, N]: the conv's bare GEMM
    add, silu          a + b, F.silu(x)
    geglu              a, g = x.chunk(2, -1); a * F.gelu(g)         (diffusers' GEGLU after its projection)

The table gives both times, pea / torch, pea's achieved GB/s or TFLOP/s and, for memory-bound kernels, the
fraction of the device's DRAM bandwidth (from a table of known devices: H100 SXM 3350 GB/s, H100 PCIe 2000,
H200 4800, A100 …; otherwise a measured device-to-device copy). Under the table, per dtype, each conv3x3 with a
matching *_gemm row (and its *_residual variant) is set against that bare GEMM (the issue's target: conv2d ≤ 1.3× the cuBLAS GEMM).

    python3 benchmarks/kernels_vs_torch.py [--pea ./pea] [--precision fp16] [--repeats 20] [--launches 10]
                                           [--gate-us 400] [--only NAME]
                                           [--lib .build-cuda/libpea_cuda.so] [--write benchmarks/RESULTS.md]
    python3 benchmarks/kernels_vs_torch.py --dry-run [--pea .build/release/pea]   # no GPU: checks pea's JSON on the CPU

Without a GPU (or without torch built for CUDA) it exits with a message saying so. --precision may be given
several times (one table per dtype).
"""
import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys

from results_file import write_section

SECTION = "## CUDA kernels vs PyTorch"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MEMORY_BOUND = {"group_norm", "layer_norm", "add", "silu", "geglu"}
REQUIRED_KEYS = {"name", "op", "shape", "dtype", "best_ms", "median_ms", "params"}
KNOWN_OPS = {"group_norm", "layer_norm", "attention", "attention_backward", "conv2d", "linear", "gemm", "add", "silu", "geglu"}

# Peak DRAM bandwidth in GB/s by device name (matched in order, case-insensitive; the first match wins).
PEAK_BANDWIDTH = [
    ("GH200", 4000.0),      # 96 GB HBM3 (the 144 GB HBM3e part: 4900)
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),       # SXM5 (H100 80GB HBM3)
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),       # 40 GB
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("RTX 4090", 1008.0),
]


def last_json_list(text):
    start = text.find("[")
    if start < 0:
        raise ValueError("no JSON list in the output")
    return json.loads(text[start:])


def run_pea(pea, backend, precision, repeats, only, scale, lib, launches=1, gate_us=None):
    cmd = [pea, "bench", "kernels", "--backend", backend, "--precision", precision, "--json", "--launches", str(launches)]
    if gate_us is not None:
        cmd += ["--gate-us", str(gate_us)]
    if repeats:
        cmd += ["--repeats", str(repeats)]
    if only:
        cmd += ["--only", only]
    if scale:
        cmd += ["--scale", scale]
    env = dict(os.environ)
    if lib:
        env["PEA_CUDA_LIB"] = os.path.abspath(lib)
    print("pea side: " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"kernels_vs_torch.py: '{' '.join(cmd)}' failed (exit {proc.returncode}); see its messages above")
    try:
        results = last_json_list(proc.stdout)
    except ValueError as error:
        sys.exit(f"kernels_vs_torch.py: '{' '.join(cmd)}' printed no JSON list ({error}):\n{proc.stdout}")
    for r in results:
        missing = REQUIRED_KEYS - set(r)
        if missing or not ("gbps" in r or "tflops" in r):
            sys.exit(f"kernels_vs_torch.py: pea's JSON entry {r} lacks {sorted(missing) or 'gbps/tflops'}")
        if r["op"] not in KNOWN_OPS:
            sys.exit(f"kernels_vs_torch.py: pea's JSON entry {r['name']} has op '{r['op']}', which has no torch equivalent here")
        if backend == "cuda" and r.get("timing") != "device":
            sys.exit(f"kernels_vs_torch.py: pea timed {r['name']} with '{r.get('timing')}', not device events "
                     "(an older pea?); the two sides would not be timed alike")
    return results


def peak_bandwidth(torch, name):
    """(GB/s, where it came from) for the current device."""
    for key, gbps in PEAK_BANDWIDTH:
        if key.lower() in name.lower():
            return gbps, f"{key} spec sheet"
    # Unknown device: a large device-to-device copy (read + write), best of several.
    n = 256 * 1024 * 1024
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return 2 * n / (best * 1e-3) / 1e9, "measured device-to-device copy"


def torch_problem(torch, F, entry, dtype, dev="cuda"):
    """A zero-argument function running the torch equivalent of one pea kernel entry."""
    p, op = entry["params"], entry["op"]

    def rnd(*shape):
        return torch.randn(*shape, device=dev, dtype=dtype)

    if op == "group_norm":
        x, w, b = rnd(p["B"], p["C"], p["H"], p["W"]), rnd(p["C"]), rnd(p["C"])
        if p.get("silu"):
            return lambda: F.silu(F.group_norm(x, p["G"], w, b, 1e-5))
        return lambda: F.group_norm(x, p["G"], w, b, 1e-5)
    if op == "layer_norm":
        x, w, b = rnd(p["R"], p["C"]), rnd(p["C"]), rnd(p["C"])
        return lambda: F.layer_norm(x, (p["C"],), w, b, 1e-5)
    if op == "attention":
        q = rnd(p["B"], p["H"], p["Tq"], p["D"])
        k, v = rnd(p["B"], p["H"], p["Tk"], p["D"]), rnd(p["B"], p["H"], p["Tk"], p["D"])
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if op == "attention_backward":  # autograd's backward of SDPA only: the graph is built here, once
        q = rnd(p["B"], p["H"], p["Tq"], p["D"]).requires_grad_()
        k, v = rnd(p["B"], p["H"], p["Tk"], p["D"]).requires_grad_(), rnd(p["B"], p["H"], p["Tk"], p["D"]).requires_grad_()
        o = F.scaled_dot_product_attention(q, k, v)
        do = torch.randn_like(o)
        return lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
    if op == "conv2d":
        x = rnd(p["B"], p["Cin"], p["H"], p["W"])
        w, b = rnd(p["Cout"], p["Cin"], p["k"], p["k"]), rnd(p["Cout"])
        if p.get("residual"):
            r = rnd(p["B"], p["Cout"], p["H"], p["W"])
            return lambda: torch.add(F.conv2d(x, w, b, padding=p["pad"]), r)
        return lambda: F.conv2d(x, w, b, padding=p["pad"])
    if op == "linear":
        x, w, b = rnd(p["M"], p["K"]), rnd(p["N"], p["K"]), rnd(p["N"])
        return lambda: F.linear(x, w, b)
    if op == "gemm":
        a = rnd(p["M"], p["K"])
        b = rnd(p["batch"], p["K"], p["N"]) if "batch" in p else rnd(p["K"], p["N"])
        return lambda: torch.matmul(a, b)
    if op == "add":
        a, b = rnd(p["B"], p["C"], p["H"], p["W"]), rnd(p["B"], p["C"], p["H"], p["W"])
        return lambda: a + b
    if op == "silu":
        x = rnd(p["B"], p["C"], p["H"], p["W"])
        return lambda: F.silu(x)
    if op == "geglu":
        x = rnd(p["R"], 2 * p["D"])

        def geglu():
            a, g = x.chunk(2, dim=-1)
            return a * F.gelu(g)
        return geglu
    raise ValueError(f"no torch equivalent for op '{op}'")


def sleep_cycles_per_us(torch):
    """The GPU clock as torch.cuda._sleep counts it (cycles per µs), from a timed 10 ms-ish spin."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 20_000_000
    torch.cuda._sleep(cycles // 10)   # warm-up: the first launch pays module loading
    best = float("inf")
    for _ in range(3):
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return cycles / (best * 1e3)


def time_torch(torch, fn, repeats, launches, gate_cycles):
    """Best and median ms per run of `repeats` samples, after warm-up: each sample is a spin of `gate_cycles`
    (torch.cuda._sleep) that holds the stream while the host queues the start event, `launches` runs and the
    end event; GPU time between the events divided by `launches` — the sampling of pea bench kernels."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(gate_cycles)
        start.record()
        for _ in range(launches):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / launches)
    return min(times), statistics.median(times)


def conv_gemm_lines(rows_by_precision):
    """'conv3x3_320 / its bare GEMM' lines: pea conv over pea's and torch's GEMM, torch conv over torch's GEMM."""
    lines = []
    for precision, entries in rows_by_precision.items():
        by_name = {e["name"]: (e["best_ms"], t_best) for e, t_best in entries}
        for name, (conv_pea, conv_torch) in by_name.items():
            gemm = by_name.get(name.removesuffix("_residual") + "_gemm")
            if not name.startswith("conv") or gemm is None:
                continue
            gemm_pea, gemm_torch = gemm
            lines.append(f"- {name} / its bare GEMM ({name}_gemm), {precision}: pea conv / torch (cuBLAS) GEMM "
                         f"{conv_pea / gemm_torch:.2f} (target ≤ 1.3); pea conv / pea GEMM {conv_pea / gemm_pea:.2f}; "
                         f"torch conv / torch GEMM {conv_torch / gemm_torch:.2f}")
    return lines


def sdpa_backend_note(torch, F):
    """Which SDPA kernel torch would pick for f16 [2, 5, 4096, 64] (FlashAttention when available)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        q = torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.float16)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(q, q, q)
        return "FlashAttention available (f16/bf16)"
    except Exception as error:  # old torch, or no flash kernel for this device
        return f"FlashAttention not confirmed ({type(error).__name__})"


def cudnn_version(torch):
    try:
        return torch.backends.cudnn.version()
    except Exception:  # no usable cuDNN
        return "unknown"


def dry_run(args):
    results = run_pea(args.pea, "cpu", "fp32", args.repeats or 1, args.only, "small", None)
    print(f"pea bench kernels --json on the CPU: {len(results)} entries, all with {sorted(REQUIRED_KEYS)} and gbps/tflops, "
          f"ops all in {sorted(KNOWN_OPS)}")
    for r in results:
        rate = f"{r['gbps']:.2f} GB/s" if "gbps" in r else f"{r['tflops']:.4f} TFLOP/s"
        print(f"  {r['name']:27} {r['shape']:36} {r['best_ms']:10.3f} ms  {rate}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pea", default="./pea" if os.path.exists("./pea") else ".build/release/pea",
                        help="the pea binary (default: %(default)s)")
    parser.add_argument("--lib", default=os.path.join(ROOT, ".build-cuda", "libpea_cuda.so"),
                        help="the CUDA library pea loads (PEA_CUDA_LIB; default: %(default)s when it exists)")
    parser.add_argument("--precision", action="append", choices=["fp32", "fp16", "bf16"],
                        help="dtype of both sides; repeatable (default: fp16 and fp32)")
    parser.add_argument("--repeats", type=int, default=20, help="timed samples per kernel and side (default: %(default)s)")
    parser.add_argument("--launches", type=int, default=10,
                        help="back-to-back runs per timed sample on both sides, the time divided by it (default: %(default)s)")
    parser.add_argument("--gate-us", type=int, default=None,
                        help="µs the spin gate holds the GPU before each sample, on both sides (default: 20·launches + 200)")
    parser.add_argument("--only", help="pea's --only: comma-separated substrings of kernel names")
    parser.add_argument("--write", metavar="RESULTS.md", help="record the tables in this markdown file")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU needed: run the pea side on the CPU at small shapes and check its JSON")
    args = parser.parse_args()
    if not os.path.exists(args.pea):
        sys.exit(f"kernels_vs_torch.py: {args.pea} not found (build one: 'make gpu-bundle' elsewhere, or pass --pea)")
    if args.dry_run:
        dry_run(args)
        return

    try:
        import torch
        import torch.nn.functional as F
    except ImportError as error:
        sys.exit(f"kernels_vs_torch.py: torch is not importable ({error}); this benchmark needs torch with CUDA")
    if not torch.cuda.is_available():
        sys.exit("kernels_vs_torch.py: no CUDA device visible to torch (no GPU, no driver, or a CPU-only torch); "
                 "nothing to compare. Use --dry-run to check the pea side on the CPU.")
    lib = args.lib if os.path.exists(args.lib) else None
    if lib is None:
        print(f"kernels_vs_torch.py: {args.lib} not found; pea looks for libpea_cuda.so itself", file=sys.stderr)
    torch.backends.cuda.matmul.allow_tf32 = False   # fp32 on both sides is exact f32 (pea's default)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    device = torch.cuda.get_device_name(0)
    peak, peak_source = peak_bandwidth(torch, device)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    precisions = args.precision or ["fp16", "fp32"]
    gate_us = args.gate_us if args.gate_us is not None else 20 * args.launches + 200
    cycles_per_us = sleep_cycles_per_us(torch)
    gate_cycles = int(gate_us * cycles_per_us)

    header = ("| kernel | shape | dtype | pea best / median ms | torch best / median ms | pea / torch "
              "| pea GB/s or TFLOP/s | torch GB/s or TFLOP/s | pea % of DRAM peak |\n"
              "|---|---|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    timed = {}
    for precision in precisions:
        for entry in run_pea(args.pea, "cuda", precision, args.repeats, args.only, None, lib, args.launches, gate_us):
            fn = torch_problem(torch, F, entry, dtypes[precision])
            with torch.inference_mode():
                t_best, t_median = time_torch(torch, fn, args.repeats, args.launches, gate_cycles)
            timed.setdefault(precision, []).append((entry, t_best))
            memory_bound = entry["op"] in MEMORY_BOUND
            if memory_bound:
                torch_rate = entry["gbps"] * entry["best_ms"] / t_best
                pea_rate = f"{entry['gbps']:.0f} GB/s"
                torch_rate = f"{torch_rate:.0f} GB/s"
                fraction = f"{100 * entry['gbps'] / peak:.0f}%"
            else:
                pea_rate = f"{entry['tflops']:.1f} TFLOP/s"
                torch_rate = f"{entry['tflops'] * entry['best_ms'] / t_best:.1f} TFLOP/s"
                fraction = "—"
            row = (f"| {entry['name']} | {entry['shape']} | {precision} "
                   f"| {entry['best_ms']:.3f} / {entry['median_ms']:.3f} | {t_best:.3f} / {t_median:.3f} "
                   f"| {entry['best_ms'] / t_best:.2f} | {pea_rate} | {torch_rate} | {fraction} |")
            rows.append(row)
            print(row, file=sys.stderr, flush=True)

    note = sdpa_backend_note(torch, F)
    print(f"\n{device}; torch {torch.__version__}; DRAM peak {peak:.0f} GB/s ({peak_source}); SDPA: {note}\n")
    print(header)
    for row in rows:
        print(row)
    ratios = conv_gemm_lines(timed)
    if ratios:
        print()
        for line in ratios:
            print(line)

    if args.write:
        command = "python3 " + " ".join(shlex.quote(a) for a in sys.argv)
        section = "\n".join([
            SECTION,
            "",
            f"- date: {datetime.date.today().isoformat()}",
            f"- device: {device}; DRAM peak {peak:.0f} GB/s ({peak_source})",
            f"- reference: torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {cudnn_version(torch)}; "
            f"SDPA in [B, H, T, D] ({note}); cuDNN benchmark mode; TF32 off on both sides",
            f"- timing: device-timed, the same on both sides: each sample is a {gate_us} µs spin kernel (pea_cuda_spin / "
            f"torch.cuda._sleep at {cycles_per_us:.0f} cycles/µs) holding the stream while the host queues a CUDA event, "
            f"{args.launches} back-to-back runs and a second event; the GPU time between the events divided by "
            f"{args.launches}; pea one warm-up, torch three, then {args.repeats} samples; best / median; rates from the best "
            "time (GB/s: minimal bytes read + written). Inputs stay resident across runs: UNet-sized tensors (≤ 10 MB) "
            "are largely served from L2; the *_vae rows (17-67 MB per fp16 tensor) exceed the 50 MB L2",
            f"- command: `{command}`",
            "",
            header,
            *rows,
            "",
            *ratios,
            *([""] if ratios else []),
        ])
        write_section(args.write, SECTION, section)
        print(f"\nwrote {args.write}")


if __name__ == "__main__":
    main()
