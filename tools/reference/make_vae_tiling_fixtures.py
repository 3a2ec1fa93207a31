#!/usr/bin/env python3
"""diffusers' tiled VAE decoding (`vae.enable_tiling()`) on the tiny SD1 fixture VAE, for `pea --vae-tiling`.

The fixture VAE (Tests/Fixtures/pipelines/sd1/vae: sample_size 32, two blocks, so 16-latent tiles every 12
latents, blended over 8 pixels, cropped to 24) decodes random latents of shapes that tile in one or both
directions, with a short last tile, a batch of two, and one no larger than a tile (decoded whole). Writes
--out (default Tests/Fixtures/vae_tiling/cases.safetensors): per case `<case>.latents` (already divided by
scaling_factor, as AutoencoderKL.decode takes them) and `<case>.sample` (diffusers' decode(...).sample with
tiling on), plus `<case>.untiled` (tiling off), so that a test can tell that tiling was used.
"""
import argparse
import os

import torch
from safetensors.torch import save_file
from diffusers import AutoencoderKL

HERE = os.path.dirname(os.path.abspath(__file__))
VAE = os.path.join(HERE, "..", "..", "Tests", "Fixtures", "pipelines", "sd1", "vae")
CASES = {"wide_and_tall": (1, 40, 28), "batch_of_two": (2, 20, 16), "one_tile": (1, 16, 12)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="Tests/Fixtures/vae_tiling/cases.safetensors")
    args = parser.parse_args()
    vae = AutoencoderKL.from_pretrained(VAE).eval()
    assert (vae.tile_latent_min_size, vae.tile_sample_min_size) == (16, 32), (vae.tile_latent_min_size, vae.tile_sample_min_size)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (batch, height, width) in CASES.items():
        latents = torch.randn(batch, 4, height, width, generator=generator)
        with torch.no_grad():
            vae.disable_tiling()
            untiled = vae.decode(latents).sample
            vae.enable_tiling()
            tiled = vae.decode(latents).sample
        tensors[f"{name}.latents"] = latents
        tensors[f"{name}.sample"] = tiled
        tensors[f"{name}.untiled"] = untiled
        print(name, tuple(tiled.shape), "max |tiled - untiled|", float((tiled - untiled).abs().max()))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.out)


if __name__ == "__main__":
    main()
