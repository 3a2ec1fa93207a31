#!/usr/bin/env python3
"""torch.randn reference draws for Pea's TorchGenerator (Sources/PEADiffusion/Pipeline/TorchRandom.swift).

One file, `<out>/torch_randn.safetensors`. Every case is a fresh `torch.Generator("cpu").manual_seed(seed)`
followed by one or more `torch.randn(shape, generator=g, dtype=torch.float32)` calls on that generator, in
order. Each draw is stored whole as a float32 tensor, or, for latent-sized draws, as `<name>.indices`
(int64, flat positions), `<name>.values` (float32, the values there) and `<name>.checksum` (int64 [1]: the
sum over every element i of bits(value_i) * (2i + 1) mod 2^64, bits being the float32's bit pattern as an
unsigned integer, stored as the int64 with the same bits), which covers every element. One case also stores
`torch.empty(8, dtype=torch.int64).random_(generator=g)` (= random64() mod 2^63) to pin the 64-bit draw.

Metadata: `cases`, a JSON list of {"seed": int, "draws": [{"kind": "randn" | "random_int64",
"shape": [...], "tensor": name, "indices": name, "checksum": name (the last two for sampled draws)}]}, and the `torch` version and CPU
capability (torch's randn bits depend on it: see the note in TorchRandom.swift).

Run through `make fixtures`, or:
    python tools/reference/make_random_fixtures.py --out Tests/Fixtures/random
"""
import argparse
import json
import os
import struct

import numpy as np
import torch
from safetensors.torch import save

SEEDS = [0, 1, 42, 2**32 + 5, 123456789012]

# Single draws: multiples of 16 (the vectorised path), other sizes ≥ 16 (its recomputed tail), and sizes
# below 16 (the scalar double path with its cached second value).
SHAPES = [[1, 4, 8, 8], [2, 4, 9, 7], [5], [15], [16], [17], [1, 4, 3, 3]]

# Consecutive draws from one generator: the stream continues, and the scalar path's cached value survives
# a vectorised draw in between ([3] then [20] then [5]).
SEQUENCES = [[[3], [20]], [[20], [3]], [[3], [20], [5]], [[7], [1]]]

# Latent-sized draws, stored at a few positions only: (seed, shape).
SAMPLED = [(0, [1, 4, 64, 64]), (42, [2, 4, 63, 65]), (123456789012, [1, 4, 128, 128])]


def shape_label(shape):
    return "x".join(str(d) for d in shape)


def save_sorted(data, path):
    """Writes safetensors bytes with the header's metadata in sorted key order. safetensors serialises the
    metadata in hash order, which changes from run to run; sorted, a rerun rewrites identical bytes. Only the
    header changes (tensor offsets are relative to the data after it); it stays padded to 8 with spaces."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))}
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data[8 + length:])


def bit_checksum(values):
    """sum of bits(value_i) * (2i + 1) mod 2^64 over a float32 tensor, as an int64 tensor of shape [1]."""
    bits = values.numpy().view(np.uint32).astype(np.uint64)
    weights = np.arange(bits.size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    total = np.sum(bits * weights, dtype=np.uint64)  # uint64 arithmetic wraps modulo 2^64
    return torch.from_numpy(np.array([total], dtype=np.uint64).view(np.int64))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    tensors, cases = {}, []

    def generator(seed):
        return torch.Generator("cpu").manual_seed(seed)

    for seed in SEEDS:
        for shape in SHAPES:
            name = f"seed{seed}.shape{shape_label(shape)}"
            tensors[name] = torch.randn(shape, generator=generator(seed), dtype=torch.float32)
            cases.append({"seed": seed, "draws": [{"kind": "randn", "shape": shape, "tensor": name}]})
        for sequence in SEQUENCES:
            g = generator(seed)
            label = "_".join(shape_label(s) for s in sequence)
            draws = []
            for position, shape in enumerate(sequence):
                name = f"seed{seed}.seq{label}.{position}"
                tensors[name] = torch.randn(shape, generator=g, dtype=torch.float32)
                draws.append({"kind": "randn", "shape": shape, "tensor": name})
            cases.append({"seed": seed, "draws": draws})

    for seed, shape in SAMPLED:
        full = torch.randn(shape, generator=generator(seed), dtype=torch.float32).reshape(-1)
        count = full.numel()
        # The first and last 40 positions (the last 16 are the recomputed tail when count % 16 != 0) and
        # 48 positions spread over the middle, chosen by a generator of their own.
        middle = torch.randint(40, count - 40, (48,), generator=torch.Generator().manual_seed(1))
        indices = torch.cat([torch.arange(40), middle, torch.arange(count - 40, count)]).unique()
        name = f"seed{seed}.shape{shape_label(shape)}"
        tensors[name + ".indices"] = indices.to(torch.int64)
        tensors[name + ".values"] = full[indices].contiguous()
        tensors[name + ".checksum"] = bit_checksum(full)
        cases.append({"seed": seed, "draws": [{"kind": "randn", "shape": shape, "tensor": name + ".values",
                                               "indices": name + ".indices", "checksum": name + ".checksum"}]})

    g = generator(42)
    name = "seed42.random_int64"
    tensors[name] = torch.empty(8, dtype=torch.int64).random_(generator=g)
    cases.append({"seed": 42, "draws": [{"kind": "random_int64", "shape": [8], "tensor": name}]})

    metadata = {
        "cases": json.dumps(cases),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    save_sorted(save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata),
                os.path.join(args.out, "torch_randn.safetensors"))


if __name__ == "__main__":
    main()
