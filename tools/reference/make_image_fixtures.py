#!/usr/bin/env python3
"""Training images and what Pillow and torchvision make of them, for Pea's training data pipeline
(Sources/PEADiffusion/Training/Data, Sources/PEADiffusion/IO/PNGDecoder.swift).

Writes into <out>:
  - `<name>.jpg` / `<name>.png`: small images of odd sizes. JPEGs saved by Pillow (4:2:0, 4:4:4, progressive
    4:2:2, greyscale, CMYK). PNGs saved by Pillow (RGB, RGBA, L, LA, P, 4-bit P, 1-bit, 16-bit grey) and
    `raw_*.png` written by this script's own encoder, which Pillow does not write: 16-bit RGB/RGBA/LA, 2- and
    4-bit grey, 2-bit palette with tRNS, Adam7-interlaced files (one too small for some passes), every row
    filtered with filter type (row number mod 5) and the image data split over two IDAT chunks.
  - `expected/<name>.rgb.png`: `Image.open(f).convert("RGB")` as an 8-bit RGB PNG (what Pea must decode).
  - `expected/<name>.r<R>.png`: the training transform's 8-bit image, `CenterCrop(R)(Resize(R,
    interpolation=BILINEAR)(Image.open(f).convert("RGB")))`, as torchvision computes it on the PIL image.
  - `tensors.safetensors`: `<name>.r<R>` F32 [3, R, R] = the whole transform, `Compose([Resize(R, BILINEAR),
    CenterCrop(R), ToTensor(), Normalize([0.5], [0.5])])`, and for the raw PNGs `<name>.samples` I32
    [H, W, C]: the samples the file stores (palette indices for palette images) at the file's bit depth.
    Metadata `images`: JSON list of {"file", "width", "height", "pillow_mode", "format", "resolutions",
    "resized": {R: [w, h] torchvision's Resize output size}, "crop": {R: [top, left]}}; and the versions.
  - `shard_gnu.tar` (tarfile GNU_FORMAT: a >100-character member path stored in a GNU 'L' entry) and
    `shard_pax.tar` (PAX_FORMAT: non-ASCII and long paths in pax 'x' headers), webdataset-style samples made
    of the images above; `tars.json`: each tar's members as tarfile lists them (name, size, type) and the
    samples a reader must produce (key, captions, the image fixture, or the reason it is skipped).

Run through `make fixtures`, or:
    python tools/reference/make_image_fixtures.py --out Tests/Fixtures/images
"""
import argparse
import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from safetensors.numpy import save
from torchvision import transforms

ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def smooth_image(rng, height, width, channels, maximum=255):
    """Gradients, a disc and some noise: JPEG-friendly content with edges, in 0..maximum."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    planes = []
    for c in range(channels):
        a, b = rng.uniform(-1, 1, 2)
        plane = 0.5 + 0.35 * np.sin(a * x / 3 + b * y / 4 + c) + 0.1 * rng.standard_normal((height, width))
        disc = (x - width * rng.uniform(0.3, 0.7)) ** 2 + (y - height * rng.uniform(0.3, 0.7)) ** 2 < (min(width, height) / 3) ** 2
        plane = np.where(disc, 1 - plane, plane)
        planes.append(plane)
    image = np.clip(np.stack(planes, -1), 0, 1) * maximum
    return np.rint(image).astype(np.int64)


# --- a PNG encoder for the kinds Pillow does not write -----------------------------------------------

def paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def pack_row(row, depth):
    flat = [int(v) for v in row.reshape(-1)]
    if depth == 16:
        return b"".join(struct.pack(">H", v) for v in flat)
    if depth == 8:
        return bytes(flat)
    bits = "".join(format(v, "0%db" % depth) for v in flat)
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))


def filter_row(kind, line, previous, bpp):
    out = bytearray(len(line))
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        up = previous[i]
        up_left = previous[i - bpp] if i >= bpp else 0
        predicted = [0, left, up, (left + up) // 2, paeth(left, up, up_left)][kind]
        out[i] = (line[i] - predicted) % 256
    return bytes(out)


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path, samples, color_type, depth, interlace=False, palette=None, trns=None):
    height, width, channels = samples.shape
    bpp = max(1, channels * depth // 8)
    raw, row_number = b"", 0
    for x0, y0, dx, dy in (ADAM7 if interlace else [(0, 0, 1, 1)]):
        sub = samples[y0::dy, x0::dx]
        if sub.shape[0] == 0 or sub.shape[1] == 0:
            continue
        previous = bytes(len(pack_row(sub[0], depth)))
        for row in sub:
            line = pack_row(row, depth)
            kind = row_number % 5
            raw += bytes([kind]) + filter_row(kind, line, previous, bpp)
            previous, row_number = line, row_number + 1
    data = zlib.compress(raw, 9)
    body = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, int(interlace)))
    if palette is not None:
        body += chunk(b"PLTE", bytes(np.asarray(palette, dtype=np.uint8).reshape(-1)))
    if trns is not None:
        body += chunk(b"tRNS", trns)
    half = len(data) // 2
    body += chunk(b"IDAT", data[:half]) + chunk(b"IDAT", data[half:]) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(body)


def save_sorted(data, path):
    """safetensors bytes with the header metadata in sorted order, so a rerun rewrites identical bytes."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))}
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data[8 + length:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = args.out
    os.makedirs(os.path.join(out, "expected"), exist_ok=True)
    rng = np.random.default_rng(20241117)
    u8 = lambda a: a.astype(np.uint8)

    # name -> (file, resolutions)
    images = {}

    def pillow_save(name, image, ext, resolutions, **options):
        file = name + "." + ext
        image.save(os.path.join(out, file), **options)
        images[name] = (file, resolutions)

    pillow_save("jpeg_rgb_420", Image.fromarray(u8(smooth_image(rng, 33, 47, 3))), "jpg", [16, 33], quality=90)
    pillow_save("jpeg_rgb_444_portrait", Image.fromarray(u8(smooth_image(rng, 41, 26, 3))), "jpg", [15, 24],
                quality=95, subsampling=0)
    pillow_save("jpeg_rgb_422_progressive", Image.fromarray(u8(smooth_image(rng, 29, 39, 3))), "jpg", [16],
                quality=85, subsampling=1, progressive=True)
    pillow_save("jpeg_gray", Image.fromarray(u8(smooth_image(rng, 22, 35, 1)[..., 0]), "L"), "jpg", [16], quality=90)
    pillow_save("jpeg_cmyk", Image.fromarray(u8(smooth_image(rng, 17, 21, 4)), "CMYK"), "jpg", [16], quality=92)

    pillow_save("png_rgb", Image.fromarray(u8(smooth_image(rng, 29, 43, 3))), "png", [16, 24])
    pillow_save("png_rgba", Image.fromarray(u8(smooth_image(rng, 37, 31, 4)), "RGBA"), "png", [16])
    pillow_save("png_gray", Image.fromarray(u8(smooth_image(rng, 19, 25, 1)[..., 0]), "L"), "png", [7])
    pillow_save("png_la", Image.fromarray(u8(smooth_image(rng, 21, 18, 2)), "LA"), "png", [16])
    pillow_save("png_palette", Image.fromarray(u8(smooth_image(rng, 23, 30, 3))).convert("P"), "png", [16])
    pillow_save("png_palette_4bit", Image.fromarray(u8(smooth_image(rng, 15, 22, 3))).quantize(12), "png", [11], bits=4)
    pillow_save("png_bilevel", Image.fromarray(smooth_image(rng, 13, 20, 1)[..., 0] > 127), "png", [9])
    gray16 = smooth_image(rng, 14, 19, 1, maximum=700)[..., 0].astype(np.uint16)  # values above 255: Pillow clips
    pillow_save("png_gray16", Image.fromarray(gray16), "png", [8])

    raw_samples = {}

    def raw_png(name, samples, color_type, depth, resolutions, **options):
        file = name + ".png"
        write_png(os.path.join(out, file), samples, color_type, depth, **options)
        images[name] = (file, resolutions)
        raw_samples[name] = samples

    raw_png("raw_rgb16_adam7", smooth_image(rng, 13, 17, 3, 65535), 2, 16, [12, 16], interlace=True)
    raw_png("raw_rgba16", smooth_image(rng, 11, 14, 4, 65535), 6, 16, [10])
    raw_png("raw_la16", smooth_image(rng, 9, 12, 2, 65535), 4, 16, [9])
    raw_png("raw_gray2", smooth_image(rng, 10, 13, 1, 3), 0, 2, [10])
    raw_png("raw_gray4_adam7", smooth_image(rng, 12, 9, 1, 15), 0, 4, [9], interlace=True)
    raw_png("raw_gray1_adam7", smooth_image(rng, 10, 11, 1, 1), 0, 1, [10], interlace=True)
    palette = rng.integers(0, 256, (4, 3))
    raw_png("raw_palette2_adam7_trns", smooth_image(rng, 9, 10, 1, 3), 3, 2, [7], interlace=True,
            palette=palette, trns=bytes([0, 128]))
    raw_png("raw_rgb8_adam7_tiny", smooth_image(rng, 2, 3, 3), 2, 8, [2], interlace=True)
    raw_png("raw_rgba8", smooth_image(rng, 8, 9, 4), 6, 8, [8])

    tensors, listing = {}, []
    round_half_even_cases = 0
    for name, (file, resolutions) in images.items():
        with Image.open(os.path.join(out, file)) as image:
            image.load()
            mode, fmt = image.mode, image.format
            rgb = image.convert("RGB")
        Image.fromarray(np.asarray(rgb)).save(os.path.join(out, "expected", name + ".rgb.png"))
        entry = {"file": file, "width": rgb.width, "height": rgb.height, "pillow_mode": mode, "format": fmt,
                 "resolutions": resolutions, "resized": {}, "crop": {}}
        for r in resolutions:
            resized = transforms.Resize(r, interpolation=transforms.InterpolationMode.BILINEAR)(rgb)
            cropped = transforms.CenterCrop(r)(resized)
            Image.fromarray(np.asarray(cropped)).save(os.path.join(out, "expected", "%s.r%d.png" % (name, r)))
            pipeline = transforms.Compose([
                transforms.Resize(r, interpolation=transforms.InterpolationMode.BILINEAR),
                transforms.CenterCrop(r), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
            tensors["%s.r%d" % (name, r)] = pipeline(rgb).numpy().astype(np.float32)
            top = int(round((resized.height - r) / 2.0))
            left = int(round((resized.width - r) / 2.0))
            for excess in (resized.height - r, resized.width - r):
                if excess % 4 == 1:  # (excess / 2) = k + 0.5 with k even: Python rounds down, half-up would not
                    round_half_even_cases += 1
            entry["resized"][str(r)] = [resized.width, resized.height]
            entry["crop"][str(r)] = [top, left]
        listing.append(entry)
        if name in raw_samples:
            tensors[name + ".samples"] = np.ascontiguousarray(raw_samples[name].astype(np.int32))
    assert round_half_even_cases > 0, "no crop offset exercises Python's round-half-to-even"

    metadata = {"images": json.dumps(listing), "pillow": PIL.__version__, "torchvision": torchvision.__version__,
                "torch": torch.__version__}
    save_sorted(save(tensors, metadata=metadata), os.path.join(out, "tensors.safetensors"))

    # --- webdataset-style tar shards ---------------------------------------------------------------
    def read(name):
        with open(os.path.join(out, images[name][0]), "rb") as f:
            return f.read()

    long_dir = "a-folder-whose-name-is-long-enough-that-the-member-path-needs-more-than-one-hundred-characters/x"
    truncated_jpeg = read("jpeg_rgb_420")[:300]
    shards = {
        "shard_gnu.tar": (tarfile.GNU_FORMAT, [
            ("s0001.jpg", read("jpeg_rgb_420")),
            ("s0001.json", json.dumps({"text": "一只猫", "text_en": "a cat", "language_specific": True}, ensure_ascii=False).encode()),
            (long_dir + "/s0002.png", read("png_rgb")),
            (long_dir + "/s0002.txt", "  红色的花\n".encode()),
            ("s0003.jpg", read("jpeg_gray")),
            ("s0003.json", json.dumps({"text_en": "no target caption"}).encode()),
            ("s0004.jpg", truncated_jpeg),
            ("s0004.txt", "截断的图片".encode()),
            ("s0005.JSON", json.dumps({"caption": "大写扩展名", "language_specific": 0}, ensure_ascii=False).encode()),
            ("s0005.PNG", read("raw_rgb16_adam7")),
        ]),
        "shard_pax.tar": (tarfile.PAX_FORMAT, [
            ("样本/第一个.png", read("png_palette")),
            ("样本/第一个.json", json.dumps({"caption": "调色板图像", "text_en": "a palette image"}, ensure_ascii=False).encode()),
            (long_dir + "/" + "长" * 40 + ".jpg", read("jpeg_cmyk")),
            (long_dir + "/" + "长" * 40 + ".txt", "青色".encode()),
            ("only-text.txt", "没有图片".encode()),
            ("broken.json", b"{not json"),
            ("broken.jpg", read("jpeg_gray")),
        ]),
    }
    samples = {
        "shard_gnu.tar": [
            {"key": "s0001", "text": "一只猫", "text_en": "a cat", "language_specific": True, "image": "jpeg_rgb_420"},
            {"key": long_dir + "/s0002", "text": "红色的花", "image": "png_rgb"},
            {"key": "s0003", "skip": "missingCaption"},
            {"key": "s0004", "skip": "undecodableImage"},
            {"key": "s0005", "text": "大写扩展名", "language_specific": False, "image": "raw_rgb16_adam7"},
        ],
        "shard_pax.tar": [
            {"key": "样本/第一个", "text": "调色板图像", "text_en": "a palette image", "image": "png_palette"},
            {"key": long_dir + "/" + "长" * 40, "text": "青色", "image": "jpeg_cmyk"},
            {"key": "only-text", "skip": "missingImage"},
            {"key": "broken", "skip": "invalidMetadata"},
        ],
    }
    tar_listing = {}
    for shard, (fmt, members) in shards.items():
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
            for member_name, data in members:
                info = tarfile.TarInfo(member_name)
                info.size, info.mtime, info.mode = len(data), 1700000000, 0o644
                info.uname = info.gname = "pea"
                tar.addfile(info, io.BytesIO(data))
        with open(os.path.join(out, shard), "wb") as f:
            f.write(buffer.getvalue())
        with tarfile.open(os.path.join(out, shard)) as tar:
            entries = [{"name": m.name, "size": m.size, "type": m.type.decode()} for m in tar.getmembers()]
        tar_listing[shard] = {"entries": entries, "samples": samples[shard]}
    with open(os.path.join(out, "tars.json"), "w") as f:
        json.dump(tar_listing, f, ensure_ascii=False, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
