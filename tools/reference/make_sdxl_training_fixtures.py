#!/usr/bin/env python3
"""The reference for `pea train` on SDXL: a whole 5-step PEA distillation run (data stream, bucketing, random
crops, VAE latents, DDPM noising, teacher and student conditioning, the KD loss, clipping, AdamW and its lr
schedule) through the tiny diffusers pipeline of Tests/Fixtures/pipelines/sdxl, with the Chinese-CLIP tower of
Tests/Fixtures/pea/zh_encoder as the student encoder, by torch/diffusers/transformers in float64.

    tools/reference/.venv/bin/python tools/reference/make_sdxl_training_fixtures.py
(run after make_pipeline_fixtures.py and make_pea_pipeline_fixtures.py, which write the models it reads)

Writes, under --out (default Tests/Fixtures/training/sdxl):
  images/*.png              9 RGB 8-bit PNGs (Pillow, smooth random content): 4 landscape, 4 portrait, 1 near-square
  corpus.jsonl              the manifest, one {"image": "images/NAME.png", "text": <Chinese>, "text_en": <English>}
                            a line (image paths relative to the manifest); one caption has a character outside
                            the tiny encoder's vocabulary ([UNK])
  adapter_init.safetensors  the adapter before training, f32, official names: layernorm.{weight,bias} [16],
                            projector.{0,2,4}.weight [20,16] [20,20] [16,20] (bias-free, exact GELU between them),
                            fc.weight [32,16], fc.bias [32]  (16 = the pooled width the UNet's add_embedding wants,
                            64 − 6·8; 32 = cross_attention_dim)
  expected.safetensors      f32 unless said; for k = 1, …, 5:
                              step<k>.<official name>     the adapter after optimiser step k
                              loss.step<k>                [4] task, logits, features (unweighted), total — the
                                                          losses of step k, before its update
                              grad_norm.step<k>           [1] clip_grad_norm_'s return (the norm before clipping)
                              lr.step<k>                  [1] the lr step k used
                              debug.step<k>.records       int64 [B] the 0-based manifest lines of the batch
                              debug.step<k>.timesteps     int64 [B]
                              debug.step<k>.uncond        [B] 0/1
                              debug.step<k>.time_ids      [B,6]
                              debug.step<k>.noisy_latents [B,4,bh/2,bw/2]
                            metadata `fixture`: cases.json's content
  cases.json                the run as `pea train` flags (`flags`), the model/data paths (relative to
                            Tests/Fixtures), the batches, the library versions and how far a float32 run of the same
                            5 steps lands from the float64 reference (`float32_vs_float64`, per adapter tensor
                            after the last step: relative L2 and max abs)

The run (flags: buckets 24x16,20x20,16x24 (W x H), batch size 2, steps 5, seed 5, lr 1e-3, min lr 5e-8, warmup 1,
weight decay 0.1, max grad norm 0.05, uncond prob 0.5, noise offset 0.1, feature weight 0.1, task weight 1, random
crops, no hybrid):
  * RNG: SplitMix64 (the standard one; uniform() = float32((next() >> 40) · 2^-24)); uniform_below(n) rejects
    draws below (2^64 − n) mod n and returns v mod n.
  * Data: epoch e visits the records in a Fisher–Yates order (last = n−1 … 1, j = uniform_below(last+1)) drawn
    from SplitMix64(seed + e). Each image (Pillow, RGB, size W x H) goes to the bucket whose w/h is closest to
    W/H (first on ties); it is resized as the authors' custom_dataset_sdxl.py does — height to bh if
    int(W·bh/H) ≥ bw, else width to bw (Python int() of the true quotient), Pillow BILINEAR, untouched when the
    size is already right — then cropped to bw x bh at (left, top) with top = uniform_below(newH − bh + 1),
    left = uniform_below(newW − bw + 1) from SplitMix64(fnv1a64(the PNG file's bytes) XOR seed), then x/255 in
    float32 and (x − 0.5)/0.5, channels first. time_ids = [H, W, top, left, bh, bw] (diffusers' height-first
    order, not the authors' PIL order). One queue per bucket, emptied at the start of each epoch; a queue that
    reaches the batch size is the next batch (arrival order); what is left at the epoch's end is dropped.
  * Step k: torch.Generator("cpu").manual_seed(noise_seed(seed, k)) (a SplitMix64-style mix, below) draws, in f32,
    eps_latent [B,4,bh/2,bw/2], noise [B,4,bh/2,bw/2], offset [B,4,1,1]; noise += 0.1·offset. SplitMix64(seed XOR
    k·0x9E3779B97F4A7C15) draws B timesteps min(int(f32(u)·f32(1000)), 999) and then B flags uncond = u < 0.5.
    latents = (mean + exp(0.5·clamp(logvar, −30, 20))·eps_latent)·0.13025 from the VAE encoder's moments;
    noisy = DDPMScheduler(scheduler folder's betas).add_noise(latents, noise, t); the target is the noise.
  * Student: Chinese-CLIP last hidden state of `text` and of "" (BertTokenizer, max_length 52, padding,
    truncation, mask = ids ≠ pad) through the adapter; context = where(uncond, adapter("").sequence,
    adapter(text).sequence), text_embeds = adapter(text).pooled always. Teacher: both CLIP towers on `text_en`
    and "" (max_length 77), penultimate hidden states concatenated, text_encoder_2's text_embeds of the caption
    always; context switched the same way (the "" encoding, not zeros).
  * The frozen UNet gives ε̂_s and ε̂_t (no grad); loss = task + logits + 0.1·features exactly as
    make_kd_fixtures.py's kd_step (features: every down block's output[0], the mid block, every up block).
  * clip_grad_norm_(adapter, 0.05), torch.optim.AdamW (betas 0.9/0.999, eps 1e-8; weight decay 0.1 for the names
    without "bias", "LayerNorm.bias", "LayerNorm.weight", "layer_norm.", "layernorm.", else 0), lr from
    get_polynomial_decay_schedule_with_warmup(warmup 1, training steps 5, lr_end 5e-8, power 1), the scheduler
    stepped after every optimiser step. With warmup 1 step 1's lr is 0 (the adapter does not move; AdamW's
    moments do).

The reference runs every model cast to float64 (images computed in f32 as above, then cast; Gaussian draws in
f32, then cast); the adapter starts from the f32 values of adapter_init.safetensors. Expected values are stored
as f32. The script asserts the batches (one bucket each, the near-square image never batched, every resize and
nonzero crop range as planned), that the last step starts epoch 1 (4 landscape + 4 portrait records make 4 batches
per epoch), that clipping happens at a step whose lr is not 0 and that some batch mixes a dropped and a kept caption.
With seed 5: steps 2 and 5 are clipped, the uncond flags are [0,0], [1,1], [1,1], [1,0], [0,1]. --seed N reruns with another seed (for exploring; the fixture is seed 5).
Everything is seeded and single-threaded; a rerun writes the same bytes.
"""
import argparse
import json
import os
import shutil

# Fixtures are computed on the CPU; keep a CUDA build of torch from probing (and warning about) the driver.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import warnings

warnings.filterwarnings("ignore", message="CUDA initialization")

import numpy as np
import torch
import diffusers
import transformers
from PIL import Image
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import (BertTokenizer, ChineseCLIPTextModel, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPTokenizer, get_polynomial_decay_schedule_with_warmup)

from make_kd_fixtures import Adapter, FeatureHooks, kd_step
from make_model_fixtures import save_reproducible

diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.normpath(os.path.join(HERE, "..", "..", "Tests", "Fixtures"))
PIPELINE = "pipelines/sdxl"
STUDENT = "pea/zh_encoder"
REF = torch.float64
MASK64 = 2**64 - 1
GOLDEN = 0x9E3779B97F4A7C15

# The run, as `pea train` flags.
FLAGS = {"buckets": "24x16,20x20,16x24", "batch_size": 2, "steps": 5, "seed": 5, "lr": 1e-3, "min_lr": 5e-8,
         "warmup_steps": 1, "weight_decay": 0.1, "max_grad_norm": 0.05, "uncond_prob": 0.5, "noise_offset": 0.1,
         "feature_weight": 0.1, "task_weight": 1, "crop": "random"}
BUCKETS = [tuple(int(v) for v in b.split("x")) for b in FLAGS["buckets"].split(",")]  # (w, h)
NO_DECAY = ["bias", "LayerNorm.bias", "LayerNorm.weight", "layer_norm.", "layernorm."]
VAE_FACTOR = 2
STUDENT_MAX_LENGTH = 52
ADAPTER_WIDTHS, ADAPTER_FC = [16, 20, 20, 16], 32

# Manifest lines: name, (W, H), Chinese caption, English caption, and what the resize rule must give:
# the bucket (w, h) and the resized size, so that the crop ranges are as planned (most nonzero).
RECORDS = [
    ("cat_red", (60, 33), "红色的猫", "a red cat", (24, 16), (29, 16)),                 # left 0..5
    ("house_tall", (33, 60), "雪山下的小屋", "a small house below a snowy mountain", (16, 24), (16, 29)),  # top 0..5
    ("oil_wide", (50, 36), "一只猫，油画", "a cat, oil painting", (24, 16), (24, 17)),   # top 0..1
    ("square", (41, 39), "红色的小屋", "a red house", (20, 20), (21, 20)),             # never batched
    ("glasses", (36, 50), "戴着墨镜的猫", "a cat with sunglasses", (16, 24), (17, 24)),  # left 0..1
    ("mountain", (62, 38), "红色的雪山", "a red snowy mountain", (24, 16), (26, 16)),    # left 0..2
    ("dog", (38, 62), "雪山下的狗", "a dog below a snowy mountain", (16, 24), (16, 26)),  # 狗 is [UNK]; top 0..2
    ("house_oil", (45, 35), "小屋，油画", "a house, oil painting", (24, 16), (24, 18)),  # top 0..2
    ("portrait_oil", (35, 45), "戴着墨镜的红色猫，油画", "a red cat with sunglasses, oil painting", (16, 24), (18, 24)),
]
SQUARE = 3


# ------------------------------------------------------------------------------------------------ random numbers

class SplitMix64:
    def __init__(self, state):
        self.state = state & MASK64

    def next(self):
        self.state = (self.state + GOLDEN) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def uniform(self):
        return np.float32((self.next() >> 40) * 2.0**-24)


def uniform_below(bound, rng):
    threshold = (2**64 - bound) % bound
    while True:
        v = rng.next()
        if v >= threshold:
            return v % bound


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & MASK64
    return h


def noise_seed(seed, step):
    z = ((seed ^ (step * 0xD1B54A32D192ED03 % 2**64)) + GOLDEN) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) >> 32


# --------------------------------------------------------------------------------------------------------- data

def make_images(out):
    """Smooth random content (a coarse random grid upsampled bicubically) plus a little noise, so that a
    BILINEAR resize and the crop position both matter."""
    folder = os.path.join(out, "images")
    os.makedirs(folder)
    rng = np.random.RandomState(2052)  # picked so that 8 of the 9 crops land off 0
    lines = []
    for name, (w, h), text, text_en, _, _ in RECORDS:
        coarse = rng.randint(0, 256, size=(4, 5, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int32)
        pixels = np.clip(smooth + rng.randint(-12, 13, size=(h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(os.path.join(folder, name + ".png"))
        lines.append(json.dumps({"image": f"images/{name}.png", "text": text, "text_en": text_en},
                                ensure_ascii=False))
    with open(os.path.join(out, "corpus.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def load_sample(out, index, seed):
    """One record as the trainer prepares it: (bucket index, f32 tensor [3, bh, bw], time_ids, crop ranges)."""
    path = os.path.join(out, "images", RECORDS[index][0] + ".png")
    with open(path, "rb") as f:
        data = f.read()
    image = Image.open(path).convert("RGB")
    W, H = image.size
    bucket = min(range(len(BUCKETS)), key=lambda i: (abs(BUCKETS[i][0] / BUCKETS[i][1] - W / H), i))
    bw, bh = BUCKETS[bucket]
    if int(W * bh / H) >= bw:
        size = (int(W * bh / H), bh)
    else:
        size = (bw, int(H * bw / W))
    if size != (W, H):
        image = image.resize(size, Image.BILINEAR)
    new_w, new_h = size
    crop_rng = SplitMix64(fnv1a64(data) ^ seed)
    top = uniform_below(new_h - bh + 1, crop_rng)
    left = uniform_below(new_w - bw + 1, crop_rng)
    crop = np.asarray(image.crop((left, top, left + bw, top + bh)), dtype=np.uint8)
    x = torch.from_numpy(crop.copy()).permute(2, 0, 1).to(torch.float32) / 255.0
    x = (x - 0.5) / 0.5
    time_ids = [H, W, top, left, bh, bw]
    assert BUCKETS[bucket] == RECORDS[index][4] and size == RECORDS[index][5], (RECORDS[index], bucket, size)
    return {"record": index, "bucket": bucket, "pixels": x, "time_ids": time_ids,
            "ranges": (new_h - bh, new_w - bw)}


def batches(out, seed, batch_size, count):
    """The first `count` batches of the data stream (lists of samples), with the epoch each came from."""
    n = len(RECORDS)
    result = []
    epoch = 0
    while len(result) < count:
        order = list(range(n))
        rng = SplitMix64(seed + epoch)
        for last in range(n - 1, 0, -1):
            j = uniform_below(last + 1, rng)
            order[last], order[j] = order[j], order[last]
        queues = [[] for _ in BUCKETS]
        for index in order:
            sample = load_sample(out, index, seed)
            queue = queues[sample["bucket"]]
            queue.append(sample)
            if len(queue) == batch_size:
                result.append((epoch, list(queue)))
                queue.clear()
                if len(result) == count:
                    return result
        epoch += 1  # leftovers dropped
    return result


# ------------------------------------------------------------------------------------------------------- models

def make_adapter(path):
    """Default torch init from a seeded generator, the layernorm moved off 1/0, fc's bias made nonzero; f32."""
    torch.manual_seed(55)
    adapter = Adapter(ADAPTER_WIDTHS, ADAPTER_FC)
    generator = torch.Generator().manual_seed(56)
    with torch.no_grad():
        adapter.layernorm.weight.copy_(1 + 0.3 * torch.randn(ADAPTER_WIDTHS[0], generator=generator))
        adapter.layernorm.bias.copy_(0.2 * torch.randn(ADAPTER_WIDTHS[0], generator=generator))
        for p in adapter.projector.parameters():
            p.mul_(1.5)
        adapter.fc.bias.copy_(0.1 * torch.randn(ADAPTER_FC, generator=generator))
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, path)


def load_models():
    """Everything frozen, in f32 (cast per run)."""
    root = os.path.join(FIXTURES, PIPELINE)
    models = {
        "unet": UNet2DConditionModel.from_pretrained(os.path.join(root, "unet")),
        "vae": AutoencoderKL.from_pretrained(os.path.join(root, "vae")),
        "te1": CLIPTextModel.from_pretrained(os.path.join(root, "text_encoder")),
        "te2": CLIPTextModelWithProjection.from_pretrained(os.path.join(root, "text_encoder_2")),
    }
    student_dir = os.path.join(FIXTURES, STUDENT)
    student = ChineseCLIPTextModel.from_pretrained(student_dir, add_pooling_layer=False)
    # transformers 5 zeroes the padding row while loading; the file's values are the truth (PEA-METHOD.md).
    student.load_state_dict(load_file(os.path.join(student_dir, "model.safetensors")), strict=False)
    models["student"] = student
    for m in models.values():
        m.eval().requires_grad_(False)
    tokenizers = {"tok1": CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer")),
                  "tok2": CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer_2")),
                  "student": BertTokenizer.from_pretrained(student_dir)}
    scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    assert scheduler.config.prediction_type == "epsilon"
    return models, tokenizers, scheduler


def student_states(texts, models, tokenizers):
    tok = tokenizers["student"]
    ids = tok(texts, padding="max_length", max_length=STUDENT_MAX_LENGTH, truncation=True,
              return_tensors="pt").input_ids
    mask = (ids != tok.pad_token_id).to(torch.int64)
    return models["student"](input_ids=ids, attention_mask=mask).last_hidden_state


def teacher_states(texts, models, tokenizers):
    """diffusers' SDXL encode_prompt: penultimate hidden states of both towers side by side, text_encoder_2's
    projected pooled output."""
    states = []
    for tok, enc in (("tok1", "te1"), ("tok2", "te2")):
        t = tokenizers[tok]
        ids = t(texts, padding="max_length", max_length=t.model_max_length, truncation=True,
                return_tensors="pt").input_ids
        out = models[enc](ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        if enc == "te2":
            pooled = out.text_embeds
    return torch.cat(states, dim=-1), pooled


# -------------------------------------------------------------------------------------------------------- train

def decays(name):
    return not any(nd in name for nd in NO_DECAY)


def train(out, run_batches, models32, tokenizers, scheduler, dtype):
    """The steps in `dtype`; returns per step the adapter after it, losses, grad norm, lr and debug tensors."""
    models = {k: (m.to(dtype) if dtype != torch.float32 else m) for k, m in models32.items()}
    hooks = FeatureHooks(models["unet"])
    adapter = Adapter(ADAPTER_WIDTHS, ADAPTER_FC)
    adapter.load_state_dict(load_file(os.path.join(out, "adapter_init.safetensors")))
    adapter = adapter.to(dtype)
    named = list(adapter.named_parameters())
    groups = [{"params": [p for n, p in named if decays(n)], "weight_decay": FLAGS["weight_decay"]},
              {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=FLAGS["lr"], betas=(0.9, 0.999), eps=1e-8)
    lr_schedule = get_polynomial_decay_schedule_with_warmup(
        optimizer, num_warmup_steps=FLAGS["warmup_steps"], num_training_steps=FLAGS["steps"],
        lr_end=FLAGS["min_lr"], power=1.0)
    seed = FLAGS["seed"]
    steps = []
    for k, (_, batch) in enumerate(run_batches, start=1):
        b = len(batch)
        bw, bh = BUCKETS[batch[0]["bucket"]]
        lh, lw = bh // VAE_FACTOR, bw // VAE_FACTOR
        g = torch.Generator("cpu").manual_seed(noise_seed(seed, k))
        eps_latent = torch.randn([b, 4, lh, lw], generator=g).to(dtype)
        noise = torch.randn([b, 4, lh, lw], generator=g).to(dtype)
        offset = torch.randn([b, 4, 1, 1], generator=g).to(dtype)
        noise = noise + FLAGS["noise_offset"] * offset
        r = SplitMix64(seed ^ (k * GOLDEN & MASK64))
        timesteps = torch.tensor([min(int(r.uniform() * np.float32(1000.0)), 999) for _ in range(b)],
                                 dtype=torch.int64)
        uncond = torch.tensor([float(r.uniform() < np.float32(FLAGS["uncond_prob"])) for _ in range(b)])
        time_ids = torch.tensor([s["time_ids"] for s in batch], dtype=torch.float32).to(dtype)

        with torch.no_grad():
            pixels = torch.stack([s["pixels"] for s in batch]).to(dtype)
            dist = models["vae"].encode(pixels).latent_dist
            logvar = torch.clamp(dist.logvar, -30.0, 20.0)
            latents = (dist.mean + torch.exp(0.5 * logvar) * eps_latent) * models["vae"].config.scaling_factor
            noisy = scheduler.add_noise(latents, noise, timesteps)
            texts = [RECORDS[s["record"]][2] for s in batch]
            texts_en = [RECORDS[s["record"]][3] for s in batch]
            s_cond = student_states(texts, models, tokenizers)
            s_uncond = student_states([""] * b, models, tokenizers)
            t_cond, t_pooled = teacher_states(texts_en, models, tokenizers)
            t_uncond, _ = teacher_states([""] * b, models, tokenizers)

        inputs = {"noisy_latents": noisy, "noise": noise, "timesteps": timesteps, "student_states": s_cond,
                  "student_states_uncond": s_uncond, "teacher_states": t_cond, "teacher_states_uncond": t_uncond,
                  "uncond_mask": uncond.to(dtype), "time_ids": time_ids, "teacher_text_embeds": t_pooled}
        losses, _ = kd_step(models["unet"], hooks, adapter, inputs, dtype)
        assert FLAGS["task_weight"] == 1 and FLAGS["feature_weight"] == 0.1  # kd_step's weights
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        norm = torch.nn.utils.clip_grad_norm_(adapter.parameters(), FLAGS["max_grad_norm"])
        lrs = {group["lr"] for group in optimizer.param_groups}
        assert len(lrs) == 1
        lr = lrs.pop()
        optimizer.step()
        lr_schedule.step()
        steps.append({
            "adapter": {n: p.detach().clone() for n, p in adapter.named_parameters()},
            "loss": torch.stack([losses[n].detach() for n in ("loss_task", "loss_logits", "loss_features", "loss")]),
            "grad_norm": float(norm), "clipped": float(norm) + 1e-6 > FLAGS["max_grad_norm"], "lr": lr,
            "timesteps": timesteps, "uncond": uncond, "time_ids": time_ids, "noisy_latents": noisy,
            "records": torch.tensor([s["record"] for s in batch], dtype=torch.int64),
        })
    hooks.remove()
    return steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(FIXTURES, "training", "sdxl"))
    parser.add_argument("--seed", type=int, default=FLAGS["seed"], help="the run's seed (the fixture uses 5)")
    args = parser.parse_args()
    FLAGS["seed"] = args.seed
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    make_images(args.out)
    make_adapter(os.path.join(args.out, "adapter_init.safetensors"))

    # The data stream, checked against the contract.
    run_batches = batches(args.out, FLAGS["seed"], FLAGS["batch_size"], FLAGS["steps"])
    # Four batches an epoch (the near-square record is left in its queue and dropped), so the last step starts
    # epoch 1.
    assert [epoch for epoch, _ in run_batches] == [0, 0, 0, 0, 1]
    for epoch, batch in run_batches:
        assert len(batch) == FLAGS["batch_size"]
        assert len({s["bucket"] for s in batch}) == 1
        assert all(s["record"] != SQUARE for s in batch)
    for index in range(len(RECORDS)):  # every record has a nonzero crop range (one of the two)
        sample = load_sample(args.out, index, FLAGS["seed"])
        assert max(sample["ranges"]) > 0, (index, sample["ranges"])
    described = [{"step": k, "epoch": e, "bucket": "%dx%d" % BUCKETS[b[0]["bucket"]],
                  "records": [s["record"] for s in b], "time_ids": [s["time_ids"] for s in b]}
                 for k, (e, b) in enumerate(run_batches, start=1)]
    for d in described:
        print(f"step {d['step']}: epoch {d['epoch']} bucket {d['bucket']} records {d['records']} "
              f"time_ids {d['time_ids']}")

    models, tokenizers, scheduler = load_models()
    ref = train(args.out, run_batches, models, tokenizers, scheduler, REF)
    f32 = train(args.out, run_batches, {k: m.to(torch.float32) for k, m in models.items()}, tokenizers, scheduler,
                torch.float32)

    # Clipping at a step that updates (step 1's lr is 0), and a batch mixing a dropped and a kept caption.
    assert any(s["clipped"] and s["lr"] > 0 for s in ref), [s["grad_norm"] for s in ref]
    assert any(0 < float(s["uncond"].sum()) < len(s["uncond"]) for s in ref), [s["uncond"].tolist() for s in ref]
    for k, (s, s32) in enumerate(zip(ref, f32), start=1):
        loss = ", ".join(f"{v:.6g}" for v in s["loss"].tolist())
        loss32 = ", ".join(f"{v:.6g}" for v in s32["loss"].tolist())
        print(f"step {k}: lr {s['lr']:.6g}; grad norm {s['grad_norm']:.6g} (f32 {s32['grad_norm']:.6g}), "
              f"clipped {s['clipped']}; timesteps {s['timesteps'].tolist()} uncond {s['uncond'].tolist()}; "
              f"losses [task, logits, features, total] f64 [{loss}] f32 [{loss32}]")
        assert torch.equal(s["timesteps"], s32["timesteps"]) and s["clipped"] == s32["clipped"]
    differences = {}
    for name, value in ref[-1]["adapter"].items():
        value32 = f32[-1]["adapter"][name].to(REF)
        delta = ((value32 - value).norm() / value.norm()).item()
        moved = ((value - ref[0]["adapter"][name]).norm() / value.norm()).item()
        worst = (value32 - value).abs().max().item()
        differences[name] = {"rel_l2": float(f"{delta:.1e}"), "max_abs": float(f"{worst:.1e}")}
        print(f"float32 vs float64 after step {FLAGS['steps']}, {name}: rel L2 {delta:.2e}, max abs {worst:.2e} "
              f"(training moved it by rel L2 {moved:.2e})")

    versions = {"diffusers": diffusers.__version__, "torch": torch.__version__.split("+")[0],
                "transformers": transformers.__version__}
    cases = {"flags": FLAGS, "pipeline": PIPELINE, "student": STUDENT, "adapter": "training/sdxl/adapter_init.safetensors",
             "manifest": "training/sdxl/corpus.jsonl", "expected": "training/sdxl/expected.safetensors",
             "batches": described, "float32_vs_float64": differences, "versions": versions}
    text = json.dumps(cases, indent=1, sort_keys=True, ensure_ascii=False)
    with open(os.path.join(args.out, "cases.json"), "w", encoding="utf-8") as f:
        f.write(text + "\n")

    tensors = {}
    for k, s in enumerate(ref, start=1):
        for name, value in s["adapter"].items():
            tensors[f"step{k}.{name}"] = value.to(torch.float32).contiguous()
        tensors[f"loss.step{k}"] = s["loss"].to(torch.float32)
        tensors[f"grad_norm.step{k}"] = torch.tensor([s["grad_norm"]], dtype=torch.float32)
        tensors[f"lr.step{k}"] = torch.tensor([s["lr"]], dtype=torch.float32)
        tensors[f"debug.step{k}.timesteps"] = s["timesteps"]
        tensors[f"debug.step{k}.uncond"] = s["uncond"].to(torch.float32)
        tensors[f"debug.step{k}.time_ids"] = s["time_ids"].to(torch.float32).contiguous()
        tensors[f"debug.step{k}.noisy_latents"] = s["noisy_latents"].to(torch.float32).contiguous()
        tensors[f"debug.step{k}.records"] = s["records"]
    path = os.path.join(args.out, "expected.safetensors")
    save_reproducible(tensors, path, {"fixture": json.dumps(cases, sort_keys=True, ensure_ascii=False)})
    back = load_file(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)

    total = sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(args.out) for n in names)
    print(f"wrote {len(RECORDS)} images, corpus.jsonl, adapter_init, expected ({len(tensors)} tensors) and "
          f"cases.json ({total / 1024:.0f} KiB) to {args.out}")


if __name__ == "__main__":
    main()
