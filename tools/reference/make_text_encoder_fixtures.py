#!/usr/bin/env python3
"""Tiny CLIP text encoders (transformers) with random weights, saved as real model folders, and their outputs.

Writes, under --out (default Tests/Fixtures/models):
  clip_text_sd1/    CLIPTextModel, quick_gelu, legacy eos_token_id 2 (pooled at the largest id), as SD1's
  clip_text_proj/   CLIPTextModelWithProjection, gelu, eos_token_id set (pooled at the first EOS), as SDXL's 2nd
each with config.json, model.safetensors (save_pretrained) and io.safetensors: `input_ids` [B, L] int64,
`attention_mask` [B, L] int64 (only where the case uses it) and outputs `out.last_hidden_state`,
`out.pooler_output`, `out.hidden_states.{i}` (transformers' output_hidden_states), `out.text_embeds`.
Outputs are computed in float64 from the saved float32 weights.
"""
import argparse
import os

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection


def perturb(model, generator):
    # Move every parameter off its initial value (layer norms start at 1/0), so no wiring mistake can hide.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


def make_case(out, name, cls, config, ids, mask, generator):
    torch.manual_seed(0)
    model = cls(config).eval()
    perturb(model, generator)
    folder = os.path.join(out, name)
    model.save_pretrained(folder, safe_serialization=True)
    reference = cls.from_pretrained(folder).to(torch.float64).eval()
    with torch.no_grad():
        result = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    tensors = {"input_ids": ids}
    if mask is not None:
        tensors["attention_mask"] = mask
    tensors["out.last_hidden_state"] = result.last_hidden_state
    if cls is CLIPTextModel:
        tensors["out.pooler_output"] = result.pooler_output
    else:
        tensors["out.text_embeds"] = result.text_embeds
    for i, h in enumerate(result.hidden_states):
        tensors[f"out.hidden_states.{i}"] = h
    tensors = {k: (v.to(torch.float32) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(folder, "io.safetensors"), metadata={"kind": "clip_text", "class": cls.__name__})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="Tests/Fixtures/models")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(1234)
    vocab, length = 300, 12
    # Rows end in EOS (the largest id, 299) then padding, as a CLIP tokenizer makes them.
    ids = torch.tensor([[298, 5, 17, 250, 299, 299, 299, 299, 299, 299, 299, 299],
                        [298, 42, 7, 7, 99, 120, 3, 299, 0, 0, 0, 0],
                        [298, 299, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.int64)
    sd1 = CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=length, hidden_act="quick_gelu",
                         eos_token_id=2, bos_token_id=0, pad_token_id=1)
    make_case(args.out, "clip_text_sd1", CLIPTextModel, sd1, ids, None, generator)
    proj = CLIPTextConfig(vocab_size=vocab, hidden_size=40, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=5, max_position_embeddings=length, hidden_act="gelu",
                          projection_dim=24, eos_token_id=299, bos_token_id=298, pad_token_id=0,
                          layer_norm_eps=1e-5)
    mask = (torch.arange(length)[None, :] <= torch.tensor([[11], [7], [1]])).to(torch.int64)
    make_case(args.out, "clip_text_proj", CLIPTextModelWithProjection, proj, ids, mask, generator)
    print(f"wrote clip_text_sd1 and clip_text_proj to {args.out}")


if __name__ == "__main__":
    main()
