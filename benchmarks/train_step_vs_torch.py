#!/usr/bin/env python3
"""One PEA training step: Pea (`pea bench train-step --json`) side by side with PyTorch (diffusers'
UNet2DConditionModel + a PEA adapter + torch.optim.AdamW), on the CPU (default) or on a CUDA GPU (--device cuda).

The step is one knowledge-distillation step as the official training scripts compute it (train_sd_zh.py, and
train_sdxl_zh.py for an SDXL UNet; see tools/reference/make_kd_fixtures.py for the exact semantics), at full size
with random values (speed does not depend on them):
  - a frozen UNet built from a published config (default benchmarks/configs/sd15_unet.json, requires_grad False)
    and a trainable SD1-form adapter (--adapter Din,hidden,…,out: LayerNorm(Din) → bias-free Linear/GELU stack;
    default 1024,2048,2048,768, the training script's shape; out must be the UNet's cross_attention_dim);
  - an SDXL config (addition_embed_type "text_time", e.g. benchmarks/configs/sdxl_unet.json) gets the SDXL-form
    adapter instead (train_sdxl_zh.py's MLP): --adapter Din,hidden,…,P, the same stack ending with the pooled
    width P the UNet's add embedding expects (projection_class_embeddings_input_dim − 6·addition_time_embed_dim,
    1280 for SDXL), then sequence = fc(GELU(x)) with fc Linear(P → cross_attention_dim, with bias) and pooled =
    the mean of x over the tokens; default 1024,2048,2048,1280 (fc → 2048), train_sdxl_zh.py's shape for
    multilingual CLIP;
  - inputs: noisy latents and noise [B, 4, H, W], timesteps [B], student states and uncond student states
    [B, L, Din] (a language-specific encoder's output; the encoder is not part of the step), teacher states and
    uncond teacher states [B, L, cross_attention_dim], and a fixed uncond mask (torch.rand(B) < 0.1 from seed 0);
    SDXL also time_ids [B, 6] (original size H·8, W·8, crop 0, 0, target size H·8, W·8; the same for both sides)
    and the teacher's pooled text_embeds [B, P];
  - the step: teacher forward under no_grad with forward hooks on every down block (output[0]), the mid block and
    every up block; adapter on the student states and on the uncond ones, switched by the mask (SDXL: the
    student's text_embeds is the adapter's pooled output on the conditional states for every sample, never switched,
    and the teacher's is its own text_embeds, not switched either); student forward with the same hooks; loss = MSE(ε̂_s, noise) + MSE(ε̂_s, ε̂_t) + 0.1·Σ MSE(feature_t, feature_s) (per-sample
    means, then the batch mean); backward (data gradients through the frozen UNet into the adapter);
    AdamW(lr 1e-5, weight_decay 0.1).step(); zero_grad().
Each side gets the same thread count, one warm-up step, then --repeats timed steps; the table shows the best and
the median. torch uses diffusers' default attention (scaled_dot_product_attention).

Each side runs in its own subprocess, so its peak resident memory is its own (os.wait4's ru_maxrss: weights,
optimizer state, activations kept for the backward pass and the runtime itself).

    python3 benchmarks/train_step_vs_torch.py [--config benchmarks/configs/sd15_unet.json] [--latent 64x64]
            [--batch 1] [--adapter 1024,2048,2048,768] [--context-length 77] [--threads 2] [--repeats 3]
            [--pea .build/release/pea] [--python tools/reference/.venv/bin/python] [--write benchmarks/RESULTS.md]

On a GPU (--device cuda [--precision fp16|bf16] [--lib .build-cuda/libpea_cuda.so]): pea runs `--backend cuda
--precision P`; torch runs the frozen UNet and its inputs in that dtype on cuda:0, the adapter's weights and AdamW
state in float32 (its output cast to the UNet's dtype) and the losses in float32; TF32 off. Each step is timed
with CUDA events recorded on the stream around it, and memory is the device's peak (pea's caching-allocator
peak, torch.cuda.max_memory_allocated). Results go to the section "CUDA training step vs PyTorch, <precision>";
CPU results to "Training step vs PyTorch". An SDXL config's results go to sections of their own ("Training step
vs PyTorch, SDXL", "CUDA training step vs PyTorch, SDXL, <precision>"), so they never replace the SD1.5 figures.
A full SDXL run, e.g. on a GPU:

    python3 benchmarks/train_step_vs_torch.py --config benchmarks/configs/sdxl_unet.json --latent 128x128
            --batch 2 --device cuda --precision fp16 --lib .build-cuda/libpea_cuda.so

--dry-run: a quick check of the script on a small machine: the tiny SD1 and SDXL UNets of
Tests/Fixtures/pipelines/{sd1,sdxl}/unet/config.json one after the other (only --config when given), latent 8×8,
adapter 12,20,20,16 (the SDXL one: 16 is its pooled width, fc → 32), 2 timed steps (the pea side too when the
binary is there); nothing is written.

The torch side needs a Python with torch and diffusers; by default the reference venv (`make fixtures` creates
it). Without a pea binary, or when `pea bench train-step` fails (for instance a pea that predates the command),
the torch figures are still printed, saying so.
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
from unet_vs_torch import last_json, machine_description, ratio, run_child, thread_env

SECTION = "## Training step vs PyTorch"
CUDA_SECTION = "## CUDA training step vs PyTorch"
SDXL_SUFFIX = ", SDXL"  # SDXL configs get sections of their own, so they never replace the SD1.5 figures
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_PYTHON = os.path.join(ROOT, "tools", "reference", ".venv", "bin", "python")
DEFAULT_CONFIG = os.path.join(HERE, "configs", "sd15_unet.json")
DRY_RUN_CONFIGS = [os.path.join(ROOT, "Tests", "Fixtures", "pipelines", family, "unet", "config.json")
                   for family in ("sd1", "sdxl")]

# Runs in the torch subprocess: reads its settings as JSON on stdin, prints one JSON result on stdout.
TORCH_CHILD = r"""
import json, statistics, sys, time
cfg = json.load(sys.stdin)
import warnings
warnings.filterwarnings("ignore", message="CUDA initialization")
import torch
import torch.nn as nn
import torch.nn.functional as F
import diffusers
from diffusers import UNet2DConditionModel
diffusers.utils.logging.set_verbosity_error()
torch.set_num_threads(cfg["threads"])
torch.manual_seed(0)
device = torch.device(cfg["device"])
cuda = device.type == "cuda"
dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg["precision"]]
if cuda:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
with open(cfg["config"]) as f:
    config = json.load(f)
widths = cfg["adapter"]
cross = config["cross_attention_dim"]
cross = cross if isinstance(cross, int) else cross[0]
sdxl = config.get("addition_embed_type") == "text_time"
# SDXL: the stack ends with the pooled width P the add embedding expects, then fc → cross_attention_dim.
out_width = (config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]) if sdxl else cross
if widths[-1] != out_width:
    sys.exit(f"the adapter's output width {widths[-1]} is not the UNet's "
             + (f"pooled text_embeds width {out_width}" if sdxl else f"cross_attention_dim {cross}"))


class Adapter(nn.Module):
    # PEA's adapter: LayerNorm, then bias-free Linear layers with exact GELU between them (SD1 form); with fc_out,
    # the SDXL form (train_sdxl_zh.py's MLP): x = that stack, sequence = fc(GELU(x)) with fc a Linear with bias,
    # pooled = the mean of x over the tokens. forward returns (sequence, pooled or None).
    def __init__(self, widths, fc_out=None):
        super().__init__()
        self.layernorm = nn.LayerNorm(widths[0])
        layers = []
        for i in range(len(widths) - 1):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(widths[i], widths[i + 1], bias=False))
        self.projector = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[-1], fc_out) if fc_out is not None else None

    def forward(self, x):
        x = self.projector(self.layernorm(x))
        if self.fc is None:
            return x, None
        return self.fc(F.gelu(x)), x.mean(dim=1)


t0 = time.perf_counter()
unet = UNet2DConditionModel.from_config(config).to(device=device, dtype=dtype).eval().requires_grad_(False)
if cfg["torch_checkpointing"]:
    unet.enable_gradient_checkpointing()  # diffusers: each resnet and transformer recomputed in the backward pass
adapter = Adapter(widths, cross if sdxl else None).to(device)  # float32 master weights
optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
build_s = time.perf_counter() - t0

features = {}
def recorder(name, first):
    def hook(module, args, output):
        features[name] = output[0] if first else output
    return hook
names = []
for i, block in enumerate(unet.down_blocks):
    block.register_forward_hook(recorder(f"down.{i}", True)); names.append(f"down.{i}")
unet.mid_block.register_forward_hook(recorder("mid", False)); names.append("mid")
for i, block in enumerate(unet.up_blocks):
    block.register_forward_hook(recorder(f"up.{i}", False)); names.append(f"up.{i}")

b, h, w, length = cfg["batch"], cfg["height"], cfg["width"], cfg["context_length"]
channels = config.get("in_channels", 4)
generator = torch.Generator().manual_seed(0)
def draw(*shape, to=dtype):
    return torch.randn(*shape, generator=generator).to(device=device, dtype=to)
noisy_latents = draw(b, channels, h, w)
noise = draw(b, channels, h, w, to=torch.float32)
timesteps = torch.randint(0, 1000, (b,), generator=generator).to(device)
student_states = draw(b, length, widths[0], to=torch.float32)
student_states_uncond = draw(b, length, widths[0], to=torch.float32)
teacher_states = draw(b, length, cross)
teacher_states_uncond = draw(b, length, cross)
mask = (torch.rand(b, generator=generator) < 0.1).to(device).view(b, 1, 1)
teacher_kwargs = {}
if sdxl:
    # SDXL's added conditioning: original size, crop top-left, target size (pixels = latent × 8), the same for
    # both sides; the teacher's pooled text_embeds is an input (random here).
    time_ids = torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]] * b, dtype=dtype, device=device)
    teacher_text_embeds = draw(b, out_width)
    teacher_kwargs = {"added_cond_kwargs": {"text_embeds": teacher_text_embeds, "time_ids": time_ids}}


def batch_mse(a, b):
    return F.mse_loss(a.float(), b.float(), reduction="none").mean([1, 2, 3]).mean()


def step():
    features.clear()
    with torch.no_grad():
        teacher_eps = unet(noisy_latents, timesteps, torch.where(mask, teacher_states_uncond, teacher_states),
                           return_dict=False, **teacher_kwargs)[0]
    teacher_features = dict(features)
    features.clear()
    sequence, pooled = adapter(student_states)
    sequence_uncond, _ = adapter(student_states_uncond)  # its pooled vector is unused, as in train_sdxl_zh.py
    conditioning = torch.where(mask, sequence_uncond, sequence).to(dtype)
    student_kwargs = {}
    if sdxl:  # the pooled vector is the conditional states' for every sample, never switched by the mask
        student_kwargs = {"added_cond_kwargs": {"text_embeds": pooled.to(dtype), "time_ids": time_ids}}
    student_eps = unet(noisy_latents, timesteps, conditioning, return_dict=False, **student_kwargs)[0]
    loss_task = batch_mse(student_eps, noise)
    loss_logits = batch_mse(student_eps, teacher_eps)
    loss_features = sum(batch_mse(teacher_features[n], features[n]) for n in names)
    loss = loss_task + loss_logits + 0.1 * loss_features
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    features.clear()
    return loss.detach()


times = []
for i in range(1 + cfg["repeats"]):
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        end.synchronize()
        dt = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        loss = step()
        dt = time.perf_counter() - t0
    if i > 0:
        times.append(dt)
    print(f"torch: step {i} ({'warm-up' if i == 0 else 'timed'}) {dt * 1e3:.0f} ms, loss {loss.item():.5f}",
          file=sys.stderr, flush=True)
    if not torch.isfinite(loss):
        sys.exit("the loss is not finite")
hwm = 0.0
with open("/proc/self/status") as f:
    for line in f:
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
print(json.dumps({
    "best_ms": min(times) * 1e3, "median_ms": statistics.median(times) * 1e3, "repeats": len(times),
    "vmhwm_mb": hwm, "build_s": build_s,
    "device_peak_mb": torch.cuda.max_memory_allocated() / 1048576 if cuda else None,
    "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "unet_params": sum(p.numel() for p in unet.parameters()),
    "adapter_params": sum(p.numel() for p in adapter.parameters()),
    "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
}), flush=True)
"""


def run_torch(python, settings):
    rc, out, rss = run_child([python, "-c", TORCH_CHILD], json.dumps(settings),
                             thread_env(settings["threads"], hide_gpus=settings["device"] == "cpu"))
    if rc != 0:
        sys.exit(f"train_step_vs_torch.py: the torch side failed (exit {rc}); see its messages above")
    result = last_json(out)
    result["peak_rss_mb"] = rss
    return result


def run_pea(pea, settings, lib=None):
    """Returns pea's JSON result with peak_rss_mb measured here, or None (after saying why) when it cannot run."""
    if not os.path.exists(pea):
        print(f"train_step_vs_torch.py: {pea} not found (build it with 'make'); showing the torch side only",
              file=sys.stderr)
        return None
    cmd = [pea, "bench", "train-step", "--config", settings["config"],
           "--latent", f"{settings['height']}x{settings['width']}", "--batch", str(settings["batch"]),
           "--context-length", str(settings["context_length"]),
           "--adapter", ",".join(str(w) for w in settings["adapter"]),
           "--repeats", str(settings["repeats"]), "--threads", str(settings["threads"]), "--json"]
    if settings["pea_checkpointing"]:
        cmd.append("--gradient-checkpointing")
    env = thread_env(settings["threads"])
    if settings["device"] == "cuda":
        cmd += ["--backend", "cuda", "--precision", settings["precision"]]
        if lib:
            env["PEA_CUDA_LIB"] = os.path.abspath(lib)
    else:
        cmd += ["--backend", "cpu"]
    rc, out, rss = run_child(cmd, env=env)
    if rc != 0:
        print(f"train_step_vs_torch.py: '{' '.join(cmd)}' failed (exit {rc}; a pea without 'bench train-step'?); "
              "showing the torch side only", file=sys.stderr)
        return None
    try:
        result = last_json(out)
    except ValueError:
        print(f"train_step_vs_torch.py: '{' '.join(cmd)}' printed no JSON result; showing the torch side only",
              file=sys.stderr)
        return None
    missing = [k for k in ("best_ms", "median_ms") if not isinstance(result.get(k), (int, float))]
    if missing:
        print(f"train_step_vs_torch.py: pea's JSON lacks {', '.join(missing)}; showing the torch side only",
              file=sys.stderr)
        return None
    result["self_reported_peak_rss_mb"] = result.get("peak_rss_mb")
    result["peak_rss_mb"] = rss
    return result


def torch_baseline_rss(python, threads):
    """Peak RSS of the torch side's runtime alone (Python, torch and diffusers imported, no model), in MB."""
    rc, _, rss = run_child([python, "-c", "import torch, diffusers.models"], env=thread_env(threads, hide_gpus=True))
    return rss if rc == 0 else None


def parse_widths(text):
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        widths = []
    if len(widths) < 2 or min(widths) < 1:
        sys.exit(f"train_step_vs_torch.py: --adapter must look like 1024,2048,2048,768, got '{text}'")
    return widths


def mb(value):
    return f"{value:.0f}" if isinstance(value, (int, float)) else "—"


def unet_shape(unet_config):
    """(cross_attention_dim, the pooled text_embeds width P for an SDXL UNet or None)."""
    cross = unet_config["cross_attention_dim"]
    cross = cross if isinstance(cross, int) else cross[0]
    kind = unet_config.get("addition_embed_type")
    if kind is None:
        return cross, None
    if kind != "text_time":
        sys.exit(f"train_step_vs_torch.py: addition_embed_type '{kind}' is not benchmarked here (only SD1/SD2-style "
                 "UNets and SDXL's 'text_time')")
    pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
    if pooled < 1:
        sys.exit("train_step_vs_torch.py: projection_class_embeddings_input_dim leaves no room for text_embeds")
    return cross, pooled


def display_name(config):
    name = os.path.splitext(os.path.basename(config))[0]
    if name == "config":  # a model folder's config.json: name it by its folder's path
        name = "/".join(os.path.relpath(os.path.dirname(os.path.abspath(config)), ROOT).split(os.sep)[-3:])
    return name


def run_config(args, config, height, width, repeats):
    """Runs both sides on one UNet config, prints the table and writes it with --write."""
    if not os.path.exists(config):
        sys.exit(f"train_step_vs_torch.py: no such config: {config}")
    with open(config) as f:
        unet_config = json.load(f)
    cross, pooled = unet_shape(unet_config)
    sdxl = pooled is not None
    out_width = pooled if sdxl else cross
    default_widths = "12,20,20,16" if args.dry_run else f"1024,2048,2048,{out_width}"
    widths = parse_widths(args.adapter or default_widths)
    if widths[-1] != out_width:
        sys.exit(f"train_step_vs_torch.py: the adapter's output width {widths[-1]} is not the UNet's "
                 + (f"pooled text_embeds width {out_width} (SDXL: projection_class_embeddings_input_dim − 6 × "
                    f"addition_time_embed_dim; fc then maps it to cross_attention_dim {cross})" if sdxl
                    else f"cross_attention_dim {cross}"))

    settings = {"config": os.path.abspath(config), "height": height, "width": width, "batch": args.batch,
                "context_length": args.context_length, "adapter": widths, "threads": args.threads,
                "repeats": repeats, "device": args.device, "precision": args.precision,
                "pea_checkpointing": args.gradient_checkpointing in ("pea", "both"),
                "torch_checkpointing": args.gradient_checkpointing in ("torch", "both")}
    name = display_name(config)
    print(f"{name}: torch side ...", file=sys.stderr, flush=True)
    ref = run_torch(args.python, settings)
    print(f"{name}: torch {ref['unet_params'] / 1e6:.1f}M frozen UNet parameters, "
          f"{ref['adapter_params']:,} adapter parameters, built in {ref['build_s']:.1f} s, "
          f"VmHWM {ref['vmhwm_mb']:.0f} MB", file=sys.stderr)
    print(f"{name}: pea side ...", file=sys.stderr, flush=True)
    pea = run_pea(args.pea, settings, args.lib)
    if args.device == "cuda":  # memory is the device's peak on both sides
        ref["peak_rss_mb"] = ref["device_peak_mb"]
        if pea is not None:
            pea["peak_rss_mb"] = pea.get("peak_device_mb")

    memory = "peak device MB" if args.device == "cuda" else "peak RSS MB"
    header = ("| UNet | latent × batch | adapter | pea best / median ms | torch best / median ms | time pea / torch "
              f"| pea {memory} | torch {memory} | memory pea / torch |\n"
              "|---|---|---|---:|---:|---:|---:|---:|---:|")
    shape = f"{height}×{width} × {args.batch}"
    adapter = "→".join(str(w) for w in widths) + (f" (fc→{cross})" if sdxl else "")
    torch_ms = f"{ref['best_ms']:.0f} / {ref['median_ms']:.0f}"
    if pea is None:
        row = f"| {name} | {shape} | {adapter} | — | {torch_ms} | — | — | {mb(ref['peak_rss_mb'])} | — |"
    else:
        row = (f"| {name} | {shape} | {adapter} | {pea['best_ms']:.0f} / {pea['median_ms']:.0f} | {torch_ms} "
               f"| {ratio(pea['best_ms'], ref['best_ms'])} | {mb(pea['peak_rss_mb'])} | {mb(ref['peak_rss_mb'])} "
               f"| {ratio(pea['peak_rss_mb'], ref['peak_rss_mb'])} |")

    baseline = torch_baseline_rss(args.python, args.threads) if args.device == "cpu" else None
    print(header)
    print(row)
    if pea is None:
        print("\n(pea side missing: the binary was absent or `pea bench train-step` failed; torch side only)")
    if baseline:
        print(f"\n(torch's runtime alone, imported with no model: {baseline:.0f} MB peak RSS)")

    if args.write:
        command = "python3 " + " ".join(shlex.quote(a) for a in sys.argv)
        # One section per device, precision and UNet family, so an fp16 run does not replace the fp32 figures
        # and an SDXL run does not replace the SD1.5 ones.
        family = SDXL_SUFFIX if sdxl else ""
        if args.gradient_checkpointing != "none":
            family += f", gradient checkpointing: {args.gradient_checkpointing}"
        section_name = (f"{CUDA_SECTION}{family}, {args.precision}" if args.device == "cuda"
                        else f"{SECTION}{family}")
        section = "\n".join([
            section_name,
            "",
            f"- date: {datetime.date.today().isoformat()}",
            (f"- device: {ref.get('gpu')} (pea --backend cuda --precision {args.precision})" if args.device == "cuda"
             else f"- machine: {machine_description()}; {args.threads} threads on both sides"),
            f"- reference: torch {ref['torch']}, diffusers {ref['diffusers']}; frozen UNet in {args.precision}, "
            "adapter and AdamW state in float32, default (SDPA) attention" + (", TF32 off" if args.device == "cuda" else ""),
            f"- step: teacher forward (no_grad) + student forward with feature hooks on every block, task + logits + "
            f"0.1 × feature MSE, backward into the adapter, AdamW(lr 1e-5, wd 0.1) step; context length "
            f"{args.context_length}; {ref['adapter_params']:,} adapter parameters",
            *([f"- gradient checkpointing ({args.gradient_checkpointing}): pea `--gradient-checkpointing` (every resnet "
               "and transformer block recomputed in the backward pass) / diffusers' `unet.enable_gradient_checkpointing()`"]
              if args.gradient_checkpointing != "none" else []),
            *([f"- SDXL: the SDXL adapter form (stack to {out_width}, fc → {cross}, pooled = mean over tokens); "
               f"added_cond_kwargs time_ids ({height * 8}, {width * 8}, 0, 0, {height * 8}, {width * 8}), the "
               "student's text_embeds the pooled output on the conditional states (never switched by the uncond "
               "mask), the teacher's random"] if sdxl else []),
            f"- timing: one warm-up step, then {repeats} timed; best / median of those"
            + ("; CUDA events around each step; memory is each side's device peak" if args.device == "cuda" else
               "; peak RSS is each side's own process (os.wait4 ru_maxrss), runtime included"
               + (f" (torch's runtime alone, imported with no model: {baseline:.0f} MB)" if baseline else "")),
            "- configs: benchmarks/configs/ (published UNet configs, random weights; see its README)",
            f"- command: `{command}`",
            *(["- pea side missing: the binary was absent or `pea bench train-step` failed"] if pea is None else []),
            "",
            header,
            row,
            "",
        ])
        write_section(args.write, section_name, section)
        print(f"\nwrote {args.write}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a UNet config.json (default: benchmarks/configs/sd15_unet.json; with "
                                         "--dry-run the tiny SD1 and SDXL UNets of Tests/Fixtures, one after the other)")
    parser.add_argument("--latent", help="latent H×W, e.g. 64x64 (default: 64x64; 8x8 with --dry-run)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default: %(default)s)")
    parser.add_argument("--adapter", help="adapter widths Din,hidden,…,out; out is the UNet's cross_attention_dim, "
                                          "or for an SDXL UNet the pooled width P (fc then maps P to "
                                          "cross_attention_dim) (default: 1024,2048,2048,768 for SD1.5, "
                                          "1024,2048,2048,1280 for SDXL; 12,20,20,16 with --dry-run)")
    parser.add_argument("--context-length", type=int, default=77, help="tokens per prompt (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both sides (default: %(default)s)")
    parser.add_argument("--repeats", type=int, help="timed steps per side, after one warm-up (default: 3; 2 with --dry-run)")
    parser.add_argument("--pea", default=".build/release/pea", help="the pea binary (default: %(default)s)")
    parser.add_argument("--python", default=DEFAULT_PYTHON if os.path.exists(DEFAULT_PYTHON) else sys.executable,
                        help="a Python with torch and diffusers for the torch side (default: %(default)s)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both sides run (default: %(default)s)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                        help="storage dtype of the frozen UNet and its activations; fp16/bf16 need --device cuda "
                             "(default: %(default)s)")
    parser.add_argument("--lib", help="the CUDA library pea loads (PEA_CUDA_LIB), e.g. .build-cuda/libpea_cuda.so")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the script quickly: the tiny SD1 and SDXL UNets of Tests/Fixtures (or --config), "
                             "latent 8x8, adapter 12,20,20,16 (SDXL: fc → 32)")
    parser.add_argument("--gradient-checkpointing", choices=["none", "pea", "torch", "both"], default="none",
                        help="which side recomputes its resnets and transformer blocks in the backward pass instead "
                             "of keeping their activations (default: %(default)s)")
    parser.add_argument("--write", metavar="RESULTS.md", help="record the table in this markdown file")
    args = parser.parse_args()
    if args.device == "cpu" and args.precision != "fp32":
        sys.exit("train_step_vs_torch.py: --precision fp16/bf16 needs --device cuda")
    if args.dry_run and args.write:
        sys.exit("train_step_vs_torch.py: --dry-run results are not recorded; drop --write")
    configs = [args.config] if args.config else (DRY_RUN_CONFIGS if args.dry_run else [DEFAULT_CONFIG])
    latent = args.latent or ("8x8" if args.dry_run else "64x64")
    repeats = args.repeats if args.repeats is not None else (2 if args.dry_run else 3)
    found = re.fullmatch(r"(\d+)[x×](\d+)", latent)
    if not found:
        sys.exit(f"train_step_vs_torch.py: --latent must look like 64x64, got '{latent}'")
    height, width = int(found.group(1)), int(found.group(2))
    if repeats < 1 or args.batch < 1 or args.threads < 1 or args.context_length < 1:
        sys.exit("train_step_vs_torch.py: --repeats, --batch, --threads and --context-length must be at least 1")
    if args.adapter:
        parse_widths(args.adapter)
    check = subprocess.run([args.python, "-c", "import torch, diffusers"], capture_output=True, text=True)
    if check.returncode != 0:
        sys.exit(f"train_step_vs_torch.py: {args.python} cannot import torch and diffusers (run 'make fixtures' to "
                 f"create tools/reference/.venv, or pass --python):\n{check.stderr.strip()}")
    for i, config in enumerate(configs):
        if i:
            print()
        run_config(args, config, height, width, repeats)


if __name__ == "__main__":
    main()
