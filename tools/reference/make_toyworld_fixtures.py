#!/usr/bin/env python3
"""The bundled toy world as a real-format test case: the images diffusers makes from models/toyworld (and, with
the PEA adapter, from models/toyworld-zh), for `pea generate` to match.

Writes, under --out (default Tests/Fixtures/toyworld):
  pipeline_cases.json, toyworld_<case>.safetensors   per case the settings (as pipelines/cases.json, plus
                                                     "adapter": true for the Chinese ones) and `images`
                                                     [N, H, W, 3] int32 0…255

English cases: StableDiffusionPipeline.from_pretrained(models/toyworld) with the prompt, its own scheduler
(DPM-Solver++) or a swapped one, generator torch.Generator("cpu").manual_seed(seed). Chinese cases: the official
inference's conditioning (as make_pea_pipeline_fixtures.py): the prompt and "" through the Chinese-CLIP tokenizer
(52 tokens, padding, truncation) and encoder of models/toyworld-zh/text_encoder (the file's weights reloaded after
from_pretrained), then the adapter (models/toyworld-zh/adapter.safetensors, the reference module written from
PEA-METHOD.md), passed as prompt_embeds / negative_prompt_embeds. Rerun after the bundled weights change.
"""
import argparse
import json
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from transformers import BertTokenizer, ChineseCLIPTextModel

from make_multilingual_fixtures import ReferenceAdapter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
MAX_LENGTH = 52

CASES = [
    # name, prompt, negative, steps, guidance, seed, width, height, batch, scheduler, adapter
    ("en_default", "a red circle", None, 30, 7.5, 0, 64, 64, 1, None, False),
    ("en_euler_negative_batch", "a blue triangle on a white background", "a green square", 12, 5.0, 7, 64, 64, 2,
     "euler", False),
    ("en_wide", "a picture of a purple cross", None, 10, 7.5, 3, 96, 64, 1, None, False),
    ("zh_default", "一个红色的圆形", None, 30, 7.5, 0, 64, 64, 1, None, True),
    ("zh_held_out_negative", "一个蓝色的圆形", "绿色", 15, 6.0, 5, 64, 64, 1, None, True),
]


def adapter_module(path):
    state = load_file(path)
    widths = [state["projector.0.weight"].shape[1]]
    index = 0
    while f"projector.{index}.weight" in state:
        widths.append(state[f"projector.{index}.weight"].shape[0])
        index += 2
    module = ReferenceAdapter(widths)
    module.load_state_dict({k: v.float() for k, v in state.items()})
    return module.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "Tests", "Fixtures", "toyworld"))
    parser.add_argument("--models", default=os.path.join(ROOT, "models"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    teacher = os.path.join(args.models, "toyworld")
    encoder_dir = os.path.join(args.models, "toyworld-zh", "text_encoder")
    tokenizer = BertTokenizer.from_pretrained(encoder_dir)
    encoder = ChineseCLIPTextModel.from_pretrained(encoder_dir, add_pooling_layer=False).float()
    encoder.load_state_dict({k: v.float() for k, v in load_file(os.path.join(encoder_dir, "model.safetensors")).items()},
                            strict=False)
    encoder.eval()
    adapter = adapter_module(os.path.join(args.models, "toyworld-zh", "adapter.safetensors"))

    def adapted(texts):
        batch = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
        with torch.no_grad():
            states = encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            return adapter(states)[0]

    records = []
    for name, prompt, negative, steps, guidance, seed, width, height, batch, scheduler, pea in CASES:
        pipe = StableDiffusionPipeline.from_pretrained(teacher, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        if scheduler == "euler":
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                      num_images_per_prompt=batch, output_type="np", generator=torch.Generator("cpu").manual_seed(seed))
        with torch.no_grad():
            if pea:
                images = pipe(prompt_embeds=adapted([prompt]), negative_prompt_embeds=adapted([negative or ""]),
                              **kwargs).images
            else:
                images = pipe(prompt, negative_prompt=negative, **kwargs).images
        pixels = (images * 255).round().astype(np.int32)  # diffusers' numpy_to_pil
        file = f"toyworld_{name}.safetensors"
        save_file({"images": torch.from_numpy(pixels).contiguous()}, os.path.join(args.out, file))
        records.append({"name": name, "pipeline": "toyworld", "prompt": prompt, "negative_prompt": negative,
                        "steps": steps, "guidance": guidance, "seed": seed, "width": width, "height": height,
                        "batch": batch, "scheduler": scheduler, "adapter": pea, "images": file})
    with open(os.path.join(args.out, "pipeline_cases.json"), "w") as f:
        json.dump(records, f, indent=1, ensure_ascii=False)
    print(f"wrote {len(records)} toy-world cases to {args.out}")


if __name__ == "__main__":
    main()
