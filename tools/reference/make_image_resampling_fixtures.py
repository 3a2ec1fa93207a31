#!/usr/bin/env python3
"""Pillow's 8-bit Lanczos/bilinear `Image.resize` and `ImageFilter.GaussianBlur` results, for Pea's
ImageResampling (Sources/PEADiffusion/IO/ImageResampling.swift), which must equal them bit for bit.

Writes into <out>:
  - `pixels.bin`: the raw 8-bit interleaved pixels of every source and every result, back to back.
  - `cases.json`: {"pillow": version, "sources": [{"name", "mode" ("RGB" or "L"), "width", "height",
    "offset"}], "cases": [{"source", "op" ("resize" or "blur"), "filter" ("lanczos"/"bilinear", resize),
    "radius" (blur), "width", "height", "offset"}]}; offsets index pixels.bin, lengths are
    width × height × channels.

Sources are random-ish: smooth gradients with noise, hard edges and saturated blocks (so Lanczos' negative
lobes clip at 0 and 255). Resizes go down, up, to multiples of 8, along one axis only, and non-uniformly,
including sizes where Pillow (≥ 13) runs the vertical pass first; blurs take fractional, integer and radii
larger than the image.

    python tools/reference/make_image_resampling_fixtures.py --out Tests/Fixtures/image_resampling
"""
import argparse
import json
import os

import numpy as np
import PIL
from PIL import Image, ImageFilter


def source(seed, width, height, mode):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    channels = 3 if mode == "RGB" else 1
    planes = []
    for c in range(channels):
        plane = x * rng.uniform(-9, 9) + y * rng.uniform(-9, 9) + rng.uniform(0, 255)
        plane = plane + rng.normal(0, 20, (height, width))
        planes.append(plane)
    image = np.stack(planes, -1)
    # hard edges: a black and a white block, and a few salt-and-pepper pixels
    image[height // 4:height // 2, width // 5:width // 2] = 0
    image[height // 2:3 * height // 4, width // 2:4 * width // 5] = 255
    spots = rng.random((height, width)) < 0.03
    image[spots] = rng.choice([0, 255], size=(int(spots.sum()), channels))
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return Image.fromarray(image[..., 0] if mode == "L" else image, mode)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    sources = {
        "rgb37x29": source(1, 37, 29, "RGB"),
        "l23x31": source(2, 23, 31, "L"),
        "rgb5x3": source(3, 5, 3, "RGB"),
        "rgb70x52": source(4, 70, 52, "RGB"),
        "rgb2x1": source(5, 2, 1, "RGB"),
    }
    resizes = [
        ("rgb37x29", "lanczos", 32, 24),   # down to multiples of 8
        ("rgb37x29", "lanczos", 80, 64),   # up
        ("rgb37x29", "lanczos", 16, 40),   # down in x, up in y
        ("rgb37x29", "lanczos", 37, 16),   # vertical pass only
        ("rgb37x29", "lanczos", 13, 29),   # horizontal pass only
        ("rgb37x29", "lanczos", 3, 2),     # a large reduction: wide support
        ("rgb37x29", "bilinear", 32, 24),
        ("rgb37x29", "bilinear", 30, 10),  # height shrinks > 2× as many pixels as width: vertical pass first
        ("rgb37x29", "lanczos", 33, 21),   # exactly 2×: horizontal first
        ("l23x31", "lanczos", 16, 24),
        ("l23x31", "lanczos", 48, 8),      # vertical first
        ("l23x31", "bilinear", 40, 40),
        ("rgb5x3", "lanczos", 40, 24),
        ("rgb5x3", "lanczos", 1, 1),
        ("rgb70x52", "lanczos", 64, 48),   # the pipeline parity case's init image
        ("rgb70x52", "lanczos", 56, 64),
    ]
    blurs = [
        ("rgb37x29", 0.3), ("rgb37x29", 1), ("rgb37x29", 2.5), ("rgb37x29", 4), ("rgb37x29", 40),
        ("l23x31", 0.5), ("l23x31", 3), ("l23x31", 17.25),
        ("rgb5x3", 2), ("rgb2x1", 4), ("rgb70x52", 4),
    ]

    blob = bytearray()
    manifest = {"pillow": PIL.__version__, "sources": [], "cases": []}

    def put(image):
        offset = len(blob)
        blob.extend(np.asarray(image).tobytes())
        return offset

    for name, image in sources.items():
        manifest["sources"].append({"name": name, "mode": image.mode, "width": image.width,
                                    "height": image.height, "offset": put(image)})
    filters = {"lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR}
    for name, filter_name, width, height in resizes:
        result = sources[name].resize((width, height), resample=filters[filter_name])
        manifest["cases"].append({"source": name, "op": "resize", "filter": filter_name,
                                  "width": width, "height": height, "offset": put(result)})
    for name, radius in blurs:
        result = sources[name].filter(ImageFilter.GaussianBlur(radius))
        manifest["cases"].append({"source": name, "op": "blur", "radius": radius,
                                  "width": result.width, "height": result.height, "offset": put(result)})

    with open(os.path.join(args.out, "pixels.bin"), "wb") as f:
        f.write(bytes(blob))
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"wrote {len(manifest['cases'])} cases, {len(blob)} bytes of pixels to {args.out}")


if __name__ == "__main__":
    main()
