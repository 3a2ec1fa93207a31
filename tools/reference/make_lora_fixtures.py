#!/usr/bin/env python3
"""LoRA files for the tiny SD1 pipeline (Tests/Fixtures/pipelines/sd1) and the images diffusers makes with them.

Writes, under --out (default Tests/Fixtures/lora):
  peft.safetensors    diffusers/PEFT names (`unet.<module>.lora_A.weight`, `lora_B.weight`, `text_encoder.…`), no
                      alpha (diffusers then uses alpha = rank): UNet self- and cross-attention projections, a 1×1
                      proj_in, a 3×3 resnet conv (down [r, in, 3, 3], up [out, r, 1, 1]) and the text encoder
  kohya.safetensors   kohya names (`lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
                      `lora_te_…`), alpha ≠ rank, one LoCon 3×3 conv
  sdxl_peft.safetensors   diffusers/PEFT names for the tiny SDXL pipeline: UNet (linear, 3×3 conv) and both text encoders
  sdxl_kohya.safetensors  for the tiny SDXL pipeline: kohya names in the LDM (sgm) UNet layout, as kohya names SDXL
                      LoRAs (`lora_unet_input_blocks_3_1_…`, `middle_block_…`, `output_blocks_…`), and both text
                      encoders (`lora_te1_…`, `lora_te2_…`); diffusers maps the blocks by its sgm→diffusers arithmetic
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
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

HERE = os.path.dirname(os.path.abspath(__file__))
PIPELINE = os.path.join(HERE, "..", "..", "Tests", "Fixtures", "pipelines", "sd1")
SDXL_PIPELINE = os.path.join(HERE, "..", "..", "Tests", "Fixtures", "pipelines", "sdxl")

# (component, diffusers module, kohya key, kind, rank, alpha) for the tiny SDXL pipeline (layers_per_block 1; down 0
# without attention, down 1 with two transformer layers and linear projections). One alpha per text encoder (see
# KOHYA_MODULES), and the attention projections' alpha the most common one: diffusers turns kohya's to_q/to_k/… into
# `processor.to_k_lora` names that its alpha patterns then fail to match (check_all_applied caught it).
SDXL_MODULES = [
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q", "input_blocks_3_1_transformer_blocks_1_attn1_to_q", "linear", 2, 1.0),
    ("unet", "down_blocks.0.resnets.0.conv1", "input_blocks_1_0_in_layers_2", "conv3", 2, 2.0),
    ("unet", "up_blocks.0.attentions.1.proj_out", "output_blocks_1_1_proj_out", "linear", 3, 1.5),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "middle_block_1_transformer_blocks_0_attn2_to_k", "linear", 4, 1.0),
    ("unet", "up_blocks.1.resnets.1.conv2", "output_blocks_3_0_out_layers_3", "conv3", 2, 1.0),
    ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", "text_model_encoder_layers_0_self_attn_q_proj", "linear", 2, 2.0),
    ("text_encoder", "text_model.encoder.layers.0.self_attn.out_proj", "text_model_encoder_layers_0_self_attn_out_proj", "linear", 2, 2.0),
    ("text_encoder_2", "text_model.encoder.layers.1.self_attn.k_proj", "text_model_encoder_layers_1_self_attn_k_proj", "linear", 3, 3.0),
    ("text_encoder_2", "text_model.encoder.layers.1.self_attn.out_proj", "text_model_encoder_layers_1_self_attn_out_proj", "linear", 2, 3.0),
]
SDXL_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# (component, module, kind, rank) of sdxl_peft.safetensors: diffusers/PEFT names for the tiny SDXL pipeline, no alphas.
SDXL_PEFT_MODULES = [
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v", "linear", 3),
    ("unet", "mid_block.resnets.1.conv1", "conv3", 2),
    ("unet", "up_blocks.0.attentions.0.proj_in", "linear", 2),
    ("text_encoder", "text_model.encoder.layers.1.self_attn.v_proj", "linear", 2),
    # diffusers recognises a PEFT text-encoder LoRA by an attention projection among its modules, as real ones have.
    ("text_encoder_2", "text_model.encoder.layers.0.self_attn.k_proj", "linear", 2),
    ("text_encoder_2", "text_model.encoder.layers.0.mlp.fc2", "linear", 4),
]

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


def write_peft(pipe, modules, generator, path):
    """A diffusers/PEFT-named LoRA (no alphas) for (component, module, kind, rank) `modules`."""
    peft = {}
    for component, name, kind, rank in modules:
        down, up = factors(module(pipe, component, name), kind, rank, generator)
        peft[f"{component}.{name}.lora_A.weight"] = down
        peft[f"{component}.{name}.lora_B.weight"] = up
    save_file(peft, path)


# The PEFT-named files and their modules.
PEFT_FILES = {"peft.safetensors": PEFT_MODULES, "sdxl_peft.safetensors": SDXL_PEFT_MODULES}


def make_files(pipe, out):
    generator = torch.Generator().manual_seed(5)
    write_peft(pipe, PEFT_MODULES, generator, os.path.join(out, "peft.safetensors"))
    kohya = {}
    for component, name, kind, rank, alpha in KOHYA_MODULES:
        down, up = factors(module(pipe, component, name), kind, rank, generator)
        key = ("lora_unet_" if component == "unet" else "lora_te_") + name.replace(".", "_")
        kohya[key + ".lora_down.weight"] = down
        kohya[key + ".lora_up.weight"] = up
        kohya[key + ".alpha"] = torch.tensor(alpha)
    save_file(kohya, os.path.join(out, "kohya.safetensors"))


def make_sdxl_file(pipe, out):
    generator = torch.Generator().manual_seed(6)
    tensors = {}
    for component, name, key, kind, rank, alpha in SDXL_MODULES:
        down, up = factors(module(pipe, component, name), kind, rank, generator)
        tensors[SDXL_PREFIX[component] + key + ".lora_down.weight"] = down
        tensors[SDXL_PREFIX[component] + key + ".lora_up.weight"] = up
        tensors[SDXL_PREFIX[component] + key + ".alpha"] = torch.tensor(alpha)
    save_file(tensors, os.path.join(out, "sdxl_kohya.safetensors"))
    write_peft(pipe, SDXL_PEFT_MODULES, generator, os.path.join(out, "sdxl_peft.safetensors"))


def file_keys(file):
    """(component, module, down key, up key, rank, alpha or None) of each module of one of the files."""
    if file in PEFT_FILES:
        return [(c, m, f"{c}.{m}.lora_A.weight", f"{c}.{m}.lora_B.weight", r, None) for c, m, _, r in PEFT_FILES[file]]
    if file == "kohya.safetensors":
        keys = [(c, m, ("lora_unet_" if c == "unet" else "lora_te_") + m.replace(".", "_"), r, a) for c, m, _, r, a in KOHYA_MODULES]
    else:
        keys = [(c, m, SDXL_PREFIX[c] + k, r, a) for c, m, k, _, r, a in SDXL_MODULES]
    return [(c, m, k + ".lora_down.weight", k + ".lora_up.weight", r, a) for c, m, k, r, a in keys]


def check_all_applied(before, pipe, path, modules, scale):
    # Every module's weight moved by scale · alpha/rank · up·down: diffusers applied each tensor as documented.
    tensors = load_file(path)
    for component, name, down_key, up_key, rank, *alpha in modules:
        alpha = [a for a in alpha if a is not None]
        down, up = tensors[down_key], tensors[up_key]
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
    ("sdxl_kohya_scale08", [("sdxl_kohya.safetensors", 0.8)], "a cat wearing sunglasses", 4, 5.0, 0, 32, 24),
    ("sdxl_kohya_scale13", [("sdxl_kohya.safetensors", 1.3)], "a lighthouse at dusk", 4, 5.0, 8, 24, 32),
    ("sdxl_peft_scale06", [("sdxl_peft.safetensors", 0.6)], "a cat wearing sunglasses", 4, 5.0, 2, 32, 24),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="Tests/Fixtures/lora")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_grad_enabled(False)
    make_files(StableDiffusionPipeline.from_pretrained(PIPELINE), args.out)
    make_sdxl_file(StableDiffusionXLPipeline.from_pretrained(SDXL_PIPELINE), args.out)
    records = []
    for name, loras, prompt, steps, guidance, seed, width, height in CASES:
        def run(p):
            return p(prompt, num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                     output_type="np", generator=torch.Generator("cpu").manual_seed(seed)).images
        sdxl = name.startswith("sdxl")
        pipe = (StableDiffusionXLPipeline.from_pretrained(SDXL_PIPELINE) if sdxl else StableDiffusionPipeline.from_pretrained(PIPELINE))
        plain = run(pipe)
        before = {(c, m): module(pipe, c, m).weight.clone() for f, _ in loras for c, m, *_ in file_keys(f)}
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
            check_all_applied(before, pipe, os.path.join(args.out, loras[0][0]), file_keys(loras[0][0]), loras[0][1])
        images = run(pipe)
        print(name, "mean |Δ| vs no LoRA (0…255):", float(np.abs(images - plain).mean() * 255))
        pixels = (images * 255).round().astype(np.int32)  # diffusers' numpy_to_pil
        save_file({"images": torch.from_numpy(pixels).contiguous()}, os.path.join(args.out, name + ".safetensors"))
        records.append({"name": name, "pipeline": "sdxl" if sdxl else "sd1", "loras": [{"file": f, "scale": s} for f, s in loras], "prompt": prompt,
                        "steps": steps, "guidance": guidance, "seed": seed, "width": width, "height": height,
                        "images": name + ".safetensors"})
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
