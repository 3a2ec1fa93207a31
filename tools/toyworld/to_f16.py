#!/usr/bin/env python3
"""Copies a safetensors file with its float32 tensors stored as float16 (round to nearest even), the metadata
and every other tensor kept: how the adapter `pea train` writes (f32 master weights) is bundled in models/.

    python3 tools/toyworld/to_f16.py run/adapter.safetensors models/toyworld-zh/adapter.safetensors

Standard library and numpy only.
"""
import json
import struct
import sys

import numpy as np


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    source, target = sys.argv[1:]
    with open(source, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        data = f.read()
    out_header, blobs, offset = {}, [], 0
    for name, info in header.items():
        if name == "__metadata__":
            out_header[name] = info
            continue
        start, end = info["data_offsets"]
        blob = data[start:end]
        dtype = info["dtype"]
        if dtype == "F32":
            values = np.frombuffer(blob, dtype="<f4")
            if not np.all(np.isfinite(values)) or np.abs(values).max(initial=0) > 65504:
                sys.exit(f"{source}: '{name}' does not fit in float16")
            blob, dtype = values.astype("<f2").tobytes(), "F16"
        out_header[name] = {"dtype": dtype, "shape": info["shape"], "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(out_header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(target, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    print(f"wrote {target} ({8 + len(text) + offset} bytes)")


if __name__ == "__main__":
    main()
