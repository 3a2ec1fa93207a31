#!/usr/bin/env python3
"""What half-size weights should give: the pipeline fixtures' cases (Tests/Fixtures/pipelines, made by
make_pipeline_fixtures.py) run by diffusers with every weight matrix rounded to bf16, and to f16.

`pea --weights bf16|f16` (CPUBackend's halfWeights) holds each linear and convolution weight in the half-size
dtype, rounded to nearest even from the f32 file, and computes everything in f32. The same model in torch is the
fp32 pipeline whose nn.Linear and nn.Conv2d weights (UNet, VAE and text encoders; not embeddings, norms or
biases) are rounded to that dtype and widened back: `w.to(bfloat16).to(float32)`. Pea must match it as it
matches the plain fp32 pipeline (docs/testing.md's pipeline tolerance).

Writes, under --out (default Tests/Fixtures/half_weights), per case `<case>.safetensors` with `bf16` and `f16`:
the images [N, H, W, 3] as int32 0…255 (diffusers' numpy_to_pil rounding), and in its metadata how far each is
from the fp32 images of the pipeline fixtures (`<dtype>_max_abs`, `<dtype>_mean_abs`, in 8-bit steps): the cost
of half-size weights on these tiny models.
"""
import argparse
import json
import os

import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_pipeline_fixtures import SCHEDULERS  # noqa: E402  (pea's --scheduler names, as those fixtures swap them in)
PIPELINES = os.path.join(HERE, "..", "..", "Tests", "Fixtures", "pipelines")


def round_weight_matrices(pipe, dtype):
    """Every nn.Linear and nn.Conv2d weight of the pipeline's models rounded to `dtype` and widened back."""
    count = 0
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, part, None)
        if model is None:
            continue
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.data = module.weight.data.to(dtype).to(torch.float32)
                count += 1
    return count


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipelines", default=PIPELINES)
    parser.add_argument("--out", default="Tests/Fixtures/half_weights")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.pipelines, "cases.json")) as f:
        cases = json.load(f)
    for case in cases:
        f32 = load_file(os.path.join(args.pipelines, case["images"]))["images"].numpy()
        tensors, metadata = {}, {}
        for label, dtype in (("bf16", torch.bfloat16), ("f16", torch.float16)):
            cls = StableDiffusionXLPipeline if case["pipeline"] == "sdxl" else StableDiffusionPipeline
            pipe = cls.from_pretrained(os.path.join(args.pipelines, case["pipeline"]))
            pipe.set_progress_bar_config(disable=True)
            if case["scheduler"] is not None:
                pipe.scheduler = SCHEDULERS[case["scheduler"]](pipe.scheduler.config)
            rounded = round_weight_matrices(pipe, dtype)
            with torch.no_grad():
                images = pipe(case["prompt"], negative_prompt=case["negative_prompt"], num_inference_steps=case["steps"],
                              guidance_scale=case["guidance"], width=case["width"], height=case["height"],
                              num_images_per_prompt=case["batch"], output_type="np",
                              generator=torch.Generator("cpu").manual_seed(case["seed"])).images
            pixels = (images * 255).round().astype(np.int32)
            tensors[label] = torch.from_numpy(pixels).contiguous()
            difference = np.abs(pixels - f32)
            metadata[f"{label}_max_abs"] = str(int(difference.max()))
            metadata[f"{label}_mean_abs"] = f"{difference.mean():.4f}"
            metadata[f"{label}_matrices"] = str(rounded)
        save_file(tensors, os.path.join(args.out, case["name"] + ".safetensors"), metadata=metadata)
        print(case["name"], metadata)


if __name__ == "__main__":
    main()
