#!/usr/bin/env python3
"""PNG files written by Pillow, and the pixels and text Pillow decodes from them, for Pea's PNGReader
(Sources/PEADiffusion/IO/PNG.swift).

Writes into <out>:
  - `<name>.png`, tiny images saved by Pillow: `rgb_all_filters` (a 13×12 RGB image whose rows Pillow's
    adaptive filtering stores with all five PNG filter types, and a Latin-1 `parameters` tEXt chunk),
    `rgba` (RGBA, varied alpha), `rgb_text_kinds` (a Chinese `parameters` iTXt chunk, a compressed zTXt
    and a compressed iTXt), `rgb_1x1`; and two Pea refuses: `gray` (color type 0), `palette` (type 3).
  - `pixels.safetensors`: for each readable image a tensor named after it, int32 [height, width,
    channels] (our DType has no uint8), as `numpy.asarray(Image.open(png))` gives it. Metadata `images`:
    a JSON list of {"file", "width", "height", "mode", "text" (Pillow's `Image.text`), "filters" (the
    filter type of each row, read from the file)}, and `unsupported`: a JSON list of {"file", "color_type"}.

Run through `make fixtures`, or:
    python tools/reference/make_png_fixtures.py --out Tests/Fixtures/png
"""
import argparse
import json
import os
import struct
import zlib

import numpy as np
import PIL
from PIL import Image, PngImagePlugin
from safetensors.numpy import save

LATIN1_PARAMETERS = ("a café in Zürich, golden hour\n"
                     "Negative prompt: blurry\n"
                     "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 13x12, Model: pea-test")
CHINESE_PARAMETERS = ("一只可爱的熊猫在竹林里吃竹子，高清\n"
                      "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 123456789012, Size: 5x4")


def row_filters(path):
    """The filter type byte of every row, from the file's IDAT data."""
    data = open(path, "rb").read()
    position, idat, width, height, channels = 8, b"", 0, 0, 0
    while position < len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        kind = data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
            channels = {2: 3, 6: 4}.get(body[9], 0)
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + width * channels
    return [raw[row * stride] for row in range(height)]


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


def candidate(seed, width=13, height=12):
    """Gradients with noisy rows, a few random rows and one repeated row: material for every filter type."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * rng.integers(1, 20) + y * rng.integers(1, 20), x * y,
                      (x + 2 * y) * rng.integers(1, 9)], -1)
    image = image + rng.integers(-6, 7, (height, width, 3)) * (rng.random((height, 1, 1)) < 0.5)
    image[rng.random(height) < 0.2] = rng.integers(0, 256, (width, 3))
    image = (image % 256).astype(np.uint8)
    image[3] = image[2]
    return image


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    def path(name):
        return os.path.join(args.out, name + ".png")

    # The first seed whose image Pillow stores with all five filter types (Pillow picks them per row).
    for seed in range(1000):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", LATIN1_PARAMETERS)
        Image.fromarray(candidate(seed)).save(path("rgb_all_filters"), "PNG", optimize=True, pnginfo=info)
        if set(row_filters(path("rgb_all_filters"))) == {0, 1, 2, 3, 4}:
            break
    else:
        raise SystemExit("no candidate image used all five filter types")

    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (7, 9, 4)).astype(np.uint8)
    rgba[0, :, 3] = 0
    rgba[1, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(path("rgba"), "PNG")

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", CHINESE_PARAMETERS)  # not Latin-1: Pillow writes iTXt
    info.add_text("Comment", "zTXt, compressed: " + "lorem ipsum " * 8, zip=True)
    info.add_itxt("Title", "压缩的 iTXt", lang="zh", tkey="标题", zip=True)
    Image.fromarray(rng.integers(0, 256, (4, 5, 3)).astype(np.uint8)).save(path("rgb_text_kinds"), "PNG", pnginfo=info)

    Image.fromarray(np.array([[[200, 10, 77]]], dtype=np.uint8)).save(path("rgb_1x1"), "PNG")

    Image.fromarray(rng.integers(0, 256, (3, 4)).astype(np.uint8), "L").save(path("gray"), "PNG")
    Image.fromarray(rng.integers(0, 256, (3, 4, 3)).astype(np.uint8)).convert("P").save(path("palette"), "PNG")

    tensors, images = {}, []
    for name in ["rgb_all_filters", "rgba", "rgb_text_kinds", "rgb_1x1"]:
        with Image.open(path(name)) as image:
            image.load()
            pixels = np.asarray(image)
            tensors[name] = np.ascontiguousarray(pixels.astype(np.int32))
            images.append({"file": name + ".png", "width": image.width, "height": image.height,
                           "mode": image.mode, "text": dict(image.text), "filters": row_filters(path(name))})
    unsupported = [{"file": "gray.png", "color_type": 0}, {"file": "palette.png", "color_type": 3}]
    metadata = {"images": json.dumps(images, ensure_ascii=False), "unsupported": json.dumps(unsupported),
                "pillow": PIL.__version__}
    save_sorted(save(tensors, metadata=metadata), os.path.join(args.out, "pixels.safetensors"))


if __name__ == "__main__":
    main()
