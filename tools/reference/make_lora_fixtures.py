#!/usr/bin/env python3
"""LoRA files for the tiny SD1 pipeline (Tests/Fixtures/pipelines/sd1) and the images diffusers makes with them.

Writes, under --out (default Tests/Fixtures/lora):
  peft.safetensors    diffusers/PEFT names (`unet.<module>.lora_A.weight`, `lora_B.weight`, `text_encoder.…`), no
                      alpha (diffusers then uses alpha = rank): UNet self- and cross-attention projections, a 1×1
                      proj_in, a 3×3 resnet conv (down [r, in, 3, 3], up [out, r, 1, 1]) and the text encoder
  kohya.safetensors   kohya names (`lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
                      `lora_te_…`), alpha ≠ rank, one LoCon 3×3 conv
  cases.json          per case: the LoRA files with their scales, prompt, steps, guidance, seed, size, image file
  <case>.safetensors  `images` [N, H, W, 3] int32 0…255, as make_pipeline_fixtures.py writes them
Each case loads the files with `pipe.load_lora_weights` and merges them with `pipe.fuse_lora(lora_scale=s)` (one
file per case; the two-file case sets per-adapter weights with `set_adapters` and fuses at scale 1), CPU, f32.
The script checks that every LoRA module changed the weight it names, so no tensor is silently ignored.
"""
import argparse
import json
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from diffusers import StableDiffusionPipeline

HERE = os.path.dirname(os.path.abspath(__file__))
PIPELINE = os.path.join(HERE, "..", "..", "Tests", "Fixtures", "pipelines", "sd1")

# (component, module, kind) — kind "linear", "conv1" (1×1) or "conv3" (3×3).
PEFT_MODULES = [
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "linear", 4),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "linear", 2),
    ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", "linear", 3),
    ("unet", "down_blocks.0.attentions.0.proj_in", "conv1", 2),
    ("unet", "down_blocks.0.resnets.0.conv1", "conv3", 2),
    ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", "linear", 4),
    ("text_encoder", "text_model.encoder.layers.1.mlp.fc1", "linear", 2),
]
KOHYA_MODULES = [
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", "linear", 4, 2.0),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.2", "linear", 2, 1.0),
    ("unet", "up_blocks.1.resnets.1.conv2", "conv3", 3, 1.5),
    ("unet", "up_blocks.1.attentions.0.proj_out", "conv1", 2, 4.0),
    # diffusers recognises kohya text-encoder LoRAs by an out_proj among them, as real ones (q, k, v, out, fc1, fc2) have.
    # One alpha for the text encoder: with transformers 5 (no `text_model.` level) diffusers' per-module alpha
    # patterns for it match nothing and are dropped, which check_all_applied would catch.
    ("text_encoder", "text_model.encoder.layers.2.self_attn.v_proj", "linear", 3, 2.0),
    ("text_encoder", "text_model.encoder.layers.2.self_attn.out_proj", "linear", 2, 2.0),
    ("text_encoder", "text_model.encoder.layers.0.mlp.fc2", "linear", 2, 2.0),
]


def module(pipe, component, name):
    m = getattr(pipe, component)
    if not hasattr(m, "text_model"):
        # transformers 5's CLIPTextModel has no `text_model.` level; LoRA files name it as released ones do.
        name = name.removeprefix("text_model.")
    for part in name.split("."):
        m = getattr(m, part)
    return m


def factors(layer, kind, rank, generator):
    w = layer.weight
    if kind == "linear":
        down_shape, up_shape = (rank, w.shape[1]), (w.shape[0], rank)
    else:
        k = w.shape[2]
        down_shape, up_shape = (rank, w.shape[1], k, k), (w.shape[0], rank, 1, 1)
    # Small enough that the image stays sane, large enough that it changes visibly.
    down = 0.3 * torch.randn(down_shape, generator=generator)
    up = 0.3 * torch.randn(up_shape, generator=generator)
    return down.contiguous(), up.contiguous()


def make_files(pipe, out):
    generator = torch.Generator().manual_seed(5)
    peft = {}
    for component, name, kind, rank in PEFT_MODULES:
        down, up = factors(module(pipe, component, name), kind, rank, generator)
        peft[f"{component}.{name}.lora_A.weight"] = down
        peft[f"{component}.{name}.lora_B.weight"] = up
    save_file(peft, os.path.join(out, "peft.safetensors"))
    kohya = {}
    for component, name, kind, rank, alpha in KOHYA_MODULES:
        down, up = factors(module(pipe, component, name), kind, rank, generator)
        key = ("lora_unet_" if component == "unet" else "lora_te_") + name.replace(".", "_")
        kohya[key + ".lora_down.weight"] = down
        kohya[key + ".lora_up.weight"] = up
        kohya[key + ".alpha"] = torch.tensor(alpha)
    save_file(kohya, os.path.join(out, "kohya.safetensors"))


def check_all_applied(before, pipe, path, modules, scale):
    # Every module's weight moved by scale · alpha/rank · up·down: diffusers applied each tensor as documented.
    tensors = load_file(path)
    for component, name, kind, rank, *alpha in modules:
        keys = ([f"{component}.{name}.lora_A.weight", f"{component}.{name}.lora_B.weight"] if not alpha else
                [("lora_unet_" if component == "unet" else "lora_te_") + name.replace(".", "_") + s
                 for s in (".lora_down.weight", ".lora_up.weight")])
        down, up = (tensors[k] for k in keys)
        factor = scale * (alpha[0] if alpha else rank) / rank
        before_w = before[(component, name)]
        expected = (up.flatten(1) @ down.flatten(1)).reshape(before_w.shape) * factor
        delta = module(pipe, component, name).weight - before_w
        err = float((delta - expected).abs().max())
        assert err < 1e-5, f"{component}.{name}: diffusers' fused delta differs from scale·alpha/rank·up·down by {err}"


CASES = [
    # name, [(file, scale)], prompt, steps, guidance, seed, width, height
    ("peft_scale1", [("peft.safetensors", 1.0)], "a red fox in the snow, photo", 4, 7.5, 42, 32, 24),
    ("kohya_scale07", [("kohya.safetensors", 0.7)], "an astronaut riding a horse", 4, 6.0, 7, 24, 32),
    ("both", [("peft.safetensors", 0.5), ("kohya.safetensors", 1.2)], "a red fox in the snow, photo", 4, 7.5, 3, 32, 24),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="Tests/Fixtures/lora")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_grad_enabled(False)
    make_files(StableDiffusionPipeline.from_pretrained(PIPELINE), args.out)
    all_modules = {"peft.safetensors": PEFT_MODULES, "kohya.safetensors": KOHYA_MODULES}
    records = []
    for name, loras, prompt, steps, guidance, seed, width, height in CASES:
        def run(p):
            return p(prompt, num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                     output_type="np", generator=torch.Generator("cpu").manual_seed(seed)).images
        pipe = StableDiffusionPipeline.from_pretrained(PIPELINE)
        plain = run(pipe)
        before = {(c, m): module(pipe, c, m).weight.clone() for f, _ in loras for c, m, *_ in all_modules[f]}
        if len(loras) == 1:
            pipe.load_lora_weights(os.path.join(args.out, loras[0][0]))
            pipe.fuse_lora(lora_scale=loras[0][1])
        else:
            names = [f"a{i}" for i in range(len(loras))]
            for (file, _), adapter in zip(loras, names):
                pipe.load_lora_weights(os.path.join(args.out, file), adapter_name=adapter)
            pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
            pipe.fuse_lora(lora_scale=1.0, adapter_names=names)
        pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
        if len(loras) == 1:
            check_all_applied(before, pipe, os.path.join(args.out, loras[0][0]), all_modules[loras[0][0]], loras[0][1])
        images = run(pipe)
        print(name, "mean |Δ| vs no LoRA (0…255):", float(np.abs(images - plain).mean() * 255))
        pixels = (images * 255).round().astype(np.int32)  # diffusers' numpy_to_pil
        save_file({"images": torch.from_numpy(pixels).contiguous()}, os.path.join(args.out, name + ".safetensors"))
        records.append({"name": name, "loras": [{"file": f, "scale": s} for f, s in loras], "prompt": prompt,
                        "steps": steps, "guidance": guidance, "seed": seed, "width": width, "height": height,
                        "images": name + ".safetensors"})
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
