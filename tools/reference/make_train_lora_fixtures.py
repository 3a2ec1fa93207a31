#!/usr/bin/env python3
"""A LoRA fused into the tiny SD1 pipeline by diffusers, for `pea train --lora` (TrainSingleFileTests).

Loads Tests/Fixtures/pipelines/sd1, applies Tests/Fixtures/lora/kohya.safetensors (UNet and text-encoder modules,
alpha ≠ rank, a LoCon 3×3 conv) with `load_lora_weights` + `fuse_lora(lora_scale=0.7)` + `unload_lora_weights`,
`save_pretrained`s the pipeline, and keeps the two components the LoRA changes:

  Tests/Fixtures/lora/train_fused_kohya07/unet/          config.json + diffusion_pytorch_model.safetensors (f32)
  Tests/Fixtures/lora/train_fused_kohya07/text_encoder/  config.json + model.safetensors (f32)

The VAE, tokenizer, scheduler and model_index.json are the source pipeline's (the LoRA does not touch them), so the
test assembles the fused pipeline folder from these two and pipelines/sd1's others. Run after make_lora_fixtures.py
(it reads kohya.safetensors). CPU, f32.
"""
import argparse
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file
from diffusers import StableDiffusionPipeline

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "..", "Tests", "Fixtures")
PIPELINE = os.path.join(FIXTURES, "pipelines", "sd1")
LORA = os.path.join(FIXTURES, "lora", "kohya.safetensors")
SCALE = 0.7
COMPONENTS = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(FIXTURES, "lora", "train_fused_kohya07"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipe = StableDiffusionPipeline.from_pretrained(PIPELINE)
    pipe.load_lora_weights(LORA)
    pipe.fuse_lora(lora_scale=SCALE)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    with tempfile.TemporaryDirectory() as saved:
        pipe.save_pretrained(saved)
        for component, weights in COMPONENTS.items():
            fused = load_file(os.path.join(saved, component, weights))
            source = load_file(os.path.join(PIPELINE, component, weights))
            changed = sorted(name for name in source if not torch.equal(source[name], fused[name]))
            assert changed, f"{component}: the LoRA changed no weight"
            assert all(t.dtype == torch.float32 for t in fused.values())
            print(component, "weights the LoRA changed:", len(changed))
            os.makedirs(os.path.join(args.out, component), exist_ok=True)
            for name in ("config.json", weights):
                shutil.copyfile(os.path.join(saved, component, name), os.path.join(args.out, component, name))


if __name__ == "__main__":
    main()
