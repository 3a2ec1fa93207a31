#!/usr/bin/env python3
"""Image-to-image: what diffusers' StableDiffusionImg2ImgPipeline and StableDiffusionXLImg2ImgPipeline make from
the tiny pipelines of Tests/Fixtures/pipelines (read, never rewritten; run after make_pipeline_fixtures.py and
make_pea_pipeline_fixtures.py).

Writes, under --out (default Tests/Fixtures/img2img):
  init_32x24.png, init_24x32.png   the init images (RGB PNGs drawn here: gradients and a disc), already multiples
                                   of 8, so diffusers' VaeImageProcessor does not resize them
  init_32x24.jpg                   the first saved by Pillow as a JPEG (quality 90, 4:2:0): read through each
                                   side's JPEG decoder
  cases.json   per case: name, pipeline, init_image, prompt, negative_prompt (or null), steps, strength, guidance,
               seed, batch, scheduler (pea's name or null for the folder's own), adapter (PEA cases: the adapter
               file under Tests/Fixtures/pea, with pea/zh_encoder as the text encoder; else null), steps_run (the
               denoising steps diffusers' get_timesteps leaves), images
  <case>.safetensors  `images` [N, H, W, 3] int32 0…255, as make_pipeline_fixtures.py stores them
  add_noise.safetensors  each scheduler's `add_noise` as the img2img pipelines call it: `x0` and `noise` [2, 4, 2, 3]
               (seeded randn), and per case `out.<case>` = scheduler.add_noise(x0, noise, timesteps[k:k+1].repeat(2))
               after set_timesteps(steps) and set_begin_index(k) (where the scheduler has it); metadata `cases` (JSON):
               name, pipeline (whose scheduler/ config it is built from), scheduler (pea's name or null for the
               folder's own), steps, begin (k), timestep (timesteps[k])
The init image is read with diffusers.utils.load_image (PIL, converted to RGB) and passed as `image=`;
everything runs in float32 on the CPU with generator=torch.Generator("cpu").manual_seed(seed). The PEA case feeds
prompt_embeds / negative_prompt_embeds from the Chinese-CLIP tower and adapter as make_pea_pipeline_fixtures.py
does.
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from diffusers import (DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionXLImg2ImgPipeline)
from diffusers.utils import load_image

from make_multilingual_fixtures import ReferenceAdapter
from make_pea_pipeline_fixtures import adapted, load_encoder
from make_pipeline_fixtures import SCHEDULERS

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "..", "Tests", "Fixtures")


def init_image(width, height):
    """A smooth picture with an edge: colour gradients and a disc, so the VAE's latent has structure."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 255 * x / (width - 1)
    g = 255 * y / (height - 1)
    b = 128 + 100 * np.sin(x / 3) * np.cos(y / 4)
    disc = (x - width * 0.6) ** 2 + (y - height * 0.4) ** 2 < (min(width, height) * 0.3) ** 2
    r[disc], g[disc], b[disc] = 240, 200, 30
    pixels = np.clip(np.stack([r, g, b], axis=-1).round(), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


CASES = [
    # name, pipeline, init image, prompt, negative, steps, strength, guidance, seed, batch, scheduler, adapter
    ("sd1_euler_a_s05_batch", "sd1", "init_32x24.png", "a red fox in the snow", None, 4, 0.5, 7.5, 42, 2, "euler-a", None),
    ("sd1_euler_a_s08", "sd1", "init_32x24.png", "a red fox in the snow", "blurry", 5, 0.8, 6.0, 7, 1, "euler-a", None),
    ("sd1_dpmpp_s05", "sd1", "init_32x24.png", "mountains at dawn", None, 6, 0.5, 7.5, 3, 1, "dpmpp-2m", None),
    ("sd1_dpmpp_s08", "sd1", "init_32x24.png", "mountains at dawn", None, 5, 0.8, 5.0, 4, 1, "dpmpp-2m", None),
    # the folder's PNDM (its warm-up starting mid-schedule) and DDIM; 10 × 0.7 is 7.000000000000001 in double
    ("sd1_pndm_s05", "sd1", "init_32x24.png", "a lighthouse", None, 4, 0.5, 7.5, 5, 1, None, None),
    ("sd1_ddim_s07", "sd1", "init_32x24.png", "a lighthouse", None, 10, 0.7, 7.5, 6, 1, "ddim", None),
    ("sd1_euler_s1", "sd1", "init_32x24.png", "a lighthouse", None, 3, 1.0, 7.5, 8, 1, "euler", None),
    ("sd1_euler_a_s06_jpeg", "sd1", "init_32x24.jpg", "a red fox in the snow", None, 4, 0.6, 7.5, 9, 1, "euler-a", None),
    ("sdxl_euler_a_s05", "sdxl", "init_24x32.png", "a cat wearing sunglasses", None, 4, 0.5, 5.0, 0, 1, "euler-a", None),
    ("sdxl_euler_a_s08", "sdxl", "init_24x32.png", "a cat wearing sunglasses", "dark", 5, 0.8, 5.0, 1, 2, "euler-a", None),
    ("sdxl_dpmpp_s05", "sdxl", "init_24x32.png", "a watercolor city skyline", None, 6, 0.5, 7.0, 99, 1, "dpmpp-2m", None),
    ("sdxl_dpmpp_s08", "sdxl", "init_24x32.png", "a watercolor city skyline", "dark", 5, 0.8, 7.0, 98, 1, "dpmpp-2m", None),
    ("sdxl_euler_s06", "sdxl", "init_24x32.png", "a watercolor city skyline", None, 5, 0.6, 7.0, 97, 1, None, None),
    # PEA: the Chinese tower + adapter's conditioning in front of the SD1 UNet
    ("sd1_zh_euler_a_s06", "sd1", "init_32x24.png", "一只戴着墨镜的猫，油画", None, 5, 0.6, 7.5, 11, 1, "euler-a",
     "adapter_sd1.safetensors"),
]


def add_noise_cases(out):
    generator = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 4, 2, 3, generator=generator)
    noise = torch.randn(2, 4, 2, 3, generator=generator)
    tensors = {"x0": x0, "noise": noise}
    records = []
    for which, own in (("sd1", PNDMScheduler), ("sd2", DDIMScheduler), ("sdxl", EulerDiscreteScheduler)):
        base = own.from_pretrained(os.path.join(FIXTURES, "pipelines", which), subfolder="scheduler")
        for scheduler in [None] + sorted(SCHEDULERS):
            sampler = base if scheduler is None else SCHEDULERS[scheduler](base.config)
            steps = 7
            sampler.set_timesteps(steps)
            for begin in (0, 3, len(sampler.timesteps) - 1):
                sampler.set_timesteps(steps)
                if hasattr(sampler, "set_begin_index"):
                    sampler.set_begin_index(begin)
                timestep = sampler.timesteps[begin:begin + 1].repeat(2)
                name = f"{which}_{scheduler or 'own'}_{begin}"
                tensors["out." + name] = sampler.add_noise(x0.clone(), noise.clone(), timestep)
                records.append({"name": name, "pipeline": which, "scheduler": scheduler, "steps": steps, "begin": begin,
                                "timestep": float(timestep[0])})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "add_noise.safetensors"),
              metadata={"cases": json.dumps(records)})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="Tests/Fixtures/img2img")
    args = parser.parse_args()
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    init_image(32, 24).save(os.path.join(args.out, "init_32x24.png"))
    init_image(24, 32).save(os.path.join(args.out, "init_24x32.png"))
    init_image(32, 24).save(os.path.join(args.out, "init_32x24.jpg"), quality=90)

    tokenizer, encoder = load_encoder(os.path.join(FIXTURES, "pea", "zh_encoder"))
    sd1_adapter = ReferenceAdapter([16, 32, 32, 16])
    sd1_adapter.load_state_dict(load_file(os.path.join(FIXTURES, "pea", "adapter_sd1.safetensors")))
    adapters = {"adapter_sd1.safetensors": sd1_adapter.eval()}

    add_noise_cases(args.out)

    records = []
    for name, which, image_file, prompt, negative, steps, strength, guidance, seed, batch, scheduler, adapter_file in CASES:
        cls = StableDiffusionXLImg2ImgPipeline if which == "sdxl" else StableDiffusionImg2ImgPipeline
        pipe = cls.from_pretrained(os.path.join(FIXTURES, "pipelines", which))
        pipe.set_progress_bar_config(disable=True)
        if which == "sdxl":
            assert not pipe.config.requires_aesthetics_score  # a base model: (original, crop, target) time ids
        if scheduler is not None:
            pipe.scheduler = SCHEDULERS[scheduler](pipe.scheduler.config)
        image = load_image(os.path.join(args.out, image_file))
        kwargs = dict(prompt=prompt, negative_prompt=negative, num_images_per_prompt=batch)
        if adapter_file is not None:
            adapter = adapters[adapter_file]
            sequence, _ = adapted([prompt] * batch, tokenizer, encoder, adapter)
            negative_sequence, _ = adapted([negative or ""] * batch, tokenizer, encoder, adapter)
            kwargs = dict(prompt_embeds=sequence, negative_prompt_embeds=negative_sequence)
        # The steps get_timesteps leaves, as the pipeline computes them (scheduler.order is 1 for all of these).
        pipe.scheduler.set_timesteps(steps)
        _, steps_run = pipe.get_timesteps(steps, strength, "cpu")
        with torch.no_grad():
            images = pipe(image=image, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                          output_type="np", generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images
        pixels = (images * 255).round().astype(np.int32)
        save_file({"images": torch.from_numpy(pixels).contiguous()}, os.path.join(args.out, name + ".safetensors"))
        records.append({"name": name, "pipeline": which, "init_image": image_file, "prompt": prompt,
                        "negative_prompt": negative, "steps": steps, "strength": strength, "guidance": guidance,
                        "seed": seed, "batch": batch, "scheduler": scheduler, "adapter": adapter_file,
                        "steps_run": steps_run, "images": name + ".safetensors"})
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(records, f, indent=1, ensure_ascii=False)
    total = sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(args.out) for n in names)
    print(f"wrote {len(records)} img2img cases ({total / 1024:.0f} KiB) to {args.out}")


if __name__ == "__main__":
    main()
