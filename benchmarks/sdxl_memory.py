#!/usr/bin/env python3
"""SDXL on a 16 GB machine (issue #24 item 3): the peak resident memory of `pea generate` on a full-size SDXL base
pipeline at 1024×1024 on the CPU, with half-size weights (`--weights bf16`) and without.

The pipeline is built once (cached in --work, default /tmp/pea-sdxl-random) from the published SDXL base 1.0
configs in benchmarks/configs/ (sdxl_*.json; provenance in its README) with random weights, saved in float16 as
the published checkpoints are (fp16 variant): diffusers' UNet2DConditionModel and AutoencoderKL.from_config,
transformers' CLIPTextModel / CLIPTextModelWithProjection from their configs. The tokenizers are the small test
CLIP tokenizers (Tests/Fixtures/tokenizers): the vocabulary does not change the memory (the embedding tables have
the published 49408 rows either way). Memory is the pea process's own peak RSS (os.wait4 ru_maxrss): everything
loaded, the text encoders, the UNet on a batch of 2 (classifier-free guidance) at a 128×128 latent, the VAE decode
at 1024×1024. Speed does not matter here (--steps 1 by default).

    python3 benchmarks/sdxl_memory.py [--pea .build/release/pea] [--weights bf16,f32] [--steps 1] [--threads 2]
            [--work /tmp/pea-sdxl-random] [--python tools/reference/.venv/bin/python] [--write benchmarks/RESULTS.md]

Needs about 8 GB of disk for the folder and, to build it, a Python with torch, diffusers and transformers (the
reference venv) and about 12 GB of memory.
"""
import argparse
import datetime
import os
import shlex
import shutil
import subprocess
import sys
import time

from results_file import write_section

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIGS = os.path.join(HERE, "configs")
DEFAULT_PYTHON = os.path.join(ROOT, "tools", "reference", ".venv", "bin", "python")
SECTION = "## SDXL on a 16 GB machine (CPU, 1024×1024)"

BUILD = r"""
import json, os, shutil, sys, torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
configs, tokenizers, out = sys.argv[1:4]
torch.manual_seed(0)
def load(name):
    with open(os.path.join(configs, name)) as f:
        return json.load(f)
os.makedirs(out, exist_ok=True)
for sub, name in (("unet", "sdxl_unet.json"), ("vae", "sdxl_vae.json")):
    cls = UNet2DConditionModel if sub == "unet" else AutoencoderKL
    model = cls.from_config(load(name)).to(torch.float16)
    model.save_pretrained(os.path.join(out, sub), safe_serialization=True)
    del model
for sub, name, cls in (("text_encoder", "sdxl_text_encoder.json", CLIPTextModel),
                       ("text_encoder_2", "sdxl_text_encoder_2.json", CLIPTextModelWithProjection)):
    model = cls(CLIPTextConfig.from_dict(load(name))).to(torch.float16)
    model.save_pretrained(os.path.join(out, sub), safe_serialization=True)
    del model
os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
shutil.copy(os.path.join(configs, "sdxl_scheduler.json"), os.path.join(out, "scheduler", "scheduler_config.json"))
shutil.copy(os.path.join(configs, "sdxl_model_index.json"), os.path.join(out, "model_index.json"))
for sub, source in (("tokenizer", "clip_small"), ("tokenizer_2", "clip_small_pad0")):
    shutil.copytree(os.path.join(tokenizers, source), os.path.join(out, sub), dirs_exist_ok=True)
"""


def build(python, work):
    marker = os.path.join(work, ".complete")
    if os.path.exists(marker):
        return
    shutil.rmtree(work, ignore_errors=True)
    print(f"building the random SDXL pipeline in {work} ...", file=sys.stderr, flush=True)
    tokenizers = os.path.join(ROOT, "Tests", "Fixtures", "tokenizers")
    result = subprocess.run([python, "-c", BUILD, CONFIGS, tokenizers, work])
    if result.returncode != 0:
        sys.exit("sdxl_memory.py: building the pipeline failed")
    open(marker, "w").close()


def measure(pea, work, weights, steps, threads, output):
    """Peak RSS in MB of one `pea generate` run, as the only child of a small wrapper (os.wait4's ru_maxrss)."""
    cmd = [pea, "generate", "--model", work, "--prompt", "a lighthouse on a cliff at dusk", "--seed", "1",
           "--steps", str(steps), "--width", "1024", "--height", "1024", "--backend", "cpu", "--threads", str(threads),
           "--weights", weights, "--output", output]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, stderr, usage.ru_maxrss / 1024, time.time() - start, cmd


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pea", default=os.path.join(ROOT, ".build", "release", "pea"))
    parser.add_argument("--python", default=DEFAULT_PYTHON if os.path.exists(DEFAULT_PYTHON) else sys.executable)
    parser.add_argument("--work", default="/tmp/pea-sdxl-random")
    parser.add_argument("--weights", default="bf16,f32", help="comma-separated pea --weights modes, one row each")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", metavar="RESULTS.md")
    args = parser.parse_args()
    build(args.python, args.work)
    total = sum(os.path.getsize(os.path.join(r, n)) for r, _, names in os.walk(args.work) for n in names)
    rows = []
    for mode in args.weights.split(","):
        output = os.path.join(args.work, f"out-{mode}.png")
        print(f"pea generate --weights {mode} ...", file=sys.stderr, flush=True)
        rc, stderr, rss, seconds, cmd = measure(args.pea, args.work, mode, args.steps, args.threads, output)
        if rc != 0:
            sys.exit(f"sdxl_memory.py: '{' '.join(cmd)}' failed (exit {rc}):\n{stderr}")
        rows.append(f"| {mode} | {rss / 1024:.1f} | {'yes' if rss <= 16 * 1024 else 'no'} | {seconds:.0f} |")
    table = "\n".join(["| pea --weights | peak RSS GB | ≤ 16 GB | wall s |", "|---|---:|:---:|---:|", *rows])
    print(table)
    if args.write:
        command = "python3 " + " ".join(shlex.quote(a) for a in sys.argv)
        section = "\n".join([
            SECTION, "",
            f"- date: {datetime.date.today().isoformat()}; {os.cpu_count()} online CPUs, {args.threads} threads",
            "- model: SDXL base 1.0's published configs (benchmarks/configs/sdxl_*.json) with random weights saved in "
            f"float16 ({total / 1e9:.1f} GB on disk); `pea generate --width 1024 --height 1024 --steps {args.steps}` "
            "(guidance 7.5: the UNet runs on a batch of 2), default scheduler, VAE in f32",
            "- memory: the pea process's own peak RSS (os.wait4 ru_maxrss), everything loaded and run",
            f"- command: `{command}`",
            "", table, "",
        ])
        write_section(args.write, SECTION, section)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
