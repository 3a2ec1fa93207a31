#!/usr/bin/env python3
"""A LoRA saved by diffusers' own writer with its PEFT config in the file (`lora_adapter_metadata`), and the image
diffusers makes with it, for the tiny SD1 pipeline (Tests/Fixtures/pipelines/sd1).

diffusers ≥ 0.34 writes each component's LoraConfig (`unet.r`, `unet.lora_alpha`, `unet.rank_pattern`,
`unet.alpha_pattern`, `text_encoder.use_rslora`, …) into the safetensors header, and `load_lora_weights` builds the
adapter from it instead of assuming alpha = rank. The file is made the way a trainer makes it: a LoraConfig added to
the model with `add_adapter`, the LoRA factors randomised, `get_peft_model_state_dict` + `save_lora_weights(...,
unet_lora_adapter_metadata=config.to_dict(), …)`.

Writes, under --out (default Tests/Fixtures/lora_metadata):
  peft_metadata.safetensors  UNet: r 4, lora_alpha 8, one module at rank 2 (rank_pattern) and one with alpha 3
                             (alpha_pattern); text encoder: r 2, lora_alpha 3, use_rslora (scale alpha/√r)
  cases.json                 per case: the file, scale, prompt, steps, guidance, seed, size, image file
  <case>.safetensors         `images` [N, H, W, 3] int32 0…255, as make_pipeline_fixtures.py writes them
The script checks that each module's fused delta is scale · (alpha/r or alpha/√r) · up·down with the rank and alpha the
config gives that module, so the metadata really decided the scales.
"""
import argparse
import json
import math
import os

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
PIPELINE = os.path.join(HERE, "..", "..", "Tests", "Fixtures", "pipelines", "sd1")

UNET_CONFIG = dict(
    r=4, lora_alpha=8,
    target_modules=["to_q", "to_v", "proj_in", "down_blocks.0.resnets.0.conv1"],
    rank_pattern={"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q": 2},
    alpha_pattern={"up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v": 3.0},
)
TEXT_CONFIG = dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "fc1"])

CASES = [
    # name, scale, prompt, steps, guidance, seed, width, height
    ("metadata_scale09", 0.9, "a red fox in the snow, photo", 4, 7.5, 11, 32, 24),
]


def randomise(model, generator):
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = 0.3 * torch.randn(p.shape, generator=generator)


def lora_modules(model):
    """{module name: (lora layer)} of a model that has a PEFT adapter."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


def make_file(out):
    pipe = StableDiffusionPipeline.from_pretrained(PIPELINE)
    generator = torch.Generator().manual_seed(21)
    pipe.unet.add_adapter(LoraConfig(**UNET_CONFIG))
    # transformers' own add_adapter wants a newer peft than PyPI has; peft's injection is what it calls.
    text_config = LoraConfig(**TEXT_CONFIG)
    inject_adapter_in_model(text_config, pipe.text_encoder, adapter_name="default")
    pipe.text_encoder.peft_config = {"default": text_config}
    randomise(pipe.unet, generator)
    randomise(pipe.text_encoder, generator)
    StableDiffusionPipeline.save_lora_weights(
        out, weight_name="peft_metadata.safetensors",
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict())
    path = os.path.join(out, "peft_metadata.safetensors")
    with safe_open(path, "pt") as f:
        assert "lora_adapter_metadata" in (f.metadata() or {}), "diffusers wrote no lora_adapter_metadata"
    return path


def expected_factors(path):
    """(component, module) → (down, up, alpha/r or alpha/√r) from the file's tensors and the metadata's config, as
    PEFT resolves rank_pattern / alpha_pattern (the pattern names a module or a dotted suffix of it)."""
    with safe_open(path, "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    factors = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        component, module = key.split(".", 1)
        module = module.removesuffix(".lora_A.weight")
        config = {k.split(".", 1)[1]: v for k, v in metadata.items() if k.startswith(component + ".")}

        def pattern(table, default):
            for p, v in table.items():
                if module == p or module.endswith("." + p):
                    return v
            return default
        r = pattern(config.get("rank_pattern") or {}, config["r"])
        alpha = pattern(config.get("alpha_pattern") or {}, config["lora_alpha"])
        down, up = tensors[key], tensors[key.replace("lora_A", "lora_B")]
        assert down.shape[0] == r
        factors[(component, module)] = (down, up, alpha / (math.sqrt(r) if config.get("use_rslora") else r))
    return factors


def module(pipe, component, name):
    m = getattr(pipe, component)
    for part in name.split("."):
        m = getattr(m, part)
    return m


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="Tests/Fixtures/lora_metadata")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = make_file(args.out)
    torch.set_grad_enabled(False)
    factors = expected_factors(path)
    assert any(f != 1 for *_, f in factors.values())
    records = []
    for name, scale, prompt, steps, guidance, seed, width, height in CASES:
        def run(p):
            return p(prompt, num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                     output_type="np", generator=torch.Generator("cpu").manual_seed(seed)).images
        pipe = StableDiffusionPipeline.from_pretrained(PIPELINE)
        plain = run(pipe)
        before = {k: module(pipe, *k).weight.clone() for k in factors}
        pipe.load_lora_weights(path)
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()
        for (component, mod), (down, up, factor) in factors.items():
            w0 = before[(component, mod)]
            expected = (up.flatten(1) @ down.flatten(1)).reshape(w0.shape) * scale * factor
            err = float((module(pipe, component, mod).weight - w0 - expected).abs().max())
            assert err < 1e-5, f"{component}.{mod}: fused delta differs from the metadata's scale by {err}"
        images = run(pipe)
        print(name, "mean |Δ| vs no LoRA (0…255):", float(np.abs(images - plain).mean() * 255))
        pixels = (images * 255).round().astype(np.int32)
        save_file({"images": torch.from_numpy(pixels).contiguous()}, os.path.join(args.out, name + ".safetensors"))
        records.append({"name": name, "file": os.path.basename(path), "scale": scale, "prompt": prompt, "steps": steps,
                        "guidance": guidance, "seed": seed, "width": width, "height": height, "images": name + ".safetensors"})
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
