"""Trains the toy world's English teacher with torch + diffusers and saves it as an SD1-format pipeline folder.

    tools/reference/.venv/bin/python tools/toyworld/train_teacher.py --out models/toyworld

The folder stands in for SD1.5: AutoencoderKL (3 levels, 64×64 pixels → 16×16×4 latents), UNet2DConditionModel
(3 levels, cross-attention on the first two and the mid block, ε-prediction, DDPM scaled_linear 0.00085–0.012),
a CLIP text encoder with CLIP's real BPE (its first --merges merges) trained jointly with the UNet, and a
DPM-Solver++ scheduler config. Weights are written in float16 (the bundled size); the float32 training state
goes to --state so that a run can be continued (--resume).

Stages: (1) the VAE on random drawings (MSE + 1e-6·KL); its scaling_factor is 1/std of the latents; (2) the
UNet and text encoder on a fixed pool of drawings (latents encoded once, a fresh sample of the latent
distribution each step), random English templates, 10% empty captions (classifier-free guidance), EMA weights
saved. Everything is seeded; torch's CPU kernels make reruns repeatable on one machine, not across machines.
"""

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "reference"))

import world  # noqa: E402
from make_tokenizer_fixtures import (clip_vocabulary, download_bpe_gz, read_bpe_gz, sd1_configs,  # noqa: E402
                                     write_configs, write_vocabulary)
from diffusers import (AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def make_pool(count_per_class, seed):
    """A fixed pool of drawings: uint8 [N, 64, 64, 3] and class indices [N]."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for index, (colour, shape) in enumerate(world.CLASSES):
        for _ in range(count_per_class):
            images.append(world.draw(colour, shape, *world.random_box(rng)))
            labels.append(index)
    return np.stack(images), np.array(labels)


def to_tensor(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def make_vae():
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64),
                         layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=world.SIZE)


def make_unet(cross_attention_dim):
    return UNet2DConditionModel(
        sample_size=world.SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=16)


def train_vae(vae, pool, steps, batch, lr, seed, log):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    pixels = to_tensor(pool)
    start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(0, len(pixels), (batch,), generator=generator)
        x = pixels[index]
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=generator)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean()          # summed over the latent, averaged over the batch
        loss = mse + 1e-6 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} mse {mse.item():.5f} kl {kl.item():.4f} {time.time() - start:.0f}s")


@torch.no_grad()
def encode_pool(vae, pool):
    means, logvars = [], []
    pixels = to_tensor(pool)
    for i in range(0, len(pixels), 256):
        dist = vae.encode(pixels[i:i + 256]).latent_dist
        means.append(dist.mean)
        logvars.append(dist.logvar)
    return torch.cat(means), torch.cat(logvars)


def ema_update(ema, model, decay):
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def captions(labels, rng, empty_probability):
    texts = []
    for label in labels:
        if rng.random() < empty_probability:
            texts.append("")
            continue
        colour, shape = world.CLASSES[label]
        texts.append(world.caption(colour, shape, int(rng.integers(len(world.TEMPLATES))))[0])
    return texts


def save_pipeline(out, vae, unet, text_encoder, tokenizer_dir, log):
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    scheduler = DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                            steps_offset=1)
    half = lambda module: copy.deepcopy(module).to(torch.float16)  # noqa: E731  (the f32 originals keep training)
    pipe = StableDiffusionPipeline(vae=half(vae), text_encoder=half(text_encoder), tokenizer=tokenizer, unet=half(unet),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    # The tokenizer as written by hand (SD1.x's legacy configs), not transformers' re-serialisation.
    for name in os.listdir(os.path.join(out, "tokenizer")):
        os.remove(os.path.join(out, "tokenizer", name))
    for name in os.listdir(tokenizer_dir):
        with open(os.path.join(tokenizer_dir, name), "rb") as src, open(os.path.join(out, "tokenizer", name), "wb") as dst:
            dst.write(src.read())
    log(f"saved {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models/toyworld")
    parser.add_argument("--state", default="/tmp/toyworld-teacher-state.pt", help="float32 training state (for --resume)")
    parser.add_argument("--resume", action="store_true", help="continue the UNet stage from --state")
    parser.add_argument("--bpe", help="bpe_simple_vocab_16e6.txt.gz (default: from PyPI's open_clip_torch wheel)")
    parser.add_argument("--merges", type=int, default=10000, help="CLIP merges kept in the vocabulary")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool-per-class", type=int, default=256)
    parser.add_argument("--vae-steps", type=int, default=900)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--unet-steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--lr-floor", type=float, default=0.1, help="the cosine decay ends at this fraction of --lr")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()

    def log(message):
        print(f"[{time.time() - t0:7.1f}s] {message}", flush=True)

    tokenizer_dir = os.path.join(os.path.dirname(args.state) or ".", "toyworld-tokenizer")
    bpe = read_bpe_gz(args.bpe) if args.bpe else download_bpe_gz()
    vocab, merges = clip_vocabulary(bpe, args.merges)
    write_vocabulary(tokenizer_dir, vocab, merges)
    write_configs(tokenizer_dir, sd1_configs())
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    for colour, shape in world.CLASSES:
        log(f"tokens of '{world.caption(colour, shape)[0]}': {tokenizer.tokenize(world.caption(colour, shape)[0])}") \
            if colour == "red" else None

    pool, labels = make_pool(args.pool_per_class, args.seed)
    log(f"pool: {len(pool)} drawings")
    text_config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                                 projection_dim=64, bos_token_id=vocab["<|startoftext|>"],
                                 eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])

    if args.resume:
        state = torch.load(args.state, weights_only=False)
        vae = make_vae(); vae.load_state_dict(state["vae"])
        scaling = state["scaling_factor"]
        vae.register_to_config(scaling_factor=scaling)
    else:
        vae = make_vae()
        train_vae(vae, pool, args.vae_steps, args.vae_batch, 1e-3, args.seed, log)
        state = None
    vae.eval().requires_grad_(False)
    mean, logvar = encode_pool(vae, pool)
    if state is None:
        generator = torch.Generator().manual_seed(args.seed + 1)
        sample = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
        scaling = float(1.0 / sample.std())
        vae.register_to_config(scaling_factor=scaling)
    log(f"latents {tuple(mean.shape)}, scaling_factor {scaling:.5f}")

    unet = make_unet(text_config.hidden_size)
    text_encoder = CLIPTextModel(text_config)
    if state is not None:
        unet.load_state_dict(state["unet"]); text_encoder.load_state_dict(state["text_encoder"])
    ema_unet = make_unet(text_config.hidden_size); ema_unet.load_state_dict(unet.state_dict())
    ema_text = CLIPTextModel(text_config); ema_text.load_state_dict(text_encoder.state_dict())
    if state is not None:
        ema_unet.load_state_dict(state["ema_unet"]); ema_text.load_state_dict(state["ema_text"])
    ema_unet.requires_grad_(False); ema_text.requires_grad_(False)
    log(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M parameters")

    noise_scheduler = DDPMScheduler(**BETAS)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.01)
    if state is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    rng = np.random.default_rng(args.seed + 2)
    generator = torch.Generator().manual_seed(args.seed + 3)
    warmup, start = args.warmup, time.time()
    done = state.get("step", 0) if state is not None else 0   # UNet steps of the runs before (--resume)
    unet.train(); text_encoder.train()
    for step in range(args.unet_steps):
        floor = args.lr_floor
        lr = args.lr * min(1.0, (step + 1) / max(warmup, 1)) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / args.unet_steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.from_numpy(rng.integers(0, len(pool), args.batch))
        latents = (mean[index] + torch.exp(0.5 * logvar[index]) * torch.randn(mean[index].shape, generator=generator)) * scaling
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (args.batch,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        ids = tokenizer(captions(labels[index.numpy()], rng, 0.1), padding="max_length", max_length=77,
                        truncation=True, return_tensors="pt").input_ids
        states = text_encoder(ids).last_hidden_state
        loss = F.mse_loss(unet(noisy, timesteps, states).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + done + step) / (10 + done + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        if step % 50 == 0 or step == args.unet_steps - 1:
            per_step = (time.time() - start) / (step + 1)
            log(f"unet step {step}/{args.unet_steps} (total {done + step}) loss {loss.item():.4f} lr {lr:.2e} "
                f"{per_step:.2f} s/step ETA {per_step * (args.unet_steps - step - 1) / 60:.1f} min")
        if (step + 1) % 500 == 0 or step == args.unet_steps - 1:
            torch.save({"vae": vae.state_dict(), "scaling_factor": scaling, "unet": unet.state_dict(),
                        "text_encoder": text_encoder.state_dict(), "ema_unet": ema_unet.state_dict(),
                        "ema_text": ema_text.state_dict(), "optimizer": optimizer.state_dict(), "step": done + step + 1},
                       args.state)
            save_pipeline(args.out, vae, ema_unet, ema_text, tokenizer_dir, log)
    log("done")


if __name__ == "__main__":
    main()
