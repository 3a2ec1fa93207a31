#!/usr/bin/env python3
"""PEA end to end: a Chinese-CLIP text tower + a PEA adapter in front of the tiny diffusers pipelines of
Tests/Fixtures/pipelines, and the images diffusers makes from their conditioning.

Writes, under --out (default Tests/Fixtures/pea):
  zh_encoder/          a tiny ChineseCLIPTextModel (transformers format) with a small WordPiece vocab.txt: the
                       special tokens and the first ids of cn_clip's real vocabulary plus the CJK characters the
                       prompts use (ids as in that vocab.txt; the model's vocab_size is its length)
  adapter_sd1.safetensors          SD1 form: layernorm → 3 bias-free linears (16 → 32 → 32 → 16)
  adapter_sdxl/pytorch_model.bin   SDXL form, as the authors release adapters (torch.save of a state dict):
                                   16 → 24 → 16, then fc 16 → 32 for the sequence, mean over tokens as pooled
  cases.json, <case>.safetensors   per case the settings and `images` [N, H, W, 3] int32 0…255
The reference conditioning is what the official inference scripts compute: prompt and negative prompt (""
when none) through the tokenizer (max_length 52, padding, truncation), the encoder's last hidden state with
the attention mask, then the adapter; the pipelines get prompt_embeds / negative_prompt_embeds (and the
pooled vectors for SDXL), generator torch.Generator("cpu").manual_seed(seed).
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import BertTokenizer, ChineseCLIPTextConfig, ChineseCLIPTextModel

from make_multilingual_fixtures import ReferenceAdapter  # the adapter written from PEA-METHOD.md

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "..", "Tests", "Fixtures")
MAX_LENGTH = 52  # cn_clip's context length

PROMPTS = ["一只戴着墨镜的猫，油画", "雪山下的红色小屋 photo 4k"]


def perturb(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def small_vocabulary():
    """cn_clip's vocab.txt cut to its first 1000 entries (specials, punctuation, digits, latin pieces) plus the
    CJK characters of the prompts, keeping their real ids' order."""
    with open(os.path.join(FIXTURES, "tokenizers", "cn_clip", "vocab.txt"), encoding="utf-8") as f:
        full = [line.rstrip("\n") for line in f]
    wanted = set(full[:1000]) | {ch for prompt in PROMPTS for ch in prompt}
    wanted |= {"photo", "4k", "##k"}
    return [token for token in full if token in wanted]


def make_encoder(folder):
    os.makedirs(folder)
    vocab = small_vocabulary()
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    shutil.copy(os.path.join(FIXTURES, "tokenizers", "cn_clip", "tokenizer_config.json"), folder)
    config = ChineseCLIPTextConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=64, type_vocab_size=2,
                                   layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0)
    torch.manual_seed(21)
    model = perturb(ChineseCLIPTextModel(config, add_pooling_layer=False), 22).eval()
    model.save_pretrained(folder, safe_serialization=True)


def load_encoder(folder):
    tokenizer = BertTokenizer.from_pretrained(folder)
    model = ChineseCLIPTextModel.from_pretrained(folder, add_pooling_layer=False)
    # transformers 5 zeroes the padding row while loading; the file's values are the truth (PEA-METHOD.md).
    model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")), strict=False)
    return tokenizer, model.eval()


def adapted(texts, tokenizer, encoder, adapter):
    batch = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        return adapter(states)


CASES = [
    # name, pipeline, adapter, prompt, negative, steps, guidance, seed, width, height, batch, scheduler
    ("sd1_zh", "sd1", "adapter_sd1.safetensors", PROMPTS[0], None, 4, 7.5, 11, 32, 24, 1, None),
    ("sd1_zh_negative_batch", "sd1", "adapter_sd1.safetensors", PROMPTS[1], "模糊", 3, 5.0, 12, 24, 24, 2, "dpmpp-2m"),
    ("sdxl_zh", "sdxl", "adapter_sdxl/pytorch_model.bin", PROMPTS[0], None, 4, 6.0, 13, 24, 32, 1, None),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="Tests/Fixtures/pea")
    args = parser.parse_args()
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    make_encoder(os.path.join(args.out, "zh_encoder"))
    tokenizer, encoder = load_encoder(os.path.join(args.out, "zh_encoder"))

    torch.manual_seed(31)
    sd1_adapter = perturb(ReferenceAdapter([16, 32, 32, 16]), 32).eval()
    save_file({k: v.contiguous() for k, v in sd1_adapter.state_dict().items()}, os.path.join(args.out, "adapter_sd1.safetensors"))
    torch.manual_seed(33)
    sdxl_adapter = perturb(ReferenceAdapter([16, 24, 16], fc_out=32), 34).eval()
    os.makedirs(os.path.join(args.out, "adapter_sdxl"))
    torch.save(sdxl_adapter.state_dict(), os.path.join(args.out, "adapter_sdxl", "pytorch_model.bin"))
    adapters = {"adapter_sd1.safetensors": sd1_adapter, "adapter_sdxl/pytorch_model.bin": sdxl_adapter}

    records = []
    for name, which, adapter_file, prompt, negative, steps, guidance, seed, width, height, batch, scheduler in CASES:
        cls = StableDiffusionXLPipeline if which == "sdxl" else StableDiffusionPipeline
        pipe = cls.from_pretrained(os.path.join(FIXTURES, "pipelines", which))
        pipe.set_progress_bar_config(disable=True)
        if scheduler == "dpmpp-2m":
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                                     solver_order=2, use_karras_sigmas=False)
        adapter = adapters[adapter_file]
        sequence, pooled = adapted([prompt] * batch, tokenizer, encoder, adapter)
        negative_sequence, negative_pooled = adapted([negative or ""] * batch, tokenizer, encoder, adapter)
        kwargs = dict(prompt_embeds=sequence, negative_prompt_embeds=negative_sequence)
        if which == "sdxl":
            kwargs.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
        with torch.no_grad():
            images = pipe(num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                          output_type="np", generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images
        pixels = (images * 255).round().astype(np.int32)
        save_file({"images": torch.from_numpy(pixels).contiguous()}, os.path.join(args.out, name + ".safetensors"))
        records.append({"name": name, "pipeline": which, "adapter": adapter_file, "prompt": prompt,
                        "negative_prompt": negative, "steps": steps, "guidance": guidance, "seed": seed,
                        "width": width, "height": height, "batch": batch, "scheduler": scheduler,
                        "images": name + ".safetensors"})
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(records, f, indent=1, ensure_ascii=False)
    total = sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(args.out) for n in names)
    print(f"wrote {len(records)} PEA cases ({total / 1024:.0f} KiB) to {args.out}")


if __name__ == "__main__":
    main()
