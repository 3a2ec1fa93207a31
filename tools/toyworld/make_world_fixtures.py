#!/usr/bin/env python3
"""Drawings of the toy world made by world.py, for Pea's twin of it (Sources/PEADiffusion/ToyWorld/ToyWorld.swift,
checked byte for byte by Tests/PEADiffusionTests/ToyWorldTests.swift).

Writes <out>/drawings.safetensors:
  - `boxes` float64 [N, 3]: (x0, y0, side) of each drawing, PER_CLASS seeded `world.random_box`es per class;
  - `labels` int64 [N]: each drawing's class, its index in `world.CLASSES` (class-major: drawing i is of class
    i // PER_CLASS);
  - `digests` uint64 [N]: FNV-1a 64 of each drawing's bytes (`world.draw(...)`, uint8 [64, 64, 3] row-major), so
    every drawing is checked while the file stays small (all N drawings in full would be 2.9 MB);
  - `images` uint8 [K, 64, 64, 3]: K of the drawings in full, for a readable diff when a digest differs, and
    `image_indices` int64 [K]: which drawing each is (one per pair (colour k mod 6, shape k mod 4), k < 12: every
    colour twice, every shape three times).
Metadata (JSON text): `colours` and `shapes`, the name lists in world.py's order; `per_class`; `seed`.

    tools/reference/.venv/bin/python tools/toyworld/make_world_fixtures.py --out Tests/Fixtures/toyworld
"""
import argparse
import json
import os
import sys

import numpy as np
from safetensors.numpy import save

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
import world  # noqa: E402
from make_image_fixtures import save_sorted  # noqa: E402  (metadata in sorted order: reruns write the same bytes)

PER_CLASS = 10
SEED = 20240
FULL_IMAGES = 12

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


def fnv1a64(images):
    """FNV-1a 64 of each image's bytes, [N] uint64 (all images at once, byte position by byte position)."""
    flat = images.reshape(len(images), -1).astype(np.uint64)
    digest = np.full(len(images), FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column in range(flat.shape[1]):
            digest = (digest ^ flat[:, column]) * FNV_PRIME
    return digest


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    rng = np.random.default_rng(SEED)
    boxes, labels, images = [], [], []
    for label, (colour, shape) in enumerate(world.CLASSES):
        for _ in range(PER_CLASS):
            box = world.random_box(rng)
            boxes.append(box)
            labels.append(label)
            images.append(world.draw(colour, shape, *box))
    images = np.stack(images)
    n_shapes = len(world.SHAPE_NAMES)
    indices = [(k % len(world.COLOUR_NAMES) * n_shapes + k % n_shapes) * PER_CLASS + k % PER_CLASS
               for k in range(FULL_IMAGES)]
    tensors = {
        "boxes": np.array(boxes, dtype=np.float64),
        "labels": np.array(labels, dtype=np.int64),
        "digests": fnv1a64(images),
        "images": np.ascontiguousarray(images[indices]),
        "image_indices": np.array(indices, dtype=np.int64),
    }
    metadata = {"colours": json.dumps(world.COLOUR_NAMES), "shapes": json.dumps(world.SHAPE_NAMES),
                "per_class": str(PER_CLASS), "seed": str(SEED)}
    path = os.path.join(args.out, "drawings.safetensors")
    save_sorted(save(tensors, metadata=metadata), path)
    print(f"{path}: {len(boxes)} drawings, {FULL_IMAGES} in full, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
