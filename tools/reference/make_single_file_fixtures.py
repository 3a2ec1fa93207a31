#!/usr/bin/env python3
"""Single-file checkpoints: the tiny SD1, SD2 and SDXL pipelines of Tests/Fixtures/pipelines (read, never rewritten;
SDXL's with a wider second text encoder, `make_sdxl`) written in the original LDM / A1111 layout, and what diffusers'
StableDiffusion(XL)Pipeline.from_single_file makes from them.

Writes, under --out (default Tests/Fixtures/single_file):
  sd1.safetensors  the UNet under `model.diffusion_model.`, the VAE under `first_stage_model.`, the CLIP text
                   encoder under `cond_stage_model.transformer.text_model.`, in the LDM names (converted by
                   `to_ldm` below, written here from the layout of the LDM code, not copied from diffusers' script)
  sd2.safetensors  the same for SD2, whose text encoder is open_clip's under `cond_stage_model.model.`
                   (resblocks, q/k/v fused into attn.in_proj_weight/bias, positional_embedding, ln_final)
  sdxl.safetensors  SDXL: CLIP under `conditioner.embedders.0.transformer.`, open_clip (with its transposed
                   text_projection) under `conditioner.embedders.1.model.`, the UNet's add embedding as `label_emb.0`
  sd1_vae.safetensors  sd1's VAE alone in the LDM names, no prefix (as VAEs are released): `--vae FILE`;
                   AutoencoderKL.from_single_file(config=sd1/vae) must give the folder's VAE exactly
  sdxl_config/     the SDXL variant's configs and tokenizers (no weights): its `config=` folder
  *.ckpt           the same tensors as torch.save({"state_dict": …}), as LDM training saved them
  cases.json       per case: name, pipeline (its folder gives `config=`), checkpoint, prompt, negative_prompt, steps, guidance, seed, width, height,
                   batch, scheduler (pea's name or null for the config's own), images
  <case>.safetensors  `images` [N, H, W, 3] int32 0…255, as make_pipeline_fixtures.py stores them
The tiny models need `config=` (from_single_file's defaults are full-size): their fixture folder. The
script asserts that from_single_file's UNet, VAE and text encoder state dicts equal the folder's, so the round
trip is exact, and that the .ckpt loads to the same pipeline.
"""
import argparse
import json
import os
import re

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline

from make_pipeline_fixtures import SCHEDULERS

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "..", "Tests", "Fixtures")
SD1 = os.path.join(FIXTURES, "pipelines", "sd1")

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def unet_prefixes(config):
    """diffusers prefix → LDM prefix, with whether the block is a resnet (its inner names differ too)."""
    layers = config["layers_per_block"]
    blocks = len(config["block_out_channels"])
    table = [("conv_in", "input_blocks.0.0", False), ("time_embedding.linear_1", "time_embed.0", False),
             ("time_embedding.linear_2", "time_embed.2", False), ("conv_norm_out", "out.0", False),
             ("conv_out", "out.2", False), ("mid_block.resnets.0", "middle_block.0", True),
             ("mid_block.attentions.0", "middle_block.1", False), ("mid_block.resnets.1", "middle_block.2", True),
             ("add_embedding.linear_1", "label_emb.0.0", False), ("add_embedding.linear_2", "label_emb.0.2", False)]
    index = 1
    for b in range(blocks):
        for j in range(layers):
            table.append((f"down_blocks.{b}.resnets.{j}", f"input_blocks.{index}.0", True))
            table.append((f"down_blocks.{b}.attentions.{j}", f"input_blocks.{index}.1", False))
            index += 1
        if b < blocks - 1:
            table.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{index}.0.op", False))
            index += 1
    for b in range(blocks):
        attention = "CrossAttn" in config["up_block_types"][b]
        for j in range(layers + 1):
            index = b * (layers + 1) + j
            table.append((f"up_blocks.{b}.resnets.{j}", f"output_blocks.{index}.0", True))
            table.append((f"up_blocks.{b}.attentions.{j}", f"output_blocks.{index}.1", False))
        if b < blocks - 1:
            table.append((f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{index}.{2 if attention else 1}.conv", False))
    return table


def vae_prefixes(config):
    blocks = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    table = []
    for side in ("encoder", "decoder"):
        table += [(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1"), (f"{side}.mid_block.resnets.1", f"{side}.mid.block_2"),
                  (f"{side}.mid_block.attentions.0.group_norm", f"{side}.mid.attn_1.norm"),
                  (f"{side}.mid_block.attentions.0.to_q", f"{side}.mid.attn_1.q"),
                  (f"{side}.mid_block.attentions.0.to_k", f"{side}.mid.attn_1.k"),
                  (f"{side}.mid_block.attentions.0.to_v", f"{side}.mid.attn_1.v"),
                  (f"{side}.mid_block.attentions.0.to_out.0", f"{side}.mid.attn_1.proj_out"),
                  (f"{side}.conv_norm_out", f"{side}.norm_out")]
    for b in range(blocks):
        for j in range(layers):
            table.append((f"encoder.down_blocks.{b}.resnets.{j}", f"encoder.down.{b}.block.{j}"))
        table.append((f"encoder.down_blocks.{b}.downsamplers.0.conv", f"encoder.down.{b}.downsample.conv"))
        # The decoder's LDM `up` list runs from the smallest resolution's end: diffusers' up block b is LDM's up.{n-1-b}.
        for j in range(layers + 1):
            table.append((f"decoder.up_blocks.{b}.resnets.{j}", f"decoder.up.{blocks - 1 - b}.block.{j}"))
        table.append((f"decoder.up_blocks.{b}.upsamplers.0.conv", f"decoder.up.{blocks - 1 - b}.upsample.conv"))
    return table


def rename(name, table):
    for new, old, *resnet in sorted(table, key=lambda r: -len(r[0])):
        if name == new or name.startswith(new + "."):
            rest = name[len(new):]
            if resnet and resnet[0]:
                for a, b in RESNET:
                    if rest.startswith("." + a + "."):
                        rest = "." + b + rest[len(a) + 1:]
            return old + rest
    return name


OPEN_CLIP_LAYER = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
                   ("self_attn.out_proj", "attn.out_proj")]


def to_open_clip(text, projection=False):
    """transformers' CLIPTextModel state → open_clip's text tower (SD2's `cond_stage_model.model.`): q/k/v fused
    into one in_proj, resblocks for layers, ln_final, a positional_embedding parameter."""
    text = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v for k, v in text.items()}
    state = {"token_embedding.weight": text.pop("text_model.embeddings.token_embedding.weight"),
             "positional_embedding": text.pop("text_model.embeddings.position_embedding.weight"),
             "ln_final.weight": text.pop("text_model.final_layer_norm.weight"),
             "ln_final.bias": text.pop("text_model.final_layer_norm.bias")}
    text.pop("text_model.embeddings.position_ids", None)
    if projection:
        # open_clip applies `x @ text_projection`: [hidden, projection], the transpose of nn.Linear's weight.
        state["text_projection"] = text.pop("text_projection.weight").T.contiguous()
    layers = sorted({int(k.split(".")[3]) for k in text if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        prefix = f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            state[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [text.pop(prefix + f"self_attn.{p}_proj.{kind}") for p in "qkv"])
            for new, old in OPEN_CLIP_LAYER:
                state[f"transformer.resblocks.{i}.{old}.{kind}"] = text.pop(prefix + f"{new}.{kind}")
    assert not text, sorted(text)
    return state


def to_ldm(folder):
    unet_config = json.load(open(os.path.join(folder, "unet", "config.json")))
    vae_config = json.load(open(os.path.join(folder, "vae", "config.json")))
    state = {}
    unet_table = unet_prefixes(unet_config)
    for name, tensor in load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")).items():
        state["model.diffusion_model." + rename(name, unet_table)] = tensor
    vae_table = vae_prefixes(vae_config)
    for name, tensor in load_file(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")).items():
        new = rename(name, vae_table)
        # LDM's VAE attention projections are 1×1 convolutions.
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", new):
            tensor = tensor[:, :, None, None]
        state["first_stage_model." + new] = tensor
    text = load_file(os.path.join(folder, "text_encoder", "model.safetensors"))
    if os.path.isdir(os.path.join(folder, "text_encoder_2")):   # SDXL: CLIP-L, then open_clip bigG with its projection
        for name, tensor in text.items():
            if not name.startswith("text_model."):
                name = "text_model." + name
            state["conditioner.embedders.0.transformer." + name] = tensor
        second = load_file(os.path.join(folder, "text_encoder_2", "model.safetensors"))
        second = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v for k, v in second.items()}
        for name, tensor in to_open_clip(second, projection=True).items():
            state["conditioner.embedders.1.model." + name] = tensor
    elif json.load(open(os.path.join(folder, "text_encoder", "config.json")))["hidden_act"] == "gelu":   # SD2: OpenCLIP
        for name, tensor in to_open_clip(text).items():
            state["cond_stage_model.model." + name] = tensor
    else:
        for name, tensor in text.items():
            if not name.startswith("text_model."):
                name = "text_model." + name
            state["cond_stage_model.transformer." + name] = tensor
    return {k: v.contiguous() for k, v in state.items()}


CASES = [
    # name, pipeline, prompt, negative, steps, guidance, seed, width, height, batch, scheduler
    ("sd1_pndm", "sd1", "a red fox in the snow, photo", None, 4, 7.5, 42, 32, 24, 1, None),
    ("sd1_euler_a_negative_batch", "sd1", "an astronaut riding a horse", "blurry", 5, 6.0, 7, 24, 32, 2, "euler-a"),
    ("sd2_ddim_v_prediction", "sd2", "a cabin in the woods!", None, 4, 7.5, 5, 24, 40, 1, None),
    ("sdxl_euler_zero_negative", "sdxl", "a cat wearing sunglasses", None, 4, 5.0, 0, 32, 32, 1, None),
    ("sdxl_dpmpp_negative", "sdxl", "a watercolor city skyline", "dark", 3, 7.0, 99, 24, 32, 1, "dpmpp-2m"),
]
PIPELINES = ("sd1", "sd2", "sdxl")


def make_sdxl(out):
    """The tiny SDXL fixture pipeline with a wider second text encoder (24 rather than 16: diffusers' from_single_file
    tells SDXL's two encoders apart by their width, as CLIP-L's 768 and bigG's 1280) and a UNet fitted to it,
    random weights from a fixed seed. Saved whole to a temporary folder (the source of the single file) and, without
    weights, under `out` (configs and tokenizers: the `config=` folder)."""
    import shutil
    import tempfile
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    from diffusers import UNet2DConditionModel
    base = StableDiffusionXLPipeline.from_pretrained(os.path.join(FIXTURES, "pipelines", "sdxl"))
    torch.manual_seed(20)
    second = base.text_encoder_2.config.to_dict()
    second.update(hidden_size=24, intermediate_size=48, projection_dim=24)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**second))
    unet_config = dict(base.unet.config)
    unet_config.update(cross_attention_dim=base.text_encoder.config.hidden_size + 24,
                       projection_class_embeddings_input_dim=6 * unet_config["addition_time_embed_dim"] + 24)
    unet = UNet2DConditionModel(**{k: v for k, v in unet_config.items() if not k.startswith("_")})
    pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=unet,
                                     scheduler=base.scheduler)
    source = tempfile.mkdtemp()
    pipe.save_pretrained(source)
    if os.path.isdir(out):
        shutil.rmtree(out)
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return source


def pipeline_class(which):
    return StableDiffusionXLPipeline if which == "sdxl" else StableDiffusionPipeline


def same_state(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    sa = {k: v for k, v in sa.items() if not k.endswith("position_ids")}
    sb = {k: v for k, v in sb.items() if not k.endswith("position_ids")}
    assert sa.keys() == sb.keys(), (what, sorted(set(sa) ^ set(sb))[:10])
    for k in sa:
        assert torch.equal(sa[k], sb[k]), (what, k)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(FIXTURES, "single_file"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    folders = {"sd1": SD1, "sd2": os.path.join(FIXTURES, "pipelines", "sd2"),
               "sdxl": os.path.join(args.out, "sdxl_config")}
    sources = dict(folders, sdxl=make_sdxl(folders["sdxl"]))
    for which in PIPELINES:
        source = sources[which]
        state = to_ldm(source)
        save_file(state, os.path.join(args.out, which + ".safetensors"))
        torch.save({"state_dict": state}, os.path.join(args.out, which + ".ckpt"))
        folder = pipeline_class(which).from_pretrained(source)
        parts = ("unet", "vae", "text_encoder", "text_encoder_2") if which == "sdxl" else ("unet", "vae", "text_encoder")
        for checkpoint in (which + ".safetensors", which + ".ckpt"):
            single = pipeline_class(which).from_single_file(os.path.join(args.out, checkpoint), config=folders[which],
                                                              local_files_only=True)
            for part in parts:
                same_state(getattr(single, part), getattr(folder, part), checkpoint + " " + part)
            assert type(single.scheduler) is type(folder.scheduler)
            assert single.scheduler.config.prediction_type == folder.scheduler.config.prediction_type

    # A VAE alone in the LDM layout, as VAEs are released (vae-ft-mse-840000-ema-pruned: no first_stage_model. prefix).
    vae = {k[len("first_stage_model."):]: v for k, v in to_ldm(SD1).items() if k.startswith("first_stage_model.")}
    save_file(vae, os.path.join(args.out, "sd1_vae.safetensors"))
    single_vae = AutoencoderKL.from_single_file(os.path.join(args.out, "sd1_vae.safetensors"),
                                                config=os.path.join(SD1, "vae"), local_files_only=True)
    same_state(single_vae, StableDiffusionPipeline.from_pretrained(SD1).vae, "sd1_vae.safetensors")

    records = []
    for name, which, prompt, negative, steps, guidance, seed, width, height, batch, scheduler in CASES:
        checkpoint = which + ".safetensors"
        kwargs = {} if which == "sdxl" else {"safety_checker": None}
        pipe = pipeline_class(which).from_single_file(os.path.join(args.out, checkpoint),
                                                      config=folders[which],
                                                      local_files_only=True, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        if scheduler is not None:
            pipe.scheduler = SCHEDULERS[scheduler](pipe.scheduler.config)
        with torch.no_grad():
            images = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                          width=width, height=height, num_images_per_prompt=batch, output_type="np",
                          generator=torch.Generator("cpu").manual_seed(seed)).images
        pixels = (images * 255).round().astype(np.int32)
        save_file({"images": torch.from_numpy(pixels).contiguous()}, os.path.join(args.out, name + ".safetensors"))
        records.append({"name": name, "pipeline": which, "config": os.path.relpath(folders[which], FIXTURES),
                        "checkpoint": checkpoint, "prompt": prompt, "negative_prompt": negative,
                        "steps": steps, "guidance": guidance, "seed": seed, "width": width, "height": height,
                        "batch": batch, "scheduler": scheduler, "images": name + ".safetensors"})
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(records, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
