"""The toy world: 64×64 RGB images of one coloured shape on white, with English and Chinese captions.

This is the world's definition for the Python side (the teacher's training data, tools/toyworld/train_teacher.py);
Pea's own definition (`pea toyworld`, Sources/PEADiffusion/ToyWorld/) draws the same pictures and is tested
against drawings this module writes (tools/toyworld/make_world_fixtures.py).

- 6 colours × 4 shapes = 24 classes, white background.
- The object's box is a square of side 30–60% of the image width, anywhere inside the image.
- circle: the disc inscribed in the box; square: the box; triangle: apex at the top middle, base along the box's
  bottom edge; cross: a plus sign whose arms are a third of the box wide.
- Edges are anti-aliased by 4×4 supersampling (the pixel's colour is the covered fraction's blend with white).
"""

import numpy as np

SIZE = 64
COLOURS = {            # English name → (Chinese name, RGB)
    "red": ("红色", (220, 40, 40)),
    "green": ("绿色", (40, 170, 60)),
    "blue": ("蓝色", (40, 80, 220)),
    "yellow": ("黄色", (235, 200, 40)),
    "purple": ("紫色", (140, 60, 190)),
    "orange": ("橙色", (240, 130, 30)),
}
SHAPES = {             # English name → Chinese name
    "circle": "圆形",
    "square": "正方形",
    "triangle": "三角形",
    "cross": "十字形",
}
COLOUR_NAMES = list(COLOURS)
SHAPE_NAMES = list(SHAPES)
CLASSES = [(c, s) for c in COLOUR_NAMES for s in SHAPE_NAMES]
# Held out of the Chinese training data (the English teacher sees them).
HELD_OUT = [("red", "cross"), ("green", "triangle"), ("blue", "circle"), ("yellow", "square")]

# Parallel caption templates: (English, Chinese). The first of each is the canonical prompt.
TEMPLATES = [
    ("a {c} {s}", "一个{zc}的{zs}"),
    ("{c} {s}", "{zc}{zs}"),
    ("a {c} {s} on a white background", "白色背景上的一个{zc}{zs}"),
    ("a picture of a {c} {s}", "一张{zc}{zs}的图片"),
    ("a drawing of a {c} {s}", "画着一个{zc}的{zs}"),
    ("a simple {c} {s}", "一个简单的{zc}{zs}"),
]

MIN_FRACTION, MAX_FRACTION = 0.30, 0.60
SUPERSAMPLE = 4


def caption(colour, shape, template=0):
    en, zh = TEMPLATES[template]
    zc, zs = COLOURS[colour][0], SHAPES[shape]
    return en.format(c=colour, s=shape), zh.format(zc=zc, zs=zs)


def coverage(shape, x0, y0, side, size=SIZE, supersample=SUPERSAMPLE):
    """The fraction of each pixel covered by `shape` in the box (x0, y0, side) (pixel units, y down): [size, size]."""
    n = size * supersample
    centres = (np.arange(n) + 0.5) / supersample
    x, y = np.meshgrid(centres, centres)
    u, v = (x - x0) / side, (y - y0) / side          # box coordinates in [0, 1]
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "circle":
        mask = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "square":
        mask = inside
    elif shape == "triangle":
        mask = inside & (np.abs(u - 0.5) <= 0.5 * v)
    elif shape == "cross":
        third = 1.0 / 3.0
        arm_h = (v >= third) & (v <= 2 * third)
        arm_v = (u >= third) & (u <= 2 * third)
        mask = inside & (arm_h | arm_v)
    else:
        raise ValueError(f"unknown shape {shape}")
    return mask.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def draw(colour, shape, x0, y0, side):
    """uint8 [64, 64, 3]: the shape over white."""
    rgb = np.array(COLOURS[colour][1], dtype=np.float64)
    a = coverage(shape, x0, y0, side)[..., None]
    image = a * rgb + (1 - a) * 255.0
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def random_box(rng):
    """A box inside the image: side 30–60% of the width, top-left uniform where it fits."""
    side = rng.uniform(MIN_FRACTION, MAX_FRACTION) * SIZE
    x0 = rng.uniform(0, SIZE - side)
    y0 = rng.uniform(0, SIZE - side)
    return x0, y0, side
