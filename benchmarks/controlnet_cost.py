#!/usr/bin/env python3
"""What a ControlNet costs per denoising step, on the CPU: `pea generate` with and without `--controlnet` side by
side with diffusers' StableDiffusionPipeline and StableDiffusionControlNetPipeline, on the same folders.

The model: generate_throughput.py's SD1.5-architecture pipeline with random weights (built once in --work and
shared with that benchmark), and a ControlNet of the same architecture made by ControlNetModel.from_unet(its UNet)
(random too: speed does not depend on the values), saved beside it; the control image is a --size² PNG.

Per-step time, the same way on both sides: each configuration runs at 1 and at 3 steps (Euler, guidance 7.5, so
every step is one UNet — and one ControlNet — evaluation of a batch of 2), and the step time is
(T(3 steps) − T(1 step)) / 2, which leaves out loading, text encoding, VAE decoding and PNG writing.
pea: T is the "image: N steps in X s" line `pea generate` prints (the time around its generate call), one fresh
process per run; diffusers: one process, a warm-up call, then each pipe(...) call timed with time.perf_counter.
--threads T on both sides (pea --threads T; torch.set_num_threads(T) and OMP/MKL/OpenBLAS_NUM_THREADS=T).

Usage: python3 benchmarks/controlnet_cost.py --pea .build/release/pea [--size 256] [--write-results]
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys

from generate_throughput import DEFAULT_PYTHON, RESULTS, build_model
from results_file import write_section
from unet_vs_torch import last_json, machine_description, thread_env

SECTION = "## ControlNet cost per step vs diffusers"
PROMPT = "a photograph of an astronaut riding a horse"

# Runs in the reference Python: the ControlNet folder and the control image. Settings as JSON on stdin.
BUILD_CHILD = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
cfg = json.load(sys.stdin)
import numpy as np, torch
from PIL import Image
from diffusers import ControlNetModel, UNet2DConditionModel
torch.manual_seed(1)
unet = UNet2DConditionModel.from_pretrained(cfg["model"], subfolder="unet")
ControlNetModel.from_unet(unet).save_pretrained(cfg["controlnet"], safe_serialization=True)
y, x = np.mgrid[0:cfg["size"], 0:cfg["size"]]
edges = ((x + 2 * y) % 23 < 2) * 255
Image.fromarray(np.stack([edges] * 3, axis=-1).astype(np.uint8), "RGB").save(cfg["image"])
print(json.dumps({"ok": True}))
"""

# Runs in the reference Python: T(1 step) and T(3 steps) with and without the ControlNet, after a warm-up.
DIFFUSERS_CHILD = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
cfg = json.load(sys.stdin)
import torch, diffusers
diffusers.utils.logging.disable_progress_bar()
from diffusers import ControlNetModel, EulerDiscreteScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from diffusers.utils import load_image
torch.set_num_threads(cfg["threads"])
pipe = StableDiffusionPipeline.from_pretrained(cfg["model"], safety_checker=None, requires_safety_checker=False)
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
controlled = StableDiffusionControlNetPipeline(**pipe.components, controlnet=ControlNetModel.from_pretrained(cfg["controlnet"]))
controlled.set_progress_bar_config(disable=True)
image = load_image(cfg["image"])
def run(p, steps, **kw):
    t = time.perf_counter()
    with torch.inference_mode():
        p(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=cfg["size"], width=cfg["size"],
          generator=torch.Generator("cpu").manual_seed(0), output_type="np", **kw)
    return time.perf_counter() - t
PROMPT = cfg["prompt"]
run(pipe, 1)
result = {"torch": torch.__version__, "diffusers": diffusers.__version__}
for name, p, kw in (("without", pipe, {}), ("with", controlled, {"image": image})):
    result[name] = {str(steps): run(p, steps, **kw) for steps in (1, 3)}
print(json.dumps(result), flush=True)
"""


def run_pea(pea, model, controlnet, image, size, steps, threads, scratch):
    cmd = [pea, "generate", "--model", model, "--prompt", PROMPT, "--steps", str(steps), "--scheduler", "euler",
           "--guidance", "7.5", "--seed", "0", "--width", str(size), "--height", str(size), "--backend", "cpu",
           "--threads", str(threads), "--output", os.path.join(scratch, "pea.png")]
    if controlnet:
        cmd += ["--controlnet", controlnet, "--control-image", image]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads, hide_gpus=True))
    found = re.search(r"image: (\d+) steps in ([0-9.]+) s", proc.stderr)
    if proc.returncode != 0 or found is None:
        sys.exit(f"controlnet_cost.py: {' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr}")
    return float(found.group(2))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pea", default=".build/release/pea", help="the pea binary (default: %(default)s)")
    parser.add_argument("--python", default=DEFAULT_PYTHON if os.path.exists(DEFAULT_PYTHON) else sys.executable,
                        help="the reference Python with torch and diffusers (default: %(default)s)")
    parser.add_argument("--work", default=os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                                       "pea-bench", "generate_throughput"),
                        help="where the model folders are built and kept (default: %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="image width = height (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads on both sides (default: all CPUs)")
    parser.add_argument("--write-results", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    model, _ = build_model(args.python, args.work, False, 0)
    controlnet, image = model + "-controlnet", f"{model}-control-{args.size}.png"
    if not os.path.exists(os.path.join(controlnet, "config.json")) or not os.path.exists(image):
        settings = {"model": model, "controlnet": controlnet, "image": image, "size": args.size}
        subprocess.run([args.python, "-c", BUILD_CHILD], input=json.dumps(settings), text=True, check=True,
                       env=thread_env(args.threads, hide_gpus=True))

    scratch = os.path.join(args.work, "controlnet-scratch")
    os.makedirs(scratch, exist_ok=True)
    pea = {name: {steps: run_pea(args.pea, model, net, image, args.size, steps, args.threads, scratch) for steps in (1, 3)}
           for name, net in (("without", None), ("with", controlnet))}
    settings = {"model": model, "controlnet": controlnet, "image": image, "size": args.size, "threads": args.threads,
                "prompt": PROMPT}
    out = subprocess.run([args.python, "-c", DIFFUSERS_CHILD], input=json.dumps(settings), text=True, check=True,
                         capture_output=True, env=thread_env(args.threads, hide_gpus=True)).stdout
    reference = last_json(out)
    diffusers = {name: {int(k): v for k, v in reference[name].items()} for name in ("without", "with")}

    def per_step(times):
        return (times[3] - times[1]) / 2 * 1000

    rows = []
    for engine, times in (("pea", pea), ("diffusers", diffusers)):
        plain, control = per_step(times["without"]), per_step(times["with"])
        rows.append((engine, plain, control, control / plain))
    lines = ["| engine | ms/step without | ms/step with ControlNet | with / without |", "|---|---:|---:|---:|"]
    lines += [f"| {e} | {a:.0f} | {b:.0f} | {r:.2f} |" for e, a, b, r in rows]
    lines.append(f"| pea / diffusers | {rows[0][1] / rows[1][1]:.2f} | {rows[0][2] / rows[1][2]:.2f} | |")
    table = "\n".join(lines)
    print(table)
    if args.write_results:
        command = ("python3 benchmarks/controlnet_cost.py --pea " + args.pea + ("" if args.python == DEFAULT_PYTHON else " --python " + args.python)
                   + f" --size {args.size} --threads {args.threads} --write-results")
        section = "\n".join([
            SECTION, "",
            f"- date: {datetime.date.today().isoformat()}",
            f"- machine: {machine_description()}; {args.threads} threads on both sides; 1-minute load average "
            f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other work on the machine makes "
            "the per-step figures, differences of whole runs, noisy)",
            f"- reference: torch {reference['torch']}, diffusers {reference['diffusers']}, fp32",
            f"- model: SD1.5-architecture pipeline with random weights (generate_throughput.py's) and "
            f"ControlNetModel.from_unet of its UNet; {args.size}×{args.size}, Euler, guidance 7.5 (a batch of 2 per evaluation)",
            "- timing: per step = (T(3 steps) − T(1 step)) / 2 on both sides (pea: its \"steps in X s\" line, a fresh "
            "process per run; diffusers: pipe(...) calls after a warm-up)",
            f"- command: `{command}`", "", table, ""])
        write_section(RESULTS, SECTION, section)


if __name__ == "__main__":
    main()
