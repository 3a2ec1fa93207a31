#!/usr/bin/env python3
"""Text-to-image throughput: `pea generate --prompts FILE` side by side with diffusers' StableDiffusionPipeline on
the same prompt list, each at its best batch size, on the CPU (default) or on a CUDA GPU (--device cuda).

The model: an SD1.5-architecture pipeline with random weights (speed does not depend on the values), built once
with torch.manual_seed(--model-seed) and saved as a diffusers folder (safetensors) under --work, so that both
engines load the identical folder:
  - unet/: benchmarks/configs/sd15_unet.json (the published SD1.5 UNet config);
  - vae/: SD1.5's published vae/config.json (AutoencoderKL, block_out_channels 128, 256, 512, 512; spelled out
    below as SD15_VAE, since benchmarks/configs holds UNet configs only);
  - text_encoder/: a CLIPTextModel of SD1.5's shape (openai/clip-vit-large-patch14's text tower: 12 layers,
    width 768, 12 heads, quick_gelu, vocab 49408, 77 positions);
  - tokenizer/: Tests/Fixtures/tokenizers/clip_small. The repository has no full-size CLIP vocabulary among its
    fixtures; clip_small is CLIP's byte-level BPE with a 3,514-token vocabulary (3,000 merges). Every id it
    produces is a valid row of the 49408-row embedding, and every prompt is padded to 77 tokens as SD1.5 does,
    so the text encoder does exactly SD1.5's work; only the (negligible) tokenisation differs from the real one;
  - scheduler/: SD1.5's PNDMScheduler config (PLMS, skip_prk_steps), used by both engines.

Settings: CPU 256×256, 10 steps, guidance 7.5, fp32, --threads T on both sides (pea --threads T,
torch.set_num_threads(T) and OMP/MKL/OpenBLAS_NUM_THREADS=T; default: every online CPU). GPU (--device cuda):
512×512, 30 steps, guidance 7.5, fp16 on both sides (pea --backend cuda --precision fp16 --device --gpu;
diffusers torch_dtype=torch.float16 on cuda:--gpu, TF32 off). Item i of the list gets seed --seed + i on both
sides (pea: its default for items without a seed; diffusers: one torch.Generator("cpu").manual_seed(seed + i)
per image, i.e. the same initial noise). Both write every image as a PNG (pea also its results.jsonl).

How images/s is measured (the same way on both sides): steady-state throughput, excluding process start, model
load and the first batch (warm-up: allocator growth, lazy initialisation, cuDNN/cuBLAS heuristics):
  - for batch size B the list is the first max(--prompts, 2·B) prompts, rounded up to a multiple of B, so that
    every batch is full and at least one batch follows the first;
  - pea runs twice per batch size, each a fresh process timed by its wall clock here: once on the whole list
    (T_all) and once on its first B prompts (T_first = start + load + one batch). images/s = (n − B) /
    (T_all − T_first). This depends only on pea's command line, not on how it splits or reports time; the sum of
    the "seconds" fields of its results.jsonl is printed beside it as a cross-check, not used;
  - diffusers runs in its own subprocess per batch size, which times from_pretrained(...).to(device) and each
    pipe(...) call (PNG writing included, around torch.cuda.synchronize() on a GPU) with time.perf_counter;
    images/s = (n − B) / (the sum of the batch times after the first).
The table also shows each run's whole wall time and its "start + load + first batch" time (pea: T_first;
diffusers: from the child's first line to the end of its first batch, plus the load time on its own).

How memory is measured: peak RSS of each process on its own, the ru_maxrss that os.wait4 reports for that child
(weights, activations and the runtime itself: the pea binary on one side, Python + torch + diffusers on the
other); for pea it is the whole-list run's. On a GPU, in addition, the device memory: each child's used_memory
as `nvidia-smi --query-compute-apps` reports it, sampled every 0.25 s while the child runs (CUDA context,
caching allocators' reserve and all; the same figure for both engines; "—" without nvidia-smi), and for diffusers
torch.cuda.max_memory_allocated (tensors only). pea generate reports no device peak of its own.

    python3 benchmarks/generate_throughput.py [--engines pea,diffusers] [--prompts 4] [--batch-sizes 1,2,4]
            [--threads T] [--steps 10] [--size 256] [--seed 0] [--pea .build/release/pea]
            [--python tools/reference/.venv/bin/python] [--work DIR] [--write-results | --write RESULTS.md]
    python3 benchmarks/generate_throughput.py --device cuda [--precision fp16] [--gpu 0]
            [--lib .build-cuda/libpea_cuda.so] ...
    python3 benchmarks/generate_throughput.py --tiny --engines diffusers    # a quick check of the script

--tiny: the tiny SD1 configs of Tests/Fixtures/pipelines/sd1 (UNet, VAE and text encoder; random weights from
--model-seed, built the same way), 64×64, 2 steps, 2 prompts, batch sizes 1,2; nothing is written to RESULTS.md.
--write-results records the table in benchmarks/RESULTS.md (section "Generation throughput vs diffusers", or
"CUDA generation throughput vs diffusers, fp16"); --write PATH in another file.

The reference side needs a Python with torch, diffusers and transformers; by default the reference venv (`make
fixtures` creates it), which also builds the model folder (~4.3 GB in float32, kept in --work, default
$XDG_CACHE_HOME/pea-bench/generate_throughput, and reused while its settings are unchanged). Without a pea
binary, or when `pea generate` fails, the diffusers figures are still printed, saying so.
"""
import argparse
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from results_file import write_section
from unet_vs_torch import last_json, machine_description, thread_env

SECTION = "## Generation throughput vs diffusers"
CUDA_SECTION = "## CUDA generation throughput vs diffusers"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_PYTHON = os.path.join(ROOT, "tools", "reference", ".venv", "bin", "python")
RESULTS = os.path.join(HERE, "RESULTS.md")
UNET_CONFIG = os.path.join(HERE, "configs", "sd15_unet.json")
TOKENIZER = os.path.join(ROOT, "Tests", "Fixtures", "tokenizers", "clip_small")
TINY = os.path.join(ROOT, "Tests", "Fixtures", "pipelines", "sd1")

# runwayml/stable-diffusion-v1-5, vae/config.json (diffusers 0.6.0 file: only the keys that differ from the defaults).
SD15_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# SD1.5's text_encoder/config.json: openai/clip-vit-large-patch14's text tower.
SD15_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
    "projection_dim": 768, "vocab_size": 49408,
}
# SD1.5's scheduler/scheduler_config.json.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False,
}

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dawn",
    "a bowl of ramen on a wooden table, studio lighting",
    "an isometric illustration of a tiny island city",
    "a red fox sitting in fresh snow, telephoto",
    "a cup of coffee next to an open notebook, top view",
    "a futuristic train crossing a desert bridge at sunset",
    "an oil painting of a sailing ship in a storm",
    "a macro photo of a dragonfly on a leaf",
    "a cozy reading nook with a cat, warm light",
    "a snowy mountain village at night, long exposure",
    "a bowl of fruit in the style of a still life painting",
    "a robot watering plants in a greenhouse",
    "a street market in the rain, neon reflections",
    "a hot air balloon over a field of lavender",
    "a pencil sketch of an old oak tree",
]

# Runs in the reference Python: builds the random-weights pipeline folder. Settings as JSON on stdin.
# The children's common start: settings from stdin, torch/diffusers/transformers imported and quiet.
CHILD_PREAMBLE = r"""
import json, os, sys, warnings
warnings.filterwarnings("ignore")
cfg = json.load(sys.stdin)
import torch, diffusers, transformers
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
"""

BUILD_CHILD = CHILD_PREAMBLE + r"""
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
torch.manual_seed(cfg["seed"])
unet = UNet2DConditionModel.from_config(cfg["unet"])
vae = AutoencoderKL.from_config(cfg["vae"])
text_config = {k: v for k, v in cfg["text_encoder"].items() if k not in ("architectures", "model_type", "dtype")}
text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
tokenizer = CLIPTokenizer.from_pretrained(cfg["tokenizer"])
scheduler = PNDMScheduler.from_config(cfg["scheduler"])
pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
pipe.save_pretrained(cfg["out"], safe_serialization=True)
count = lambda m: sum(p.numel() for p in m.parameters())
print(json.dumps({"unet": count(unet), "vae": count(vae), "text_encoder": count(text_encoder),
                  "torch": torch.__version__, "diffusers": diffusers.__version__,
                  "transformers": transformers.__version__}), flush=True)
"""

# Runs in the reference Python, one process per batch size: loads the folder, generates the list batch by batch,
# prints one JSON result on stdout. Settings as JSON on stdin.
DIFFUSERS_CHILD = r"""
import time
T0 = time.perf_counter()
""" + CHILD_PREAMBLE + r"""
from diffusers import StableDiffusionPipeline
torch.set_num_threads(cfg["threads"])
device = torch.device(cfg["device"])
cuda = device.type == "cuda"
dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg["precision"]]
if cuda:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
def sync():
    if cuda:
        torch.cuda.synchronize(device)
t0 = time.perf_counter()
pipe = StableDiffusionPipeline.from_pretrained(cfg["model"], torch_dtype=dtype, safety_checker=None,
                                               requires_safety_checker=False).to(device)
pipe.set_progress_bar_config(disable=True)
sync()
load_s = time.perf_counter() - t0
prompts, b = cfg["prompts"], cfg["batch"]
batch_s, first_end = [], None
with torch.inference_mode():
    for start in range(0, len(prompts), b):
        chunk = prompts[start:start + b]
        generators = [torch.Generator("cpu").manual_seed(cfg["seed"] + start + j) for j in range(len(chunk))]
        sync()
        t0 = time.perf_counter()
        images = pipe(prompt=chunk, height=cfg["height"], width=cfg["width"], num_inference_steps=cfg["steps"],
                      guidance_scale=cfg["guidance"], generator=generators).images
        for j, image in enumerate(images):
            image.save(os.path.join(cfg["out"], f"{start + j:06d}.png"))
        sync()
        dt = time.perf_counter() - t0
        batch_s.append(dt)
        if first_end is None:
            first_end = time.perf_counter() - T0
        print(f"diffusers: batch {len(batch_s)} ({len(chunk)} images) {dt:.2f} s", file=sys.stderr, flush=True)
hwm = 0.0
with open("/proc/self/status") as f:
    for line in f:
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
print(json.dumps({
    "load_s": load_s, "batch_s": batch_s, "to_first_batch_end_s": first_end, "images": len(prompts), "vmhwm_mb": hwm,
    "device_allocated_mb": torch.cuda.max_memory_allocated(device) / 1048576 if cuda else None,
    "device_reserved_mb": torch.cuda.max_memory_reserved(device) / 1048576 if cuda else None,
    "gpu": torch.cuda.get_device_name(device) if cuda else None,
    "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
}), flush=True)
"""


class GpuPoller:
    """Samples `nvidia-smi --query-compute-apps=pid,used_memory` every `interval` s; keeps the peak for one pid."""

    def __init__(self, pid, interval=0.25):
        self.pid, self.interval, self.peak = pid, interval, None
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.SubprocessError):
                return
            for line in out.splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) == 2 and parts[0] == str(self.pid) and parts[1].isdigit():
                    self.peak = max(self.peak or 0, int(parts[1]))  # MiB
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()


def run_measured(cmd, stdin_text=None, env=None, poll_gpu=False):
    """Runs cmd with stdout captured and stderr passed through, as unet_vs_torch.run_child does. Returns (exit status,
    stdout, this child's own peak RSS in MB (os.wait4's ru_maxrss), wall seconds, nvidia-smi peak MiB or None)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, text=True, env=env)
    poller = GpuPoller(proc.pid) if poll_gpu else None
    if poller:
        poller.__enter__()
    try:
        if stdin_text is not None:
            proc.stdin.write(stdin_text)
            proc.stdin.close()
        out = proc.stdout.read()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    finally:
        if poller:
            poller.__exit__(None, None, None)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keeps Popen from waiting again
    return proc.returncode, out, usage.ru_maxrss / 1024, wall, poller.peak if poller else None


def prompt_list(count):
    return [PROMPTS[i % len(PROMPTS)] for i in range(count)]


def list_length(prompts, batch):
    """max(prompts, 2·batch), rounded up to a multiple of batch: full batches, and at least one after the first."""
    n = max(prompts, 2 * batch)
    return -(-n // batch) * batch


def build_model(python, work, tiny, seed):
    """The random-weights pipeline folder under work, built once per settings; returns (folder, build info)."""
    if tiny:
        def config(part, name):
            with open(os.path.join(TINY, part, name)) as f:
                return json.load(f)
        spec = {"unet": config("unet", "config.json"), "vae": config("vae", "config.json"),
                "text_encoder": config("text_encoder", "config.json"),
                "scheduler": config("scheduler", "scheduler_config.json")}
    else:
        with open(UNET_CONFIG) as f:
            spec = {"unet": json.load(f), "vae": SD15_VAE, "text_encoder": SD15_TEXT_ENCODER, "scheduler": SD15_SCHEDULER}
    spec.update(tokenizer=os.path.abspath(TOKENIZER), seed=seed)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(work, f"{'tiny-sd1' if tiny else 'sd15'}-random-{key}")
    marker = os.path.join(folder, "build.json")
    if os.path.exists(marker):
        with open(marker) as f:
            return folder, json.load(f)
    print(f"building the random-weights pipeline in {folder} ...", file=sys.stderr, flush=True)
    os.makedirs(work, exist_ok=True)
    staging = tempfile.mkdtemp(prefix="building-", dir=work)
    try:
        rc, out, _, wall, _ = run_measured([python, "-c", BUILD_CHILD], json.dumps(dict(spec, out=staging)),
                                           thread_env(os.cpu_count() or 1, hide_gpus=True))
        if rc != 0:
            sys.exit(f"generate_throughput.py: building the model failed (exit {rc}); see its messages above")
        info = dict(last_json(out), build_s=wall)
        with open(os.path.join(staging, "build.json"), "w") as f:
            json.dump(info, f)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder, info


def run_diffusers(python, model, prompts, batch, s, out):
    settings = json.dumps({"model": model, "prompts": prompts, "batch": batch, "seed": s.seed, "steps": s.steps,
                           "guidance": s.guidance, "width": s.size, "height": s.size, "threads": s.threads,
                           "device": f"cuda:{s.gpu}" if s.device == "cuda" else "cpu", "precision": s.precision,
                           "out": out})
    rc, stdout, rss, wall, smi = run_measured([python, "-c", DIFFUSERS_CHILD], settings,
                                              thread_env(s.threads, hide_gpus=s.device == "cpu"),
                                              poll_gpu=s.device == "cuda")
    if rc != 0:
        sys.exit(f"generate_throughput.py: the diffusers side failed at batch size {batch} (exit {rc}); "
                 "see its messages above")
    r = last_json(stdout)
    later = r["batch_s"][1:]
    return {"engine": "diffusers", "batch": batch, "images": len(prompts), "wall_s": wall,
            "first_s": r["to_first_batch_end_s"], "load_s": r["load_s"],
            "images_per_s": (len(prompts) - batch) / sum(later) if later and sum(later) > 0 else None,
            "peak_rss_mb": rss, "smi_mb": smi, "allocated_mb": r["device_allocated_mb"], "info": r}


def pea_command(pea, model, prompts_file, out, batch, s):
    cmd = [pea, "generate", "--model", model, "--prompts", prompts_file, "--output-dir", out, "--overwrite",
           "--batch-size", str(batch), "--seed", str(s.seed), "--steps", str(s.steps), "--guidance", str(s.guidance),
           "--width", str(s.size), "--height", str(s.size), "--threads", str(s.threads), "--precision", s.precision]
    if s.device == "cuda":
        cmd += ["--backend", "cuda", "--device", str(s.gpu)]
    else:
        cmd += ["--backend", "cpu"]
    return cmd


def results_seconds(out):
    """The sum of the "seconds" fields of pea's OUT/results.jsonl (a cross-check), or None."""
    try:
        with open(os.path.join(out, "results.jsonl")) as f:
            return sum(float(json.loads(line).get("seconds", 0)) for line in f if line.strip())
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def run_pea(pea, model, prompts, batch, s, scratch):
    """Returns pea's row, or None (after saying why) when it cannot run."""
    env = thread_env(s.threads)
    if s.device == "cuda" and s.lib:
        env["PEA_CUDA_LIB"] = os.path.abspath(s.lib)
    walls, rss, smi, seconds = {}, None, None, None
    for part, items in (("first", prompts[:batch]), ("all", prompts)):
        prompts_file = os.path.join(scratch, f"prompts-b{batch}-{part}.txt")
        with open(prompts_file, "w") as f:
            f.write("".join(p + "\n" for p in items))
        out = os.path.join(scratch, f"pea-b{batch}-{part}")
        shutil.rmtree(out, ignore_errors=True)
        cmd = pea_command(pea, model, prompts_file, out, batch, s)
        print(f"pea, batch size {batch}, {len(items)} prompts: {shlex.join(cmd)}", file=sys.stderr, flush=True)
        rc, _, peak, wall, gpu_peak = run_measured(cmd, env=env, poll_gpu=s.device == "cuda")
        if rc != 0:
            print(f"generate_throughput.py: pea generate failed (exit {rc}; a pea without prompt-file jobs?); "
                  "showing the diffusers side only", file=sys.stderr)
            return None
        walls[part] = wall
        if part == "all":
            rss, smi, seconds = peak, gpu_peak, results_seconds(out)
    steady = walls["all"] - walls["first"]
    return {"engine": "pea", "batch": batch, "images": len(prompts), "wall_s": walls["all"], "first_s": walls["first"],
            "load_s": None, "images_per_s": (len(prompts) - batch) / steady if steady > 0 else None,
            "peak_rss_mb": rss, "smi_mb": smi, "allocated_mb": None, "results_seconds": seconds}


def fmt(value, digits=0):
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "—"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="pea,diffusers", help="which sides to run (default: %(default)s)")
    parser.add_argument("--prompts", type=int, help="prompts in the list (default: 4; 16 with --device cuda; 2 with --tiny)")
    parser.add_argument("--batch-sizes", help="batch sizes to try on both sides (default: 1,2,4; 1,2 with --tiny)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads for both sides (default: every online CPU, %(default)s)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 10; 30 with --device cuda; 2 with --tiny)")
    parser.add_argument("--size", type=int, help="image width = height in pixels (default: 256; 512 with --device "
                                                 "cuda; 64 with --tiny)")
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="item i gets seed SEED + i (default: %(default)s)")
    parser.add_argument("--model-seed", type=int, default=0, help="torch.manual_seed of the random weights (default: %(default)s)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both sides run (default: %(default)s)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                        help="weights and activations (default: fp32 on the CPU, fp16 with --device cuda)")
    parser.add_argument("--gpu", type=int, default=0, help="with --device cuda: the GPU index (pea --device N, torch cuda:N)")
    parser.add_argument("--lib", help="the CUDA library pea loads (PEA_CUDA_LIB), e.g. .build-cuda/libpea_cuda.so")
    parser.add_argument("--tiny", action="store_true",
                        help="check the script quickly: the tiny SD1 configs of Tests/Fixtures, 64×64, 2 steps, 2 prompts")
    parser.add_argument("--pea", default=".build/release/pea", help="the pea binary (default: %(default)s)")
    parser.add_argument("--python", default=DEFAULT_PYTHON if os.path.exists(DEFAULT_PYTHON) else sys.executable,
                        help="a Python with torch, diffusers and transformers (default: %(default)s)")
    parser.add_argument("--work", default=os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                                       "pea-bench", "generate_throughput"),
                        help="where the model folder is built and kept (default: %(default)s)")
    parser.add_argument("--write-results", action="store_true", help="record the table in benchmarks/RESULTS.md")
    parser.add_argument("--write", metavar="RESULTS.md", help="record the table in this markdown file")
    s = parser.parse_args()
    prog = "generate_throughput.py"
    engines = [e.strip() for e in s.engines.split(",") if e.strip()]
    if not engines or any(e not in ("pea", "diffusers") for e in engines):
        sys.exit(f"{prog}: --engines takes pea, diffusers or both, got '{s.engines}'")
    cuda = s.device == "cuda"
    s.precision = s.precision or ("fp16" if cuda else "fp32")
    if not cuda and s.precision != "fp32":
        sys.exit(f"{prog}: --precision fp16/bf16 needs --device cuda")
    s.prompts = s.prompts or (2 if s.tiny else 16 if cuda else 4)
    s.steps = s.steps or (2 if s.tiny else 30 if cuda else 10)
    s.size = s.size or (64 if s.tiny else 512 if cuda else 256)
    try:
        batch_sizes = [int(b) for b in (s.batch_sizes or ("1,2" if s.tiny else "1,2,4")).split(",")]
    except ValueError:
        batch_sizes = []
    if not batch_sizes or min(batch_sizes) < 1:
        sys.exit(f"{prog}: --batch-sizes must look like 1,2,4, got '{s.batch_sizes}'")
    if s.prompts < 1 or s.steps < 1 or s.threads < 1 or s.size < 8 or s.size % 8:
        sys.exit(f"{prog}: --prompts, --steps and --threads must be at least 1, --size a positive multiple of 8")
    write = s.write or (RESULTS if s.write_results else None)
    if s.tiny and write:
        sys.exit(f"{prog}: --tiny results are not recorded; drop --write/--write-results")
    check = subprocess.run([s.python, "-c", "import torch, diffusers, transformers"], capture_output=True, text=True)
    if check.returncode != 0:
        sys.exit(f"{prog}: {s.python} cannot import torch, diffusers and transformers (run 'make fixtures' to create "
                 f"tools/reference/.venv, or pass --python):\n{check.stderr.strip()}")
    if "pea" in engines and not os.path.exists(s.pea):
        print(f"{prog}: {s.pea} not found (build it with 'make'); showing the diffusers side only", file=sys.stderr)
        engines.remove("pea")

    model, info = build_model(s.python, os.path.abspath(s.work), s.tiny, s.model_seed)
    params = (info["unet"] + info["vae"] + info["text_encoder"]) / 1e6
    print(f"model: {model} ({params:.1f}M parameters: UNet {info['unet'] / 1e6:.1f}M, VAE {info['vae'] / 1e6:.1f}M, "
          f"text encoder {info['text_encoder'] / 1e6:.1f}M)", file=sys.stderr, flush=True)

    rows, pea_missing = [], "pea" not in engines
    with tempfile.TemporaryDirectory(prefix="pea-throughput-") as scratch:
        for batch in batch_sizes:
            prompts = prompt_list(list_length(s.prompts, batch))
            if "pea" in engines:
                row = run_pea(s.pea, model, prompts, batch, s, scratch)
                if row is None:
                    engines.remove("pea")
                    pea_missing = True
                else:
                    rows.append(row)
            if "diffusers" in engines:
                out = os.path.join(scratch, f"diffusers-b{batch}")
                os.makedirs(out)
                print(f"diffusers, batch size {batch}, {len(prompts)} prompts ...", file=sys.stderr, flush=True)
                rows.append(run_diffusers(s.python, model, prompts, batch, s, out))

    ref = next((r["info"] for r in rows if r["engine"] == "diffusers"), None)
    device_cols = " | nvidia-smi peak MiB | torch max allocated MB" if cuda else ""
    header = ("| engine | batch | images | run wall s | start + load + first batch s | load s | images/s (steady) "
              f"| peak RSS MB{device_cols} |\n|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if cuda else ""))
    lines = []
    for r in rows:
        line = (f"| {r['engine']} | {r['batch']} | {r['images']} | {fmt(r['wall_s'], 1)} | {fmt(r['first_s'], 1)} "
                f"| {fmt(r['load_s'], 1)} | {fmt(r['images_per_s'], 3)} | {fmt(r['peak_rss_mb'])} |")
        if cuda:
            line += f" {fmt(r['smi_mb'])} | {fmt(r['allocated_mb'])} |"
        lines.append(line)
    best = {}
    for r in rows:
        if r["images_per_s"] and (r["engine"] not in best or r["images_per_s"] > best[r["engine"]]["images_per_s"]):
            best[r["engine"]] = r
    summary = []
    for engine in ("pea", "diffusers"):
        if engine in best:
            b = best[engine]
            summary.append(f"best {engine}: {b['images_per_s']:.3f} images/s at batch size {b['batch']} "
                           f"(peak RSS {b['peak_rss_mb']:.0f} MB"
                           + (f", nvidia-smi {fmt(b['smi_mb'])} MiB" if cuda else "") + ")")
    ratio_value = (best["pea"]["images_per_s"] / best["diffusers"]["images_per_s"]
                   if "pea" in best and "diffusers" in best else None)
    summary.append(f"images/s pea / diffusers (each at its best batch size): "
                   + (f"{ratio_value:.2f}×" if ratio_value else "—"))
    if "pea" in best and "diffusers" in best:
        summary.append(f"peak RSS pea / diffusers (at those batch sizes): "
                       f"{best['pea']['peak_rss_mb'] / best['diffusers']['peak_rss_mb']:.2f}")
    if cuda:
        summary.append("goal ≥ 1.5× diffusers' images/s: "
                       + (f"{ratio_value:.2f}× ({'met' if ratio_value >= 1.5 else 'not met'})" if ratio_value else "—"))
    cross = [f"batch {r['batch']}: {r['results_seconds']:.1f} s" for r in rows
             if r["engine"] == "pea" and r.get("results_seconds") is not None]

    print(header)
    for line in lines:
        print(line)
    print()
    for line in summary:
        print(line)
    if cross:
        print(f"(pea's results.jsonl \"seconds\" summed over the whole-list run, a cross-check: {'; '.join(cross)})")
    if pea_missing:
        print("(pea side missing: not asked for, the binary was absent or `pea generate` failed)")

    if write:
        command = "python3 " + " ".join(shlex.quote(a) for a in sys.argv)
        section_name = f"{CUDA_SECTION}, {s.precision}" if cuda else SECTION
        section = "\n".join([
            section_name,
            "",
            f"- date: {datetime.date.today().isoformat()}",
            (f"- device: {ref.get('gpu') if ref else 'GPU ' + str(s.gpu)} (pea --backend cuda --precision {s.precision})"
             if cuda else f"- machine: {machine_description()}; {s.threads} threads on both sides"),
            (f"- reference: torch {ref['torch']}, diffusers {ref['diffusers']}, StableDiffusionPipeline in "
             f"{s.precision}" + (", TF32 off" if cuda else "") if ref else "- reference: diffusers not run"),
            f"- model: SD1.5 architecture with random weights ({params:.0f}M parameters; benchmarks/configs/sd15_unet.json, "
            f"SD1.5's VAE and CLIP text encoder shapes, the clip_small tokenizer fixture), PNDM; {s.size}×{s.size}, "
            f"{s.steps} steps, guidance {s.guidance}; {s.prompts} prompts (at least two full batches per batch size)",
            "- images/s: steady state, excluding start, load and the first batch (pea: (n − B) / (wall of the whole "
            "list − wall of its first batch alone); diffusers: (n − B) / the batch times after the first); peak RSS "
            "is each process's own (os.wait4 ru_maxrss), runtime included"
            + ("; nvidia-smi: each process's used_memory, sampled every 0.25 s" if cuda else ""),
            f"- command: `{command}`",
            *(["- pea side missing: the binary was absent or `pea generate` failed"] if pea_missing else []),
            "",
            header,
            *lines,
            "",
            *[f"{line}  " for line in summary],
            "",
        ])
        write_section(write, section_name, section)
        print(f"\nwrote {write}")


if __name__ == "__main__":
    main()
