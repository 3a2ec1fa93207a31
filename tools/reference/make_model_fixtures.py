#!/usr/bin/env python3
"""Model-level reference fixtures for Pea: tiny diffusers models with random weights, and their outputs.

Each case is a folder `<out>/<case>/` that loads like a user's model folder:
  - `config.json` and `diffusion_pytorch_model.safetensors` (or an index and shards), written by diffusers'
    own `save_pretrained(safe_serialization=True)`, float32;
  - `io.safetensors`: the inputs under the names of `pea eval` (docs/command-line.md) and the
    reference outputs under the same names prefixed `out.`; metadata `kind` ("unet" or "vae"), `case`, and
    the `diffusers` and `torch` versions that computed them;
  - `unet_sd2/io_odd_latent.safetensors`: the same for a 7×10 latent, not a multiple of the UNet's 4
    (`make_odd_latent_io`; `--odd-latent-only` rewrites just this file).

UNet cases: inputs `sample`, `timestep`, `encoder_hidden_states` (+ `text_embeds`, `time_ids` for SDXL);
outputs `out.sample` and the features of `pea eval unet --features`: `out.down.{i}` (first element returned by
down_blocks[i], i.e. after its downsampler), `out.mid`, `out.up.{i}`.
VAE cases: inputs `image` [B,3,H,W] in [-1,1] and `latents` (the raw input of `vae.decode`, already divided by
the scaling factor); outputs `out.latent_mean`, `out.latent_logvar` (encode(image).latent_dist; logvar is
clamped to [-30, 20] as diffusers does) and `out.sample` = decode(latents).sample, unclamped.

Weights are drawn by diffusers' own initialisation and then every parameter is perturbed (norm weights away
from 1, zero biases away from 0), so that no parameter is trivially 0 or 1 and a mis-wired layer cannot hide.
The reference forward runs on the saved float32 weights, reloaded with `from_pretrained` and cast to float64;
outputs are stored as float32. Inputs and weights are seeded, so a rerun writes the same files.

Run through `make fixtures`, or:
    python tools/reference/make_model_fixtures.py --out Tests/Fixtures/models
"""
import argparse
import json
import os
import shutil
import struct

# Fixtures are computed on the CPU; keep a CUDA build of torch from probing (and warning about) the driver.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import torch
import diffusers
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save, save_file

# Quiet: loading without `accelerate` and casting a loaded model with .to() both warn; neither matters here.
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()

REF = torch.float64


def perturb(model, scale=0.2):
    """Adds noise to every parameter: `scale`·std for random tensors, `scale` for constant ones (ones, zeros)."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            spread = p.std().item() if p.numel() > 1 else 0.0
            if spread < 1e-6:
                spread = 1.0
            p.add_(torch.randn(p.shape, dtype=p.dtype) * (scale * spread))


def rel_l2(a, b):
    a, b = a.to(REF), b.to(REF)
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].to(REF), sb[k].to(REF)), k


def save_reproducible(tensors, path, metadata):
    """save_file, but with the metadata in sorted order: safetensors writes it in hash order, which changes from
    run to run, and a rerun should rewrite the same bytes. The header is plain JSON; offsets are relative to the
    data that follows it, so only its length (padded to 8 with spaces, as safetensors does) changes."""
    data = save(tensors, metadata=metadata)
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))}
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data[8 + n:])


def write_io(folder, case, kind, inputs, outputs, name="io.safetensors"):
    tensors = {k: v.contiguous() for k, v in inputs.items()}
    for k, v in outputs.items():
        tensors[f"out.{k}"] = (v.to(torch.float32) if v.dtype == REF else v).contiguous()
    metadata = {"kind": kind, "case": case, "diffusers": diffusers.__version__, "torch": torch.__version__.split("+")[0]}
    path = os.path.join(folder, name)
    save_reproducible(tensors, path, metadata)
    back = load_file(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


# ---------------------------------------------------------------------------------------------------- UNet

UNET_CASES = {
    # SD1.x: attention_head_dim is (legacy meaning) the number of heads, 8 in every block; conv proj_in/out;
    # two resnets per down block as SD1.5 has. Heads 8 on 16 channels (head dim 2), 8 on 24 in the mid block
    # (head dim 3).
    "unet_sd1": dict(
        config=dict(
            sample_size=8, in_channels=4, out_channels=4,
            block_out_channels=(16, 24), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
            use_linear_projection=False, flip_sin_to_cos=True, freq_shift=0,
        ),
        seed=101, sample=(2, 4, 8, 8), tokens=7,
        timestep=torch.tensor([10, 999], dtype=torch.int64),
    ),
    # SD2.x: linear proj_in/out, per-block head counts (reversed for the up blocks, the last one for the mid
    # block), upcast_attention, a middle CrossAttn down block, float timesteps.
    "unet_sd2": dict(
        config=dict(
            sample_size=8, in_channels=4, out_channels=4,
            block_out_channels=(8, 16, 24), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=48, attention_head_dim=[2, 4, 8], norm_num_groups=4,
            use_linear_projection=True, upcast_attention=True, flip_sin_to_cos=True, freq_shift=0,
        ),
        seed=202, sample=(2, 4, 8, 8), tokens=5,
        timestep=torch.tensor([1.5, 801.25], dtype=torch.float32),
    ),
    # SDXL: plain first down block, attention_head_dim list with num_attention_heads null (heads 1, 2, 4: on
    # 8, 16, 16 channels, so the two deeper blocks differ only in their head count, which a wrong index
    # into the list shows), several transformer layers in the deepest block (and so in the mid block and
    # the first up block), text_time added conditioning, non-square latents, int32 timesteps.
    "unet_sdxl": dict(
        config=dict(
            sample_size=8, in_channels=4, out_channels=4,
            block_out_channels=(8, 16, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=[1, 1, 2],
            cross_attention_dim=40, attention_head_dim=[1, 2, 4], num_attention_heads=None, norm_num_groups=4,
            use_linear_projection=True, flip_sin_to_cos=True, freq_shift=0,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24 + 6 * 8,
        ),
        seed=303, sample=(2, 4, 8, 12), tokens=6, text_embeds=24,
        timestep=torch.tensor([1, 500], dtype=torch.int32),
        # (original h, w, crop top, left, target h, w), as the SDXL pipeline builds them
        time_ids=torch.tensor([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 16, 32, 832, 1216]], dtype=torch.float32),
    ),
}


def unet_forward(model, inputs, dtype):
    """Runs the UNet and returns its output and the features of `pea eval unet --features`."""
    feats = {}
    hooks = []
    for i, block in enumerate(model.down_blocks):
        hooks.append(block.register_forward_hook(
            lambda m, a, out, i=i: feats.__setitem__(f"down.{i}", out[0].detach().clone())))
    hooks.append(model.mid_block.register_forward_hook(
        lambda m, a, out: feats.__setitem__("mid", out.detach().clone())))
    for i, block in enumerate(model.up_blocks):
        hooks.append(block.register_forward_hook(
            lambda m, a, out, i=i: feats.__setitem__(f"up.{i}", out.detach().clone())))
    kwargs = {}
    if "text_embeds" in inputs:
        kwargs["added_cond_kwargs"] = {"text_embeds": inputs["text_embeds"].to(dtype), "time_ids": inputs["time_ids"].to(dtype)}
    try:
        with torch.no_grad():
            y = model(inputs["sample"].to(dtype), inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"].to(dtype),
                      **kwargs).sample
    finally:
        for h in hooks:
            h.remove()
    return {"sample": y, **feats}


def make_unet(out, case, spec, summary):
    torch.manual_seed(spec["seed"])
    model = UNet2DConditionModel(**spec["config"]).eval()
    perturb(model)
    folder = os.path.join(out, case)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, safe_serialization=True)

    b = spec["sample"][0]
    cross = spec["config"]["cross_attention_dim"]
    inputs = {
        "sample": torch.randn(*spec["sample"]),
        "timestep": spec["timestep"],
        "encoder_hidden_states": torch.randn(b, spec["tokens"], cross),
    }
    if "text_embeds" in spec:
        inputs["text_embeds"] = torch.randn(b, spec["text_embeds"])
        inputs["time_ids"] = spec["time_ids"]

    # The reference runs on exactly the saved f32 weights, as a user's loader sees them.
    loaded = UNet2DConditionModel.from_pretrained(folder).eval()
    check_same_weights(model, loaded)
    ref = unet_forward(loaded.to(REF), inputs, REF)
    f32 = unet_forward(UNet2DConditionModel.from_pretrained(folder).eval(), inputs, torch.float32)
    write_io(folder, case, "unet", inputs, ref)
    summary[case] = {
        "out.sample rms": ref["sample"].pow(2).mean().sqrt().item(),
        "f32 vs f64 rel L2 (worst output)": max(rel_l2(f32[k], ref[k]) for k in ref),
    }
    return model, inputs, ref


def make_sharded_copy(out, case, model, inputs, ref, summary):
    """The same UNet saved as an index and two shards, by diffusers' own sharding."""
    folder = os.path.join(out, case)
    shutil.rmtree(folder, ignore_errors=True)
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=total * 6 // 10)
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert len(shards) == 2 and os.path.exists(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")), shards
    loaded = UNet2DConditionModel.from_pretrained(folder).eval()
    check_same_weights(model, loaded)
    again = unet_forward(loaded.to(REF), inputs, REF)
    for k in ref:
        assert torch.equal(again[k], ref[k]), k
    write_io(folder, case, "unet", inputs, ref)
    summary[case] = {"shards": shards}


def make_odd_latent_io(out, summary):
    """unet_sd2 (latents halved twice) on a 7×10 latent, a size that is not a multiple of 4: the down path
    halves rounding up (7 → 4 → 2, 10 → 5 → 3) and diffusers' forward_upsample_size makes every upsampler
    interpolate to the size of the skip it meets (2 → 4 → 7, 3 → 5 → 10). Written beside the model as
    io_odd_latent.safetensors, in the layout of io.safetensors."""
    folder = os.path.join(out, "unet_sd2")
    spec = UNET_CASES["unet_sd2"]
    generator = torch.Generator().manual_seed(spec["seed"] + 1)
    b = 2
    inputs = {
        "sample": torch.randn(b, 4, 7, 10, generator=generator),
        "timestep": spec["timestep"],
        "encoder_hidden_states": torch.randn(b, spec["tokens"], spec["config"]["cross_attention_dim"], generator=generator),
    }
    model = UNet2DConditionModel.from_pretrained(folder).eval()
    ref = unet_forward(model.to(REF), inputs, REF)
    assert ref["sample"].shape == (b, 4, 7, 10), ref["sample"].shape
    write_io(folder, "unet_sd2_odd_latent", "unet", inputs, ref, name="io_odd_latent.safetensors")
    summary["unet_sd2 (odd latent)"] = {"out.sample rms": ref["sample"].pow(2).mean().sqrt().item(),
                                        "up shapes": [list(ref[f"up.{i}"].shape) for i in range(3)]}


# ----------------------------------------------------------------------------------------------------- VAE

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=16,
    block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    scaling_factor=0.18215,
)


def vae_forward(model, inputs, dtype):
    with torch.no_grad():
        dist = model.encode(inputs["image"].to(dtype)).latent_dist
        decoded = model.decode(inputs["latents"].to(dtype)).sample
    return {"latent_mean": dist.mean, "latent_logvar": dist.logvar, "sample": decoded}


def legacy_attention_paths(model):
    """Module paths of the attention blocks whose checkpoints diffusers still accepts under the old names."""
    return [name for name, m in model.named_modules() if getattr(m, "_from_deprecated_attn_block", False)]


# new name -> old name, the inverse of ModelMixin._fix_state_dict_keys_on_load (diffusers/models/modeling_utils.py)
LEGACY_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def make_vae(out, summary):
    torch.manual_seed(404)
    model = AutoencoderKL(**VAE_CONFIG).eval()
    perturb(model)
    folder = os.path.join(out, "vae")
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, safe_serialization=True)

    inputs = {
        "image": torch.rand(2, 3, 16, 16) * 2 - 1,
        "latents": torch.randn(2, 4, 8, 8),
    }
    loaded = AutoencoderKL.from_pretrained(folder).eval()
    check_same_weights(model, loaded)
    ref = vae_forward(loaded.to(REF), inputs, REF)
    f32 = vae_forward(AutoencoderKL.from_pretrained(folder).eval(), inputs, torch.float32)
    write_io(folder, "vae", "vae", inputs, ref)
    summary["vae"] = {
        "out.sample rms": ref["sample"].pow(2).mean().sqrt().item(),
        "f32 vs f64 rel L2 (worst output)": max(rel_l2(f32[k], ref[k]) for k in ref),
    }

    # The same weights under the pre-0.14 attention names (query/key/value/proj_attn).
    legacy = os.path.join(out, "vae_legacy_names")
    shutil.rmtree(legacy, ignore_errors=True)
    os.makedirs(legacy)
    shutil.copy(os.path.join(folder, "config.json"), legacy)
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    paths = legacy_attention_paths(model)
    assert paths, "no attention block to rename"
    renamed = {}
    for key, value in state.items():
        for path in paths:
            for new, old in LEGACY_ATTENTION_NAMES.items():
                for kind in ("weight", "bias"):
                    if key == f"{path}.{new}.{kind}":
                        key = f"{path}.{old}.{kind}"
        renamed[key] = value
    assert sum(k.endswith(("query.weight", "key.weight", "value.weight", "proj_attn.weight")) for k in renamed) == 4 * len(paths)
    save_file(renamed, os.path.join(legacy, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    loaded = AutoencoderKL.from_pretrained(legacy).eval()
    check_same_weights(model, loaded)
    again = vae_forward(loaded.to(REF), inputs, REF)
    for k in ref:
        assert torch.equal(again[k], ref[k]), k
    write_io(legacy, "vae_legacy_names", "vae", inputs, ref)
    summary["vae_legacy_names"] = {"renamed": [f"{p}.{{{','.join(LEGACY_ATTENTION_NAMES.values())}}}" for p in paths]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="Tests/Fixtures/models")
    parser.add_argument("--odd-latent-only", action="store_true",
                        help="only (re)write unet_sd2/io_odd_latent.safetensors from the saved unet_sd2 model")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    summary = {}
    if args.odd_latent_only:
        make_odd_latent_io(args.out, summary)
        print(json.dumps(summary))
        return
    sd1 = None
    for case, spec in UNET_CASES.items():
        made = make_unet(args.out, case, spec, summary)
        if case == "unet_sd1":
            sd1 = made
    make_sharded_copy(args.out, "unet_sd1_sharded", *sd1, summary)
    make_odd_latent_io(args.out, summary)
    make_vae(args.out, summary)

    total = 0  # this script's folders only: other scripts write their own cases beside them
    for case in sorted(summary):
        folder = os.path.join(args.out, case)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        total += size
        print(f"{case:20s} {size / 1024:8.1f} KiB  {json.dumps(summary.get(case, {}))}")
    print(f"{'total':20s} {total / 1024:8.1f} KiB")


if __name__ == "__main__":
    main()
