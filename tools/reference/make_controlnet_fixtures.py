#!/usr/bin/env python3
"""ControlNet: what diffusers' ControlNetModel, StableDiffusionControlNetPipeline and
StableDiffusionXLControlNetPipeline make from the tiny pipelines of Tests/Fixtures/pipelines (read, never
rewritten; run after make_pipeline_fixtures.py and make_pea_pipeline_fixtures.py).

Writes, under --out (default Tests/Fixtures/controlnet):
  sd1_a/, sd1_b/, sdxl_a/   diffusers ControlNet folders (config.json + diffusion_pytorch_model.safetensors, f16):
                            ControlNetModel.from_unet(the tiny pipeline's UNet) with every parameter re-randomised
                            (seeded), so the zero convs are not zero and a ControlNet that is ignored or wired wrong
                            changes the image. sd1_b reads its image in BGR order (controlnet_conditioning_channel_order).
  control_32x24.png, control_24x32.png, control2_32x24.png   control images (RGB PNGs: lines and a ring), at the
                            output size, so diffusers' VaeImageProcessor does not resize them
  control_44x36.png         a control image whose sides are not multiples of 8: resized (Lanczos) to 40×32 by
                            default, or to an explicit width/height
  models.safetensors        per ControlNet <n>: the inputs `<n>.sample`, `<n>.timestep`, `<n>.encoder_hidden_states`,
                            `<n>.cond` (and for SDXL `<n>.text_embeds`, `<n>.time_ids`), seeded randn / uniform, and
                            the outputs `<n>.down.<i>` and `<n>.mid` of controlnet(…, conditioning_scale=0.7)
  cases.json   per case: name, pipeline, controlnets (folder names), control_images, scales, starts, ends (one per
               ControlNet), prompt, negative_prompt (or null), steps, guidance, seed, batch, width, height, scheduler
               (pea's name or null for the folder's own), size_given (whether width/height were passed; if not, they
               are the size diffusers took from the first control image), adapter (PEA cases: the adapter file under
               Tests/Fixtures/pea, with pea/zh_encoder as the text encoder; else null), images
  <case>.safetensors  `images` [N, H, W, 3] int32 0…255, as make_pipeline_fixtures.py stores them
Everything runs in float32 on the CPU with generator=torch.Generator("cpu").manual_seed(seed); a single ControlNet
is passed as one ControlNetModel (floats for scale/start/end), several as a list (MultiControlNetModel). PEA cases
feed prompt_embeds (and SDXL's pooled embeds) from the Chinese-CLIP tower and adapter as make_pea_pipeline_fixtures.py
does, so the ControlNet sees the adapter's conditioning as the UNet does. Resize cases (RESIZE_CASES) give the
pipeline's control_image_processor vae_scale_factor 8 (a real SD VAE's; the tiny VAE's is 2), so the default size
rounds down to multiples of 8 as Pea's does.
"""
import argparse
import json
import math
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from diffusers import (ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline,
                       UNet2DConditionModel)
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import load_image

from make_multilingual_fixtures import ReferenceAdapter
from make_pea_pipeline_fixtures import adapted, load_encoder
from make_pipeline_fixtures import SCHEDULERS

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "..", "Tests", "Fixtures")

# name, pipeline, seed, channel order
CONTROLNETS = [("sd1_a", "sd1", 101, "rgb"), ("sd1_b", "sd1", 102, "bgr"), ("sdxl_a", "sdxl", 103, "rgb")]


def rerandomised(controlnet, seed):
    """Every parameter drawn afresh: weights ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.1²), other vectors N(0, 0.1²)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return controlnet


def control_image(width, height, phase):
    """Lines and a ring on black, as an edge map looks, with some colour so RGB vs BGR matters."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    pixels = np.zeros((height, width, 3))
    pixels[(x + 2 * y + phase) % 7 < 1.5] = (255, 255, 255)
    ring = np.abs(np.hypot(x - width * 0.45, y - height * 0.55) - min(width, height) * 0.3) < 1.2
    pixels[ring] = (250, 40 + 20 * phase, 10)
    pixels[:, :, 2] += 60 * (x / width)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


CASES = [
    # name, pipeline, controlnets, images, scales, starts, ends, prompt, negative, steps, guidance, seed, batch,
    # scheduler, adapter
    ("sd1_euler_a_scale05_batch", "sd1", ["sd1_a"], ["control_32x24.png"], [0.5], [0.0], [1.0], "a red fox in the snow",
     None, 4, 7.5, 42, 2, "euler-a", None),
    ("sd1_dpmpp_scale13", "sd1", ["sd1_a"], ["control_32x24.png"], [1.3], [0.0], [1.0], "mountains at dawn", "blurry",
     5, 6.0, 3, 1, "dpmpp-2m", None),
    # 5 steps: the window keeps steps 1 and 2 only. (With 10 DDIM steps this case is ill-conditioned: diffusers'
    # own image moves by ~0.07/255 on average when only its attention processor changes.)
    ("sd1_ddim_start02_end07", "sd1", ["sd1_a"], ["control_32x24.png"], [1.0], [0.2], [0.7], "a lighthouse", None,
     5, 7.5, 6, 1, "ddim", None),
    ("sd1_pndm_two_controlnets", "sd1", ["sd1_a", "sd1_b"], ["control_32x24.png", "control2_32x24.png"], [0.8, 1.2],
     [0.0, 0.3], [1.0, 0.8], "a lighthouse", None, 4, 7.5, 5, 1, None, None),
    ("sdxl_euler_a_scale05", "sdxl", ["sdxl_a"], ["control_24x32.png"], [0.5], [0.0], [1.0], "a cat wearing sunglasses",
     None, 4, 5.0, 0, 1, "euler-a", None),
    ("sdxl_dpmpp_scale13", "sdxl", ["sdxl_a"], ["control_24x32.png"], [1.3], [0.0], [1.0], "a watercolor city skyline",
     "dark", 5, 7.0, 99, 2, "dpmpp-2m", None),
    ("sdxl_euler_start02_end07", "sdxl", ["sdxl_a"], ["control_24x32.png"], [1.0], [0.2], [0.7],
     "a watercolor city skyline", None, 5, 7.0, 97, 1, None, None),
    # PEA: the Chinese tower + adapter's conditioning goes to the UNet and the ControlNet alike
    ("sd1_zh_euler_a", "sd1", ["sd1_a"], ["control_32x24.png"], [1.0], [0.0], [1.0], "一只戴着墨镜的猫，油画", None,
     4, 7.5, 11, 1, "euler-a", "adapter_sd1.safetensors"),
    ("sdxl_zh", "sdxl", ["sdxl_a"], ["control_24x32.png"], [0.9], [0.0], [1.0], "一只戴着墨镜的猫，油画", None,
     4, 6.0, 13, 1, None, "adapter_sdxl/pytorch_model.bin"),
]

# Control images diffusers resizes: name, pipeline, controlnets, images, (width, height) passed (None: the first
# image's size rounded down), prompt, negative, steps, guidance, seed, batch, scheduler; scale 1, the whole window.
RESIZE_CASES = [
    ("sd1_resize_44x36_default", "sd1", ["sd1_a"], ["control_44x36.png"], None, "a red fox in the snow", None,
     4, 7.5, 21, 1, "euler-a"),
    ("sd1_resize_44x36_to_24x32", "sd1", ["sd1_a"], ["control_44x36.png"], (24, 32), "mountains at dawn", "blurry",
     4, 6.0, 22, 1, "dpmpp-2m"),
]


def model_outputs(out, controlnets):
    tensors = {}
    generator = torch.Generator().manual_seed(7)
    for name, which, _, _ in CONTROLNETS:
        controlnet = controlnets[name]
        config = controlnet.config
        sample = torch.randn(2, 4, 12, 16, generator=generator)
        cond = torch.rand(2, 3, 24, 32, generator=generator)
        states = torch.randn(2, 5, config.cross_attention_dim, generator=generator)
        timestep = torch.tensor([417.0])
        kwargs = {}
        if config.addition_embed_type == "text_time":
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=generator),
                                           "time_ids": torch.tensor([[24.0, 32, 0, 0, 24, 32], [48, 64, 2, 3, 24, 32]])}
            tensors[name + ".text_embeds"] = kwargs["added_cond_kwargs"]["text_embeds"]
            tensors[name + ".time_ids"] = kwargs["added_cond_kwargs"]["time_ids"]
        with torch.no_grad():
            down, mid = controlnet(sample, timestep, encoder_hidden_states=states, controlnet_cond=cond,
                                   conditioning_scale=0.7, return_dict=False, **kwargs)
        tensors.update({name + ".sample": sample, name + ".cond": cond, name + ".encoder_hidden_states": states,
                        name + ".timestep": timestep, name + ".mid": mid})
        tensors.update({f"{name}.down.{i}": d for i, d in enumerate(down)})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "models.safetensors"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="Tests/Fixtures/controlnet")
    args = parser.parse_args()
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    control_image(32, 24, 0).save(os.path.join(args.out, "control_32x24.png"))
    control_image(32, 24, 3).save(os.path.join(args.out, "control2_32x24.png"))
    control_image(24, 32, 1).save(os.path.join(args.out, "control_24x32.png"))
    control_image(44, 36, 2).save(os.path.join(args.out, "control_44x36.png"))

    controlnets = {}
    for name, which, seed, order in CONTROLNETS:
        unet = UNet2DConditionModel.from_pretrained(os.path.join(FIXTURES, "pipelines", which), subfolder="unet")
        # The tiny VAE halves the image once, so one stride-2 conv brings the control image to latent size.
        controlnet = ControlNetModel.from_unet(unet, controlnet_conditioning_channel_order=order,
                                               conditioning_embedding_out_channels=(4, 8))
        rerandomised(controlnet, seed).to(torch.float16).save_pretrained(os.path.join(args.out, name))
        # The reference computes in float32 from the f16 values stored, as Pea loads them.
        controlnets[name] = ControlNetModel.from_pretrained(os.path.join(args.out, name), torch_dtype=torch.float32).eval()
    model_outputs(args.out, controlnets)

    tokenizer, encoder = load_encoder(os.path.join(FIXTURES, "pea", "zh_encoder"))
    sd1_adapter = ReferenceAdapter([16, 32, 32, 16])
    sd1_adapter.load_state_dict(load_file(os.path.join(FIXTURES, "pea", "adapter_sd1.safetensors")))
    sdxl_adapter = ReferenceAdapter([16, 24, 16], fc_out=32)
    sdxl_adapter.load_state_dict(torch.load(os.path.join(FIXTURES, "pea", "adapter_sdxl", "pytorch_model.bin")))
    adapters = {"adapter_sd1.safetensors": sd1_adapter.eval(), "adapter_sdxl/pytorch_model.bin": sdxl_adapter.eval()}

    cases = [case[:14] + (True,) + case[14:] for case in CASES]
    for name, which, names, image_files, size, prompt, negative, steps, guidance, seed, batch, scheduler in RESIZE_CASES:
        cases.append((name, which, names, image_files, [1.0] * len(names), [0.0] * len(names), [1.0] * len(names), prompt,
                      negative, steps, guidance, seed, batch, scheduler, size, None))
    records = []
    for (name, which, names, image_files, scales, starts, ends, prompt, negative, steps, guidance, seed, batch,
         scheduler, size, adapter_file) in cases:
        cls = StableDiffusionXLControlNetPipeline if which == "sdxl" else StableDiffusionControlNetPipeline
        single = len(names) == 1
        nets = [controlnets[n] for n in names]
        pipe = cls.from_pretrained(os.path.join(FIXTURES, "pipelines", which), controlnet=nets[0] if single else nets)
        pipe.set_progress_bar_config(disable=True)
        if scheduler is not None:
            pipe.scheduler = SCHEDULERS[scheduler](pipe.scheduler.config)
        images = [load_image(os.path.join(args.out, f)) for f in image_files]
        if size is True:   # CASES: the control image's own size, passed
            width, height = images[0].size
        else:
            # The tiny VAE's factor is 2; a real SD VAE's, 8, is what Pea's sizes follow (multiples of 8).
            pipe.control_image_processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
            width, height = size or (None, None)
        kwargs = dict(prompt=prompt, negative_prompt=negative, num_images_per_prompt=batch)
        if adapter_file is not None:
            adapter = adapters[adapter_file]
            sequence, pooled = adapted([prompt] * batch, tokenizer, encoder, adapter)
            negative_sequence, negative_pooled = adapted([negative or ""] * batch, tokenizer, encoder, adapter)
            kwargs = dict(prompt_embeds=sequence, negative_prompt_embeds=negative_sequence)
            if which == "sdxl":
                kwargs.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
        pick = (lambda v: v[0]) if single else (lambda v: v)
        with torch.no_grad():
            out = pipe(image=pick(images), controlnet_conditioning_scale=pick(scales),
                       control_guidance_start=pick(starts), control_guidance_end=pick(ends), width=width,
                       height=height, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                       generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images
        pixels = (out * 255).round().astype(np.int32)
        save_file({"images": torch.from_numpy(pixels).contiguous()}, os.path.join(args.out, name + ".safetensors"))
        # The size diffusers made (the default's when none was passed).
        height, width = pixels.shape[1:3]
        records.append({"name": name, "pipeline": which, "controlnets": names, "control_images": image_files,
                        "scales": scales, "starts": starts, "ends": ends, "prompt": prompt, "negative_prompt": negative,
                        "steps": steps, "guidance": guidance, "seed": seed, "batch": batch, "width": int(width),
                        "height": int(height), "size_given": size is not None, "scheduler": scheduler,
                        "adapter": adapter_file, "images": name + ".safetensors"})
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(records, f, indent=1, ensure_ascii=False)
    total = sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(args.out) for n in names)
    print(f"wrote {len(records)} ControlNet cases ({total / 1024:.0f} KiB) to {args.out}")


if __name__ == "__main__":
    main()
