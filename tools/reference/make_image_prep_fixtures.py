#!/usr/bin/env python3
"""Img2img and inpainting with init images and masks that need diffusers' preprocessing: an init image whose
size is not a multiple of 8, a mask of another size and aspect, a mask blur. diffusers resizes both itself
(VaeImageProcessor: Lanczos to (height, width), the mask then converted to "L" and binarised), and the caller
blurs the mask with `pipe.mask_processor.blur(mask, blur_factor)` first, as diffusers documents. Pea must make
the same images from the same files (`pea generate --init-image --mask --mask-blur`). Run after
make_pipeline_fixtures.py and make_inpaint_fixtures.py (whose folders are read, never rewritten).

Writes, under --out (default Tests/Fixtures/image_prep):
  init_70x52.png   an RGB PNG init image (make_img2img_fixtures.py's drawing: gradients and a disc), not a multiple
                   of 8 either way
  mask_40x30.png   an RGB PNG mask of another size and aspect (a disc and a bar)
  cases.json       per case: name, pipeline (under Tests/Fixtures), init_image, mask (or null), mask_blur (or null),
                   width/height (null: not passed, Pea's default), prompt, negative_prompt, steps, strength,
                   guidance, seed, scheduler, images
  <case>.safetensors  `images` [N, H, W, 3] int32 0…255
Cases: img2img at the default size (70×52 → 64×48, as StableDiffusionImg2ImgPipeline); inpainting by blending
with the ordinary sd1 UNet, the mask blurred (3), at 64×48 (passed as height/width: the inpainting pipeline would
default to the UNet's size, Pea defaults to the image's rounded down); the 9-channel inpainting UNet resized to
an explicit 32×40 (another aspect), the mask blurred with a fractional radius. The pipelines' image processor
is given vae_scale_factor 8 (a real SD VAE's; the tiny VAE's is 2), so the default size rounds down to
multiples of 8 as Pea's does. Images are read with
diffusers.utils.load_image (PIL, RGB); float32 on the CPU, generator=torch.Generator("cpu").manual_seed(seed).
"""
import argparse
import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import load_image

from make_img2img_fixtures import FIXTURES, init_image
from make_pipeline_fixtures import SCHEDULERS


def mask(width, height):
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    disc = (x - width * 0.4) ** 2 + (y - height * 0.5) ** 2 < (height * 0.3) ** 2
    bar = (x > width * 0.75) & (x < width * 0.85)
    pixels = np.where((disc | bar)[..., None], np.array([250, 240, 230.0]), np.array([10, 20, 30.0]))
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


CASES = [
    # name, pipeline, mask, mask_blur, width, height, prompt, negative, steps, strength, guidance, seed, scheduler
    ("sd1_img2img_70x52", "pipelines/sd1", None, None, None, None,
     "a red fox in the snow", None, 4, 0.6, 7.5, 31, "euler-a"),
    ("sd1_blend_70x52_mask40x30_blur3", "pipelines/sd1", "mask_40x30.png", 3, None, None,
     "a lighthouse", None, 4, 0.7, 7.5, 32, "euler-a"),
    ("sd1_inpainting_to32x40_blur1_5", "inpaint/sd1_inpainting", "mask_40x30.png", 1.5, 32, 40,
     "mountains at dawn", "fog", 4, 1.0, 7.0, 33, "dpmpp-2m"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="Tests/Fixtures/image_prep")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    init_image(70, 52).save(os.path.join(args.out, "init_70x52.png"))
    mask(40, 30).save(os.path.join(args.out, "mask_40x30.png"))

    records = []
    for name, which, mask_file, blur, width, height, prompt, negative, steps, strength, guidance, seed, scheduler in CASES:
        folder = os.path.join(FIXTURES, which)
        image = load_image(os.path.join(args.out, "init_70x52.png"))
        generator = torch.Generator("cpu").manual_seed(seed)
        common = dict(prompt=prompt, negative_prompt=negative, strength=strength, num_inference_steps=steps,
                      guidance_scale=guidance, output_type="np", generator=generator)
        if mask_file is None:
            assert width is None and height is None  # the img2img pipeline takes the image's size, rounded down
            pipe = StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        else:
            pipe = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        # The tiny VAE has 2 blocks (vae_scale_factor 2); a real SD VAE's factor, 8, is what Pea's sizes follow
        # (multiples of 8), so the image processor rounds the default size as it would for a real model.
        pipe.image_processor = VaeImageProcessor(vae_scale_factor=8)
        pipe.scheduler = SCHEDULERS[scheduler](pipe.scheduler.config)
        with torch.no_grad():
            if mask_file is None:
                images = pipe(image=image, **common).images
            else:
                mask_image = load_image(os.path.join(args.out, mask_file))
                if blur is not None:
                    mask_image = pipe.mask_processor.blur(mask_image, blur_factor=blur)
                # Pea's default size: the init image's rounded down to multiples of 8
                h, w = pipe.image_processor.get_default_height_width(image, height, width)
                images = pipe(image=image, mask_image=mask_image, height=h, width=w, **common).images
        pixels = (images * 255).round().astype(np.int32)
        save_file({"images": torch.from_numpy(pixels).contiguous()}, os.path.join(args.out, name + ".safetensors"))
        records.append({"name": name, "pipeline": which, "init_image": "init_70x52.png", "mask": mask_file,
                        "mask_blur": blur, "width": width, "height": height, "prompt": prompt,
                        "negative_prompt": negative, "steps": steps, "strength": strength, "guidance": guidance,
                        "seed": seed, "scheduler": scheduler, "images": name + ".safetensors",
                        "size": [int(pixels.shape[2]), int(pixels.shape[1])]})
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
    print(f"wrote {len(records)} cases ({total / 1024:.0f} KiB) to {args.out}")


if __name__ == "__main__":
    main()
