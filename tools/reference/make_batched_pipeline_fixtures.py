#!/usr/bin/env python3
"""Batched generation with one generator per prompt, as diffusers does it.

Each case calls the diffusers pipeline ONCE with a list of prompts, a list of negative prompts (or None) and
`generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]`, num_images_per_prompt=1: image i starts from
latents drawn by generator i and, for ancestral schedulers, takes its per-step noise from generator i too.

Reads (never rewrites) the tiny pipeline folders of make_pipeline_fixtures.py, Tests/Fixtures/pipelines/sd1 and
Tests/Fixtures/pipelines/sdxl, and writes under --out (default Tests/Fixtures/pipelines/batched):
  cases.json  per case: name, pipeline ("sd1"/"sdxl"), prompts (list), negative_prompts (list, same length as
          prompts, "" entries allowed; or null), seeds (list, one per prompt), steps, guidance, width, height,
          scheduler (pea's name or null for the folder's own) and images (the file name)
  <case>.safetensors  `images` [N, H, W, 3] as int32 values 0…255, N = len(prompts): diffusers' output_type="np"
          images converted as its PIL path does, (x · 255).round()
Everything runs in float32 on the CPU.

Self-check (an assertion, not a fixture): for every case listed in SOLO_CHECK, each image of the batch must equal
what the pipeline makes for that prompt alone, with its own negative prompt and its own generator
manual_seed(seed), to within 1 in the int images.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_pipeline_fixtures import SCHEDULERS  # noqa: E402  (module has a main() guard: no side effects)

PIPELINES = os.path.normpath(os.path.join(HERE, "..", "..", "Tests", "Fixtures", "pipelines"))

CASES = [
    # name, pipeline, prompts, negative prompts, seeds, steps, guidance, width, height, scheduler
    # Two identical prompts (de-duplication must not merge their images) and a seed repeated on different prompts;
    # euler-a draws per-step noise from each image's own generator.
    ("sd1_euler_a_generators", "sd1",
     ["a red fox in the snow, photo", "an astronaut riding a horse", "a red fox in the snow, photo"],
     ["blurry", "", "low quality"], [5, 17, 5], 4, 7.0, 32, 32, "euler-a"),
    ("sd1_dpmpp_no_negative", "sd1", ["mountains at dawn", "a cabin in the woods!"], None, [3, 4], 4, 5.0, 24, 32,
     "dpmpp-2m"),
    ("sdxl_folder_scheduler_negatives", "sdxl", ["a cat wearing sunglasses", "a watercolor city skyline"],
     ["dark", "blurry"], [11, 12], 3, 6.0, 32, 32, None),
]
SOLO_CHECK = ["sd1_euler_a_generators"]


def load(which, scheduler):
    cls = StableDiffusionXLPipeline if which == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(os.path.join(PIPELINES, which))
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = SCHEDULERS[scheduler](pipe.scheduler.config)
    return pipe


def generate(pipe, prompts, negatives, seeds, steps, guidance, width, height):
    with torch.no_grad():
        images = pipe(prompts, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=guidance,
                      width=width, height=height, num_images_per_prompt=1, output_type="np",
                      generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images
    return (images * 255).round().astype(np.int32)  # diffusers' numpy_to_pil


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(PIPELINES, "batched"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    records = []
    for name, which, prompts, negatives, seeds, steps, guidance, width, height, scheduler in CASES:
        assert len(seeds) == len(prompts) and (negatives is None or len(negatives) == len(prompts)), name
        pipe = load(which, scheduler)
        pixels = generate(pipe, prompts, negatives, seeds, steps, guidance, width, height)
        assert pixels.shape == (len(prompts), height, width, 3), (name, pixels.shape)
        if name in SOLO_CHECK:
            worst = 0
            for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
                solo = generate(pipe, [prompt], None if negatives is None else [negatives[i]], [seed], steps,
                                guidance, width, height)[0]
                worst = max(worst, int(np.abs(solo - pixels[i]).max()))
            print(f"{name}: batched vs solo max |difference| = {worst}")
            assert worst <= 1, f"{name}: diffusers' batched images differ from solo ones by {worst} > 1"
        save_file({"images": torch.from_numpy(pixels).contiguous()}, os.path.join(args.out, name + ".safetensors"))
        records.append({"name": name, "pipeline": which, "prompts": prompts, "negative_prompts": negatives,
                        "seeds": seeds, "steps": steps, "guidance": guidance, "width": width, "height": height,
                        "scheduler": scheduler, "images": name + ".safetensors"})
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(records, f, indent=1, ensure_ascii=False)
    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
    print(f"wrote {len(records)} cases ({total / 1024:.0f} KiB) to {args.out}")


if __name__ == "__main__":
    main()
