#!/usr/bin/env python3
"""Op-level reference fixtures for Pea's backends, computed with torch (and diffusers where it defines the op).

Each case is one safetensors file `<out>/<op>_<label>.safetensors` holding
  - `in.<name>`  the inputs,
  - `out.<name>` torch's outputs (`out.y` for single-output ops),
and the metadata `op` (the op's name) and `params` (a JSON object of its arguments), read by
Tests/PEADiffusionTests/OpFixtures.swift. Inputs are seeded, so a rerun writes the same files.

Run through `make fixtures` (it creates tools/reference/.venv from requirements.txt), or:
    python tools/reference/make_op_fixtures.py --out Tests/Fixtures/ops
"""
import argparse
import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from diffusers.models.embeddings import get_timestep_embedding

torch.manual_seed(0)
# Fixtures are references: compute them in float64 where torch allows, then store float32, so the stored
# value is as close to the exact result as f32 can hold.
REF = torch.float64


def randn(*shape, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale)


def ref(x):
    return x.to(REF)


class Writer:
    def __init__(self, out):
        self.out = out
        self.names = set()
        os.makedirs(out, exist_ok=True)

    def __call__(self, op, label, params, inputs, outputs):
        name = f"{op}_{label}"
        assert name not in self.names, name
        self.names.add(name)
        tensors = {}
        for key, value in inputs.items():
            tensors[f"in.{key}"] = value.contiguous()
        for key, value in outputs.items():
            if value.dtype == REF:
                value = value.to(torch.float32)
            tensors[f"out.{key}"] = value.contiguous()
        metadata = {"op": op, "params": json.dumps(params, sort_keys=True)}
        save_file(tensors, os.path.join(self.out, name + ".safetensors"), metadata=metadata)


def gemm_cases(write):
    # a, b, c are [batch, ...]; a rank-3 operand per batch entry.
    for label, (batch, m, n, k, ta, tb, alpha, beta) in {
        "nn_odd": (1, 37, 53, 61, False, False, 1.0, 0.0),
        "tn_batched": (3, 17, 9, 33, True, False, 0.5, 0.0),
        "nt_beta": (2, 20, 31, 7, False, True, 1.0, 0.75),
        "tt_alpha_beta": (2, 5, 70, 129, True, True, -1.5, 2.0),
        "one": (1, 1, 1, 1, False, False, 1.0, 0.0),
        "blocks": (1, 67, 129, 200, False, True, 1.0, 1.0),
    }.items():
        a = randn(batch, k, m) if ta else randn(batch, m, k)
        b = randn(batch, n, k) if tb else randn(batch, k, n)
        c = randn(batch, m, n)
        opa = ref(a).transpose(1, 2) if ta else ref(a)
        opb = ref(b).transpose(1, 2) if tb else ref(b)
        y = alpha * torch.bmm(opa, opb) + beta * ref(c)
        write("gemm", label, {"transA": int(ta), "transB": int(tb), "alpha": alpha, "beta": beta},
              {"a": a, "b": b, "c": c}, {"y": y})


def linear_cases(write):
    for label, (lead, fin, fout, bias) in {
        "bias_3d": ((2, 7), 33, 19, True),
        "nobias_2d": ((5,), 64, 10, False),
        "one": ((1,), 1, 1, True),
    }.items():
        x, w = randn(*lead, fin), randn(fout, fin, scale=fin ** -0.5)
        inputs = {"x": x, "weight": w}
        b = None
        if bias:
            b = randn(fout)
            inputs["bias"] = b
        y = F.linear(ref(x), ref(w), None if b is None else ref(b))
        write("linear", label, {"has_bias": int(bias)}, inputs, {"y": y})


def conv2d_cases(write):
    # padding is [top, bottom, left, right]; asymmetric padding is how diffusers' Downsample2D pads (0,1,0,1).
    for label, (bsz, cin, h, w, cout, kh, kw, stride, padding, bias) in {
        "3x3_same": (2, 3, 9, 11, 5, 3, 3, (1, 1), (1, 1, 1, 1), True),
        "1x1": (2, 16, 5, 7, 9, 1, 1, (1, 1), (0, 0, 0, 0), True),
        "3x3_stride2_asym": (1, 4, 10, 9, 6, 3, 3, (2, 2), (0, 1, 0, 1), True),
        "5x3_nobias": (1, 3, 8, 8, 2, 5, 3, (1, 2), (2, 2, 1, 1), False),
        "1x1_stride2": (1, 3, 7, 7, 4, 1, 1, (2, 2), (0, 0, 0, 0), True),
        "one": (1, 1, 1, 1, 1, 1, 1, (1, 1), (0, 0, 0, 0), True),
        "wide": (1, 40, 16, 16, 24, 3, 3, (1, 1), (1, 1, 1, 1), True),
    }.items():
        x = randn(bsz, cin, h, w)
        wt = randn(cout, cin, kh, kw, scale=(cin * kh * kw) ** -0.5)
        inputs = {"x": x, "weight": wt}
        b = None
        if bias:
            b = randn(cout)
            inputs["bias"] = b
        top, bottom, left, right = padding
        xp = F.pad(ref(x), (left, right, top, bottom))
        y = F.conv2d(xp, ref(wt), None if b is None else ref(b), stride=stride)
        write("conv2d", label, {"stride": list(stride), "padding": list(padding), "has_bias": int(bias)},
              inputs, {"y": y})


def norm_cases(write):
    for label, (shape, groups, eps, silu) in {
        "4d_silu": ((2, 32, 5, 3), 8, 1e-5, True),
        "4d": ((1, 12, 7, 7), 3, 1e-6, False),
        "3d_one_group": ((3, 6, 10), 1, 1e-5, False),
        "offset_mean": ((1, 8, 4, 4), 4, 1e-6, True),
    }.items():
        x = randn(*shape)
        if label == "offset_mean":
            x = x + 100.0  # a large mean: a one-pass E[x²]−E[x]² variance loses ~1e-3 of it
        c = shape[1]
        wt, b = randn(c), randn(c)
        y = F.group_norm(ref(x), groups, ref(wt), ref(b), eps)
        if silu:
            y = F.silu(y)
        write("group_norm", label, {"groups": groups, "eps": eps, "silu": int(silu)},
              {"x": x, "weight": wt, "bias": b}, {"y": y})
    for label, (shape, eps) in {
        "3d": ((2, 7, 48), 1e-5),
        "2d_eps": ((5, 13), 1e-12),
        "offset_mean": ((3, 33), 1e-5),
    }.items():
        x = randn(*shape)
        if label == "offset_mean":
            x = x + 100.0
        d = shape[-1]
        wt, b = randn(d), randn(d)
        y = F.layer_norm(ref(x), (d,), ref(wt), ref(b), eps)
        write("layer_norm", label, {"eps": eps}, {"x": x, "weight": wt, "bias": b}, {"y": y})


def softmax_cases(write):
    for label, shape in {"3d": (2, 5, 77), "large": (1, 3, 300), "one": (1,)}.items():
        x = randn(*shape, scale=4.0)
        write("softmax", label, {}, {"x": x}, {"y": torch.softmax(ref(x), dim=-1)})
    x = randn(2, 9)
    x[0, 3:] = float("-inf")  # a masked tail, as the causal mask makes
    write("softmax", "neg_inf", {}, {"x": x}, {"y": torch.softmax(ref(x), dim=-1)})


def attention_cases(write):
    # q [B, Tq, H·D] etc.; torch's SDPA takes [B, H, T, D].
    def heads_first(x, h):
        b, t, hd = x.shape
        return x.reshape(b, t, h, hd // h).transpose(1, 2)

    for label, (b, tq, tk, h, d, dv, causal, scale, mask_shape) in {
        "self": (2, 9, 9, 2, 8, 8, False, None, None),
        "cross_77": (1, 20, 77, 3, 40, 40, False, None, None),
        "long_tiles": (1, 300, 300, 2, 16, 16, False, None, None),
        "causal": (2, 11, 11, 2, 8, 8, True, None, None),
        "causal_long": (1, 70, 70, 1, 8, 8, True, None, None),
        "mask_keys": (2, 6, 13, 2, 4, 4, False, 0.3, (2, 1, 1, 13)),
        "mask_full": (1, 5, 7, 2, 4, 6, False, None, (1, 2, 5, 7)),
        "one": (1, 1, 1, 1, 1, 1, False, None, None),
    }.items():
        q, k, v = randn(b, tq, h * d), randn(b, tk, h * d), randn(b, tk, h * dv)
        inputs = {"q": q, "k": k, "v": v}
        mask = None
        if mask_shape is not None:
            mask = torch.where(torch.rand(*mask_shape) < 0.3, torch.tensor(-10000.0), randn(*mask_shape))
            inputs["mask"] = mask
        y = F.scaled_dot_product_attention(
            heads_first(ref(q), h), heads_first(ref(k), h), heads_first(ref(v), h),
            attn_mask=None if mask is None else ref(mask), is_causal=causal, scale=scale)
        y = y.transpose(1, 2).reshape(b, tq, h * dv)
        write("attention", label, {"heads": h, "causal": int(causal), "scale": scale, "has_mask": int(mask is not None)},
              inputs, {"y": y})


def elementwise_cases(write):
    x = randn(3, 5, 7, scale=3.0)
    x.view(-1)[:4] = torch.tensor([0.0, -20.0, 20.0, 1e-4])
    write("gelu", "erf", {"approximate": "none"}, {"x": x}, {"y": F.gelu(ref(x))})
    write("gelu", "tanh", {"approximate": "tanh"}, {"x": x}, {"y": F.gelu(ref(x), approximate="tanh")})
    write("quick_gelu", "3d", {}, {"x": x}, {"y": ref(x) * torch.sigmoid(1.702 * ref(x))})
    write("silu", "3d", {}, {"x": x}, {"y": F.silu(ref(x))})
    g = randn(2, 3, 2 * 11, scale=2.0)
    hidden, gate = ref(g).chunk(2, dim=-1)  # diffusers.models.activations.GEGLU
    write("geglu", "3d", {}, {"x": g}, {"y": hidden * F.gelu(gate)})

    for label, (op, sa, sb) in {
        "add_same": ("add", (2, 3, 4), (2, 3, 4)),
        "add_bias_channels": ("add", (2, 5, 3, 3), (5, 1, 1)),
        "mul_rows": ("mul", (4, 6), (4, 1)),
        "sub_both_ways": ("sub", (3, 1, 5), (1, 4, 1)),
        "div_scalar": ("div", (2, 7), (1,)),
        "add_temb": ("add", (2, 8, 4, 4), (2, 8, 1, 1)),
        "mul_rank_gap": ("mul", (2, 3, 4, 5), (4, 5)),
    }.items():
        a, b = randn(*sa), randn(*sb)
        if op == "div":
            b = b.abs() + 0.5
        fn = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}[op]
        write("binary", label, {"op": op}, {"a": a, "b": b}, {"y": fn(ref(a), ref(b))})

    x = randn(4, 9)
    write("affine", "scale_shift", {"alpha": 0.18215, "beta": -1.0}, {"x": x}, {"y": 0.18215 * ref(x) - 1.0})

    for label, shape in {"4d": (2, 3, 4, 5), "one": (1, 1, 1, 1)}.items():
        x = randn(*shape)
        write("upsample_nearest2x", label, {}, {"x": x}, {"y": F.interpolate(x, scale_factor=2.0, mode="nearest")})


def layout_cases(write):
    for label, (shapes, dim) in {
        "channels": ([(2, 3, 4, 4), (2, 5, 4, 4)], 1),
        "last_three": ([(2, 3), (2, 1), (2, 4)], -1),
        "first": ([(1, 6), (3, 6)], 0),
    }.items():
        parts = [randn(*s) for s in shapes]
        write("concat", label, {"dim": dim}, {str(i): p for i, p in enumerate(parts)}, {"y": torch.cat(parts, dim)})
    for label, (shape, sizes, dim) in {
        "chunk_last": ((2, 3, 10), [5, 5], -1),
        "uneven_channels": ((2, 7, 3, 3), [2, 4, 1], 1),
        "first": ((4, 3), [1, 3], 0),
    }.items():
        x = randn(*shape)
        parts = [p.clone() for p in torch.split(x, sizes, dim)]
        write("split", label, {"dim": dim, "sizes": sizes}, {"x": x}, {str(i): p for i, p in enumerate(parts)})
    for label, (shape, dims) in {
        "heads": ((2, 5, 3, 4), [0, 2, 1, 3]),
        "nchw_to_nhwc": ((2, 3, 4, 5), [0, 2, 3, 1]),
        "reverse": ((2, 3, 4), [2, 1, 0]),
    }.items():
        x = randn(*shape)
        write("permute", label, {"dims": dims}, {"x": x}, {"y": x.permute(*dims)})


def embedding_cases(write):
    table = randn(50, 12)
    for label, ids in {
        "i64_2d": torch.tensor([[0, 5, 49, 5], [1, 2, 3, 0]], dtype=torch.int64),
        "i32_1d": torch.tensor([7, 7, 0, 49, 13], dtype=torch.int32),
    }.items():
        write("embedding", label, {}, {"ids": ids, "table": table}, {"y": F.embedding(ids.long(), table)})

    # diffusers' get_timestep_embedding, as UNet2DConditionModel's time_proj calls it.
    for label, (t, dim, flip, shift, scale, max_period) in {
        "sd_320": (torch.tensor([999.0, 1.0, 500.5]), 320, True, 0.0, 1.0, 10000),
        "odd_dim_shift1": (torch.tensor([0.0, 250.0]), 33, False, 1.0, 1.0, 10000),
        "sdxl_time_ids": (torch.tensor([1024, 1024, 0, 0, 1024, 1024], dtype=torch.int64), 256, True, 0.0, 1.0, 10000),
        "scaled": (torch.tensor([10.0]), 16, False, 1.0, 2.0, 1000),
    }.items():
        y = get_timestep_embedding(t.to(REF), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift,
                                   scale=scale, max_period=max_period)
        write("timestep_embedding", label,
              {"dim": dim, "flip_sin_to_cos": int(flip), "downscale_freq_shift": shift, "scale": scale,
               "max_period": max_period},
              {"t": t}, {"y": y})

    for label, (shape, dim, keepdim) in {
        "tokens": ((2, 77, 16), 1, False),
        "last_keep": ((3, 5), -1, True),
        "first": ((4, 3, 2), 0, False),
    }.items():
        x = randn(*shape)
        write("mean", label, {"dim": dim, "keepdim": int(keepdim)}, {"x": x}, {"y": ref(x).mean(dim, keepdim=keepdim)})


def convert_cases(write):
    x = randn(200, scale=10.0)
    special = torch.tensor([0.0, -0.0, 1.0, 65504.0, 65520.0, 1e6, -1e6, 6e-8, 3e-8, 1e-10, 5.96e-8,
                            float("inf"), float("-inf"), 1.00048828125, 1.0009765625, 3.3895e38, 1.401298e-45])
    x = torch.cat([x, special])
    write("convert", "f16_bf16", {}, {"x": x}, {"f16": x.to(torch.float16), "bf16": x.to(torch.bfloat16)})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="Tests/Fixtures/ops", help="folder for the .safetensors fixtures")
    args = parser.parse_args()
    for old in os.listdir(args.out) if os.path.isdir(args.out) else []:
        if old.endswith(".safetensors"):
            os.remove(os.path.join(args.out, old))
    write = Writer(args.out)
    for cases in (gemm_cases, linear_cases, conv2d_cases, norm_cases, softmax_cases, attention_cases,
                  elementwise_cases, layout_cases, embedding_cases, convert_cases):
        cases(write)
    total = sum(os.path.getsize(os.path.join(args.out, n + ".safetensors")) for n in write.names)
    print(f"wrote {len(write.names)} fixtures ({total / 1024:.0f} KiB) to {args.out} "
          f"with torch {torch.__version__}")


if __name__ == "__main__":
    main()
