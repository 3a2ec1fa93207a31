#!/usr/bin/env python3
"""Does the PEA adapter do the paper's job? Measured on the bundled toy world (models/, README "The toy world").

Generates K seeds × classes with `pea generate` (its default settings: the folder's DPM-Solver++ scheduler,
30 steps, guidance 7.5, 64×64) for four arms, and judges every image with the world's deterministic classifier
(`pea toyworld classify`: the largest non-white component, nearest palette colour, best ideal-mask IoU; no
learning, right on every clean drawing, tested in ToyWorldTests):

  english     the English teacher (models/toyworld, its CLIP) on "a {colour} {shape}", all 24 classes
  zh-trained  the Chinese prompt "一个{颜色}的{形状}" through the Chinese encoder + the trained adapter
              (models/toyworld-zh), the 20 classes of the Chinese training data
  zh-random   the same with a randomly initialised adapter of the same shape (torch.nn.Linear's default init,
              LayerNorm 1/0; --random-seed), the 20 classes
  zh-held-out the trained adapter on the 4 combinations held out of the Chinese training data (red cross,
              green triangle, blue circle, yellow square): did it learn the language or memorise pictures?

Prints the table (accuracy, colour accuracy, shape accuracy per arm, with the English teacher on the same classes
for the ratio), and with --write puts it into benchmarks/RESULTS.md (section "Method fidelity: the toy world")
and writes --grid (default benchmarks/toyworld_grid.png): for each class, the English sample above the Chinese
one (seed 0; held-out classes from the held-out arm).

    python3 benchmarks/method_fidelity.py [--pea .build/release/pea] [--models models] [--seeds 3]
            [--adapter models/toyworld-zh/adapter.safetensors] [--jobs 2] [--weights bf16] [--write benchmarks/RESULTS.md]

--weights bf16|f16 runs every arm with `pea generate --backend cpu --weights W` (half-size weight matrices); with
--write its table goes to its own section ("… with bf16 weights"), beside the f32 one, without the picture.

Needs only the standard library and numpy; the images are kept in --work (default: a temporary folder).
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from results_file import write_section

COLOURS = [("red", "红色"), ("green", "绿色"), ("blue", "蓝色"), ("yellow", "黄色"), ("purple", "紫色"), ("orange", "橙色")]
SHAPES = [("circle", "圆形"), ("square", "正方形"), ("triangle", "三角形"), ("cross", "十字形")]
CLASSES = [(c, s) for c, _ in COLOURS for s, _ in SHAPES]
HELD_OUT = [("red", "cross"), ("green", "triangle"), ("blue", "circle"), ("yellow", "square")]
ZH = dict(COLOURS) | dict(SHAPES)
HEADING = "## Method fidelity: the toy world"


def english(colour, shape):
    return f"a {colour} {shape}"


def chinese(colour, shape):
    return f"一个{ZH[colour]}的{ZH[shape]}"


def read_safetensors_header(path):
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(size))


def write_random_adapter(trained, path, seed):
    """An adapter of `trained`'s shape, initialised as torch does a fresh one: LayerNorm weight 1, bias 0;
    each bias-free Linear U(−1/√fan_in, 1/√fan_in) (kaiming_uniform with a=√5)."""
    header = read_safetensors_header(trained)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, info in sorted((k, v) for k, v in header.items() if k != "__metadata__"):
        shape = info["shape"]
        if name == "layernorm.weight":
            value = np.ones(shape, np.float32)
        elif name.endswith(".bias"):
            value = np.zeros(shape, np.float32)
        else:
            bound = 1.0 / np.sqrt(shape[1])
            value = rng.uniform(-bound, bound, shape).astype(np.float32)
        tensors[name] = value
    meta, offset, blobs = {}, 0, []
    for name, value in tensors.items():
        data = value.tobytes()
        meta[name] = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(meta).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def generate(pea, args, out):
    command = [pea, "generate", *args, "--output", out]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr}")
    return out


def classify(pea, paths):
    result = subprocess.run([pea, "toyworld", "classify", "--json", *paths], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"pea toyworld classify failed:\n{result.stderr}")
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return {row["path"]: (row["colour"], row["shape"]) for row in rows}


def score(jobs, labels):
    right = colour = shape = 0
    for job in jobs:
        got = labels[job["path"]]
        colour += got[0] == job["colour"]
        shape += got[1] == job["shape"]
        right += got == (job["colour"], job["shape"])
    n = len(jobs)
    return {"n": n, "accuracy": right / n, "colour": colour / n, "shape": shape / n}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pea", default=os.path.join(root, ".build", "release", "pea"))
    parser.add_argument("--models", default=os.path.join(root, "models"))
    parser.add_argument("--adapter", help="the trained adapter (default: MODELS/toyworld-zh/adapter.safetensors)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--random-seed", type=int, default=1, help="seed of the random adapter's initialisation")
    parser.add_argument("--jobs", type=int, default=2, help="pea processes at once")
    parser.add_argument("--work", help="keep the images here (default: a temporary folder, removed)")
    parser.add_argument("--reuse", action="store_true", help="keep images already in --work (same settings) instead of generating them again")
    parser.add_argument("--write", help="put the table into this RESULTS.md")
    parser.add_argument("--weights", choices=["f32", "bf16", "f16"], default="f32",
                        help="pea generate --weights (bf16, f16: on the CPU backend); default: %(default)s")
    parser.add_argument("--grid", default=os.path.join(here, "toyworld_grid.png"), help="with --write: the picture")
    args = parser.parse_args()

    teacher = os.path.join(args.models, "toyworld")
    encoder = os.path.join(args.models, "toyworld-zh", "text_encoder")
    adapter = args.adapter or os.path.join(args.models, "toyworld-zh", "adapter.safetensors")
    work = args.work or tempfile.mkdtemp(prefix="pea-fidelity-")
    os.makedirs(work, exist_ok=True)
    random_adapter = os.path.join(work, "random_adapter.safetensors")
    write_random_adapter(adapter, random_adapter, args.random_seed)

    seen = [c for c in CLASSES if c not in HELD_OUT]
    arms = {
        "english": (CLASSES, lambda c, s: ["--model", teacher, "--prompt", english(c, s)]),
        "zh-trained": (seen, lambda c, s: ["--model", teacher, "--prompt", chinese(c, s),
                                           "--text-encoder", encoder, "--adapter", adapter]),
        "zh-random": (seen, lambda c, s: ["--model", teacher, "--prompt", chinese(c, s),
                                          "--text-encoder", encoder, "--adapter", random_adapter]),
        "zh-held-out": (HELD_OUT, lambda c, s: ["--model", teacher, "--prompt", chinese(c, s),
                                                "--text-encoder", encoder, "--adapter", adapter]),
    }
    weights = [] if args.weights == "f32" else ["--backend", "cpu", "--weights", args.weights]
    jobs = []
    for arm, (classes, make) in arms.items():
        for colour, shape in classes:
            for seed in range(args.seeds):
                path = os.path.join(work, f"{arm}_{colour}_{shape}_{seed}.png")
                jobs.append({"arm": arm, "colour": colour, "shape": shape, "seed": seed, "path": path,
                             "args": make(colour, shape) + ["--seed", str(seed)] + weights})
    start = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        todo = [job for job in jobs if not (args.reuse and os.path.exists(job["path"]))]
        list(pool.map(lambda job: generate(args.pea, job["args"], job["path"]), todo))
    seconds = time.time() - start
    labels = classify(args.pea, [job["path"] for job in jobs])

    def arm_jobs(arm, classes=None):
        return [j for j in jobs if j["arm"] == arm and (classes is None or (j["colour"], j["shape"]) in classes)]

    rows = [
        ("English teacher, all 24 classes", score(arm_jobs("english"), labels), None),
        ("Chinese + trained adapter, 20 trained classes", score(arm_jobs("zh-trained"), labels),
         score(arm_jobs("english", seen), labels)),
        ("Chinese + random adapter, 20 trained classes", score(arm_jobs("zh-random"), labels),
         score(arm_jobs("english", seen), labels)),
        ("Chinese + trained adapter, 4 held-out combinations", score(arm_jobs("zh-held-out"), labels),
         score(arm_jobs("english", HELD_OUT), labels)),
    ]
    lines = ["| arm | images | accuracy | colour | shape | English on the same classes | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s, reference in rows:
        ratio = f"{s['accuracy'] / reference['accuracy']:.2f}×" if reference and reference["accuracy"] > 0 else "—"
        ref = f"{reference['accuracy']:.0%}" if reference else "—"
        lines.append(f"| {name} | {s['n']} | {s['accuracy']:.0%} | {s['colour']:.0%} | {s['shape']:.0%} | {ref} | {ratio} |")
    english_all, trained, random_arm, held_out = (r[1] for r in rows)
    chance = 1 / 24
    goals = [
        ("English teacher ≥ 95%", english_all["accuracy"] >= 0.95, f"{english_all['accuracy']:.0%}"),
        ("Chinese + trained adapter ≥ 0.95× English", trained["accuracy"] >= 0.95 * rows[1][2]["accuracy"],
         f"{trained['accuracy'] / max(rows[1][2]['accuracy'], 1e-9):.2f}×"),
        ("random adapter ≤ chance + 10 points", random_arm["accuracy"] <= chance + 0.10, f"{random_arm['accuracy']:.0%}"),
        ("held-out ≥ 0.8× English (aim)", held_out["accuracy"] >= 0.8 * rows[3][2]["accuracy"],
         f"{held_out['accuracy'] / max(rows[3][2]['accuracy'], 1e-9):.2f}×"),
    ]
    lines += ["", "Goals: " + "; ".join(f"{name}: {value} ({'met' if ok else 'missed'})" for name, ok, value in goals) + "."]
    table = "\n".join(lines)
    print(table)
    print(f"chance: 1/24 = 4% (colour 1/6 = 17%, shape 1/4 = 25%); {len(jobs)} images in {seconds:.0f} s")

    if args.write and args.weights != "f32":
        heading = f"{HEADING} with {args.weights} weights"
        command = (f"python3 benchmarks/method_fidelity.py --seeds {args.seeds} --weights {args.weights} "
                   "--write benchmarks/RESULTS.md")
        section = (f"{heading}\n\n`{command}`: the section above's run with every arm's `pea generate --backend cpu "
                   f"--weights {args.weights}` (linear and convolution weights held in {args.weights}, computed in f32).\n\n"
                   f"{table}\n")
        write_section(args.write, heading, section)
        print(f"wrote {args.write}")
    elif args.write:
        # The picture: for each class, English (seed 0) above Chinese (seed 0); two bands of 12 classes.
        order = []
        for band in (CLASSES[:12], CLASSES[12:]):
            order += [os.path.join(work, f"english_{c}_{s}_0.png") for c, s in band]
            order += [os.path.join(work, f"{'zh-held-out' if (c, s) in HELD_OUT else 'zh-trained'}_{c}_{s}_0.png")
                      for c, s in band]
        result = subprocess.run([args.pea, "toyworld", "grid", "--columns", "12", "--output", args.grid, *order],
                                capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"pea toyworld grid failed:\n{result.stderr}")
        command = "python3 benchmarks/method_fidelity.py --seeds {} --write benchmarks/RESULTS.md".format(args.seeds)
        grid = os.path.relpath(args.grid, os.path.dirname(os.path.abspath(args.write)))
        section = (f"{HEADING}\n\n`{command}` (pea generate's defaults: DPM-Solver++ 30 steps, guidance 7.5, 64×64; "
                   f"seeds 0–{args.seeds - 1}; judged by `pea toyworld classify`). Chance: 4% (colour 17%, shape 25%).\n\n"
                   f"{table}\n\n![English above Chinese, seed 0]({grid})\n\n"
                   "Each pair of rows: the English teacher's sample (\"a red circle\") above the Chinese one "
                   "(\"一个红色的圆形\") through the trained adapter; red cross, green triangle, blue circle and yellow "
                   "square were held out of the Chinese training data. How the teacher and the adapter were trained "
                   "(commands, seeds, times): tools/toyworld/README.md.\n")
        write_section(args.write, HEADING, section)
        print(f"wrote {args.write} and {args.grid}")
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
