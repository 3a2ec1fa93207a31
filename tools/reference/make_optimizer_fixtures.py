#!/usr/bin/env python3
"""Optimiser reference fixtures for Pea's adapter trainer, computed by torch.optim.AdamW,
torch.nn.utils.clip_grad_norm_ and transformers' get_polynomial_decay_schedule_with_warmup.

The official PEA training script (utils/model_utils.py) builds its optimiser as

    no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight", "layer_norm.", "layernorm."]
    groups = [{"params": [p for n, p in named if not any(nd in n for nd in no_decay)], "weight_decay": 0.1},
              {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr)            # betas (0.9, 0.999), eps 1e-8
    scheduler = get_polynomial_decay_schedule_with_warmup(optimizer, warmup, steps, lr_end=min_lr, power=1.0)

and each step clips the gradients (clip_grad_norm_), steps the optimiser, then the scheduler. This script runs
exactly that, on CPU in float32 (what torch users run), for a tiny adapter-like parameter set (`NAMES`, random
initial values) and STEPS seeded random gradients per parameter, with base lr 1e-3, 2 warmup steps, 5 training
steps and lr_end 5e-8. STEPS is 7, so the optimiser steps use lr_lambda(0..6): 0 (warmup start), the warmup, the
linear decay, lr_end exactly at num_training_steps (k = 5) and the `current_step > num_training_steps` branch
(k = 6).

Gradient magnitudes: step i's gradients are randn · SCALES[i] (· SMALL_GRADIENT for the one larger tensor);
the global norm is about 5.8 · SCALES[i], so with
max_norm 0.05 the clipped trajectory clips on steps 0, 2 and 4 (0-based) and leaves steps 1, 3, 5 and 6 alone
(the script asserts this, and stores the flags).

One file, `<out>/optimizer.safetensors`, all float32:

  - `initial.<name>`: the parameters before the first step;
  - `grad.<i>.<name>`: step i's raw gradients (before clipping), i = 0..STEPS-1;
  - `lr`: [STEPS] the lr of each step, read from optimizer.param_groups (both groups agree) before it;
    metadata `lrs` holds the same as exact float64 values (JSON);
  - for each trajectory T in `clip` (clip_grad_norm_(max_norm=0.05) before every step) and `noclip` (no
    clipping): `T.param.<i>.<name>` (the parameters after step i), `T.exp_avg.<i>.<name>`,
    `T.exp_avg_sq.<i>.<name>` (the moments after step i), `T.exp_avg.<name>`, `T.exp_avg_sq.<name>` (the
    final moments, optimizer.state after the last step); for `clip` also `clip.total_norm` [STEPS] (what clip_grad_norm_ returned),
    `clip.clipped` [STEPS] (1 where the gradients were scaled) and `clip.grad.<i>.<name>` (the clipped
    gradients the optimiser saw, for debugging);
  - `schedule.lr`: [12] the lr of a fresh optimiser + scheduler after k = 0..11 scheduler steps (metadata
    `schedule_lrs`, exact float64).

Metadata: `names` (in order), `decays` (per name, the group it went to), `steps`, `hyper` (JSON: lr, betas, eps,
weight decay, warmup, training steps, lr_end, power, max_norm), `clipped_steps`, and the torch and transformers
versions. Inputs are seeded, so a rerun writes the same file.

Run through `make fixtures`, or:
    python tools/reference/make_optimizer_fixtures.py --out Tests/Fixtures/training
"""
import argparse
import json
import os
import struct

import torch
import transformers
from safetensors.torch import save
from transformers import get_polynomial_decay_schedule_with_warmup

# projector.2.weight is larger (323 values, not a multiple of 8 or 32) so that the vectorised loop of Pea's
# AdamW runs on it, not only its scalar remainder; its gradients are scaled by SMALL_GRADIENT so that they
# barely move the global norm (the clipping pattern below stays the one for the four small tensors).
NAMES = [("layernorm.weight", (5,)), ("layernorm.bias", (5,)), ("projector.0.weight", (4, 5)), ("fc.bias", (4,)),
         ("projector.2.weight", (17, 19))]
SMALL_GRADIENT = {"projector.2.weight": 0.05}
NO_DECAY = ["bias", "LayerNorm.bias", "LayerNorm.weight", "layer_norm.", "layernorm."]
STEPS = 7
SCALES = [0.02, 0.004, 0.03, 0.002, 0.05, 0.005, 0.001]
EXPECTED_CLIPPED = [True, False, True, False, True, False, False]
HYPER = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1, "num_warmup_steps": 2,
         "num_training_steps": 5, "lr_end": 5e-8, "power": 1.0, "max_norm": 0.05}
SCHEDULE_STEPS = 12


def initial_parameters():
    generator = torch.Generator().manual_seed(20240611)
    values = {}
    for name, shape in NAMES:
        x = torch.randn(shape, generator=generator, dtype=torch.float32)
        values[name] = (1 + 0.1 * x) if name == "layernorm.weight" else 0.5 * x
    return values


def raw_gradients():
    generator = torch.Generator().manual_seed(777)
    return [{name: torch.randn(shape, generator=generator, dtype=torch.float32) * SCALES[i]
             * SMALL_GRADIENT.get(name, 1.0) for name, shape in NAMES}
            for i in range(STEPS)]


def decays(name):
    return not any(nd in name for nd in NO_DECAY)


def make_optimizer(params):
    """The official two groups, AdamW and the polynomial-decay schedule; CPU tensors take the single-tensor
    (for-loop) AdamW, which is also the default there — foreach=False only says so."""
    groups = [{"params": [params[n] for n, _ in NAMES if decays(n)], "weight_decay": HYPER["weight_decay"]},
              {"params": [params[n] for n, _ in NAMES if not decays(n)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=HYPER["lr"], betas=tuple(HYPER["betas"]), eps=HYPER["eps"],
                                  foreach=False)
    scheduler = get_polynomial_decay_schedule_with_warmup(
        optimizer, num_warmup_steps=HYPER["num_warmup_steps"], num_training_steps=HYPER["num_training_steps"],
        lr_end=HYPER["lr_end"], power=HYPER["power"])
    return optimizer, scheduler


def trajectory(prefix, initial, gradients, clip):
    params = {n: torch.nn.Parameter(initial[n].clone()) for n, _ in NAMES}
    optimizer, scheduler = make_optimizer(params)
    out, lrs, norms, clipped = {}, [], [], []
    for i, step_gradients in enumerate(gradients):
        for n, _ in NAMES:
            params[n].grad = step_gradients[n].clone()
        group_lrs = {group["lr"] for group in optimizer.param_groups}
        assert len(group_lrs) == 1, group_lrs
        lrs.append(group_lrs.pop())
        if clip:
            norm = torch.nn.utils.clip_grad_norm_([params[n] for n, _ in NAMES], max_norm=HYPER["max_norm"])
            norms.append(float(norm))
            was_clipped = any(not torch.equal(params[n].grad, step_gradients[n]) for n, _ in NAMES)
            clipped.append(was_clipped)
            for n, _ in NAMES:
                out[f"{prefix}.grad.{i}.{n}"] = params[n].grad.detach().clone()
        optimizer.step()
        scheduler.step()
        for n, _ in NAMES:
            out[f"{prefix}.param.{i}.{n}"] = params[n].detach().clone()
            out[f"{prefix}.exp_avg.{i}.{n}"] = optimizer.state[params[n]]["exp_avg"].clone()
            out[f"{prefix}.exp_avg_sq.{i}.{n}"] = optimizer.state[params[n]]["exp_avg_sq"].clone()
    for n, _ in NAMES:
        state = optimizer.state[params[n]]
        assert float(state["step"]) == STEPS
        out[f"{prefix}.exp_avg.{n}"] = state["exp_avg"].clone()
        out[f"{prefix}.exp_avg_sq.{n}"] = state["exp_avg_sq"].clone()
    if clip:
        assert clipped == EXPECTED_CLIPPED, f"clipping pattern {clipped}, the docstring says {EXPECTED_CLIPPED}"
        out[f"{prefix}.total_norm"] = torch.tensor(norms, dtype=torch.float32)
        out[f"{prefix}.clipped"] = torch.tensor([float(c) for c in clipped], dtype=torch.float32)
    return out, lrs


def schedule_table():
    """A fresh optimiser + scheduler stepped SCHEDULE_STEPS - 1 times: the lr after k scheduler steps."""
    params = {n: torch.nn.Parameter(torch.zeros(shape)) for n, shape in NAMES}
    optimizer, scheduler = make_optimizer(params)
    lrs = []
    for _ in range(SCHEDULE_STEPS):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()   # no gradients: nothing changes, but torch wants step() before scheduler.step()
        scheduler.step()
    return lrs


def save_reproducible(tensors, path, metadata):
    """save with the metadata in sorted order (safetensors writes it in hash order), so that a rerun rewrites
    the same bytes."""
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))}
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data[8 + n:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)

    initial = initial_parameters()
    gradients = raw_gradients()
    tensors = {f"initial.{n}": initial[n] for n, _ in NAMES}
    for i, step_gradients in enumerate(gradients):
        for n, _ in NAMES:
            tensors[f"grad.{i}.{n}"] = step_gradients[n]
    clipped, lrs = trajectory("clip", initial, gradients, clip=True)
    unclipped, lrs_unclipped = trajectory("noclip", initial, gradients, clip=False)
    assert lrs == lrs_unclipped
    tensors.update(clipped)
    tensors.update(unclipped)
    tensors["lr"] = torch.tensor(lrs, dtype=torch.float32)
    schedule_lrs = schedule_table()
    assert schedule_lrs[:STEPS] == lrs
    tensors["schedule.lr"] = torch.tensor(schedule_lrs, dtype=torch.float32)
    assert all(t.dtype == torch.float32 for t in tensors.values())

    metadata = {
        "names": json.dumps([n for n, _ in NAMES]),
        "decays": json.dumps({n: decays(n) for n, _ in NAMES}, sort_keys=True),
        "steps": str(STEPS),
        "hyper": json.dumps(HYPER, sort_keys=True),
        "lrs": json.dumps(lrs),
        "schedule_lrs": json.dumps(schedule_lrs),
        "clipped_steps": json.dumps([i for i, c in enumerate(EXPECTED_CLIPPED) if c]),
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }
    path = os.path.join(args.out, "optimizer.safetensors")
    save_reproducible(tensors, path, metadata)
    print(f"wrote {path}, {os.path.getsize(path) / 1024:.1f} KiB; lrs {lrs}; "
          f"total norms {[round(x, 5) for x in clipped['clip.total_norm'].tolist()]}")


if __name__ == "__main__":
    main()
