#!/usr/bin/env python3
"""Inpainting: what diffusers' StableDiffusionInpaintPipeline makes from a tiny 9-channel SD1 inpainting pipeline
and from the ordinary tiny SD1 pipeline of Tests/Fixtures/pipelines/sd1 (a 4-channel UNet: diffusers' latent
blending), and what StableDiffusionXLInpaintPipeline makes from the tiny SDXL pipeline (4 channels: blending). Run after make_pipeline_fixtures.py, make_pea_pipeline_fixtures.py and make_img2img_fixtures.py (whose
init images and folders are read, never rewritten).

Writes, under --out (default Tests/Fixtures/inpaint):
  sd1_inpainting/  StableDiffusionInpaintPipeline: a tiny UNet with in_channels 9 (latents, mask, masked image
                   latents), saved here; vae/, text_encoder/, tokenizer/ are relative symlinks to
                   ../../pipelines/sd1's (the same components, so the fixture stays small); scheduler/ is sd1's
  mask_32x24.png   a greyscale (L) PNG mask: a disc and a band of values around the 0.5 threshold (127 and 128
                   land on pixels the nearest-neighbour resize to the latent grid samples)
  mask_24x32.png   an RGB PNG mask, so the greyscale conversion (PIL's convert("L")) matters
  cases.json   per case: name, pipeline (the folder under --out or under Tests/Fixtures/pipelines), init_image
               (relative to Tests/Fixtures), mask, prompt, negative_prompt (or null), steps, strength, guidance,
               seed, batch, scheduler (pea's name or null for the folder's own), adapter (PEA cases: the adapter
               file under Tests/Fixtures/pea, with pea/zh_encoder as the text encoder; else null), steps_run, images
  <case>.safetensors  `images` [N, H, W, 3] int32 0…255, as make_pipeline_fixtures.py stores them
Images and masks are read with diffusers.utils.load_image (PIL, converted to RGB) and passed as `image=` and
`mask_image=`; padding_mask_crop stays None (no overlay of the original); everything runs in float32 on the CPU
with generator=torch.Generator("cpu").manual_seed(seed).
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
from diffusers.utils import load_image

from make_multilingual_fixtures import ReferenceAdapter
from make_pea_pipeline_fixtures import adapted, load_encoder
from make_pipeline_fixtures import SCHEDULERS, perturb

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "..", "Tests", "Fixtures")


def inpainting_pipeline(out):
    """sd1 with a 9-channel UNet of the same shape otherwise, written as a diffusers folder."""
    folder = os.path.join(out, "sd1_inpainting")
    base = StableDiffusionInpaintPipeline.from_pretrained(os.path.join(FIXTURES, "pipelines", "sd1"))
    torch.manual_seed(21)
    unet = perturb(UNet2DConditionModel(
        sample_size=16, in_channels=9, out_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=16, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")), 22)
    pipe = StableDiffusionInpaintPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                          unet=unet, scheduler=base.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    for shared in ("vae", "text_encoder", "tokenizer"):
        shutil.rmtree(os.path.join(folder, shared))
        os.symlink(os.path.join("..", "..", "pipelines", "sd1", shared), os.path.join(folder, shared))


def mask(width, height, rgb):
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    values = np.where((x - width * 0.35) ** 2 + (y - height * 0.55) ** 2 < (min(width, height) * 0.3) ** 2, 255.0, 0.0)
    band = (y >= height - 6) & (y < height - 3)
    values[band] = 96 + 64 * x[band] / (width - 1)  # 96…160 across the threshold
    values[8, 8], values[8, 16], values[16, 16] = 127, 128, 128
    grey = values.round().astype(np.uint8)
    if not rgb:
        return Image.fromarray(grey, "L")
    # Colours whose luma (ITU-R 601, as PIL's convert("L")) falls either side of 127.5.
    pixels = np.stack([grey, grey, grey], axis=-1)
    pixels[values == 255] = (255, 160, 40)
    pixels[values == 0] = (30, 90, 200)
    return Image.fromarray(pixels, "RGB")


CASES = [
    # name, pipeline, init image, mask, prompt, negative, steps, strength, guidance, seed, batch, scheduler, adapter
    # 9-channel UNet: mask and masked image latents beside the latents
    ("sd1_inpainting_euler_a_s1_batch", "inpaint/sd1_inpainting", "img2img/init_32x24.png", "mask_32x24.png",
     "a red fox in the snow", None, 4, 1.0, 7.5, 42, 2, "euler-a", None),
    ("sd1_inpainting_euler_a_s06", "inpaint/sd1_inpainting", "img2img/init_24x32.png", "mask_24x32.png",
     "a red fox in the snow", "blurry", 5, 0.6, 6.0, 7, 1, "euler-a", None),
    ("sd1_inpainting_dpmpp_s1", "inpaint/sd1_inpainting", "img2img/init_24x32.png", "mask_24x32.png",
     "mountains at dawn", None, 4, 1.0, 7.5, 3, 1, "dpmpp-2m", None),
    ("sd1_inpainting_dpmpp_s06", "inpaint/sd1_inpainting", "img2img/init_32x24.png", "mask_32x24.png",
     "mountains at dawn", None, 5, 0.6, 5.0, 4, 1, "dpmpp-2m", None),
    # 4-channel UNet: latent blending with the init image's latents noised to the next timestep
    ("sd1_blend_euler_a_s1", "pipelines/sd1", "img2img/init_32x24.png", "mask_32x24.png",
     "a lighthouse", None, 4, 1.0, 7.5, 5, 1, "euler-a", None),
    ("sd1_blend_euler_a_s06_batch", "pipelines/sd1", "img2img/init_24x32.png", "mask_24x32.png",
     "a lighthouse", "fog", 5, 0.6, 7.5, 6, 2, "euler-a", None),
    ("sd1_blend_dpmpp_s1", "pipelines/sd1", "img2img/init_24x32.png", "mask_24x32.png",
     "a watercolor city skyline", None, 4, 1.0, 7.0, 8, 1, "dpmpp-2m", None),
    ("sd1_blend_dpmpp_s06", "pipelines/sd1", "img2img/init_32x24.png", "mask_32x24.png",
     "a watercolor city skyline", None, 5, 0.6, 7.0, 9, 1, "dpmpp-2m", None),
    # add_noise by timestep rather than by step index
    ("sd1_blend_ddim_s07", "pipelines/sd1", "img2img/init_32x24.png", "mask_32x24.png",
     "a lighthouse", None, 10, 0.7, 7.5, 10, 1, "ddim", None),
    # SDXL (a base model: no aesthetic score), blending; strengths given (its pipeline's default is 0.9999)
    ("sdxl_blend_euler_a_s1", "pipelines/sdxl", "img2img/init_24x32.png", "mask_24x32.png",
     "a cat wearing sunglasses", None, 4, 1.0, 5.0, 12, 1, "euler-a", None),
    ("sdxl_blend_dpmpp_s06", "pipelines/sdxl", "img2img/init_32x24.png", "mask_32x24.png",
     "a watercolor city skyline", "dark", 5, 0.6, 7.0, 13, 1, "dpmpp-2m", None),
    # PEA: the Chinese tower + adapter's conditioning in front of the 9-channel UNet
    ("sd1_inpainting_zh_euler_a_s06", "inpaint/sd1_inpainting", "img2img/init_32x24.png", "mask_32x24.png",
     "一只戴着墨镜的猫，油画", None, 5, 0.6, 7.5, 11, 1, "euler-a", "adapter_sd1.safetensors"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="Tests/Fixtures/inpaint")
    args = parser.parse_args()
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    inpainting_pipeline(args.out)
    mask(32, 24, rgb=False).save(os.path.join(args.out, "mask_32x24.png"))
    mask(24, 32, rgb=True).save(os.path.join(args.out, "mask_24x32.png"))

    tokenizer, encoder = load_encoder(os.path.join(FIXTURES, "pea", "zh_encoder"))
    sd1_adapter = ReferenceAdapter([16, 32, 32, 16])
    sd1_adapter.load_state_dict(load_file(os.path.join(FIXTURES, "pea", "adapter_sd1.safetensors")))

    records = []
    for (name, which, image_file, mask_file, prompt, negative, steps, strength, guidance, seed, batch, scheduler,
         adapter_file) in CASES:
        folder = os.path.join(args.out, "sd1_inpainting") if which.startswith("inpaint/") else os.path.join(FIXTURES, which)
        cls = StableDiffusionXLInpaintPipeline if which == "pipelines/sdxl" else StableDiffusionInpaintPipeline
        pipe = cls.from_pretrained(folder)
        if which == "pipelines/sdxl":
            assert not pipe.config.requires_aesthetics_score  # a base model: (original, crop, target) time ids
        pipe.set_progress_bar_config(disable=True)
        if scheduler is not None:
            pipe.scheduler = SCHEDULERS[scheduler](pipe.scheduler.config)
        image = load_image(os.path.join(FIXTURES, image_file))
        mask_image = load_image(os.path.join(args.out, mask_file))
        kwargs = dict(prompt=prompt, negative_prompt=negative, num_images_per_prompt=batch)
        if adapter_file is not None:
            sequence, _ = adapted([prompt] * batch, tokenizer, encoder, sd1_adapter.eval())
            negative_sequence, _ = adapted([negative or ""] * batch, tokenizer, encoder, sd1_adapter.eval())
            kwargs = dict(prompt_embeds=sequence, negative_prompt_embeds=negative_sequence)
        pipe.scheduler.set_timesteps(steps)
        _, steps_run = pipe.get_timesteps(steps, strength, "cpu")
        with torch.no_grad():
            images = pipe(image=image, mask_image=mask_image, strength=strength, num_inference_steps=steps,
                          guidance_scale=guidance, height=image.height, width=image.width, output_type="np",
                          generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images
        pixels = (images * 255).round().astype(np.int32)
        save_file({"images": torch.from_numpy(pixels).contiguous()}, os.path.join(args.out, name + ".safetensors"))
        records.append({"name": name, "pipeline": which, "init_image": image_file, "mask": mask_file, "prompt": prompt,
                        "negative_prompt": negative, "steps": steps, "strength": strength, "guidance": guidance,
                        "seed": seed, "batch": batch, "scheduler": scheduler, "adapter": adapter_file,
                        "steps_run": steps_run, "images": name + ".safetensors"})
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(records, f, indent=1, ensure_ascii=False)
    total = sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(args.out) for n in names)
    print(f"wrote {len(records)} inpainting cases ({total / 1024:.0f} KiB, symlinked components excluded) to {args.out}")


if __name__ == "__main__":
    main()
