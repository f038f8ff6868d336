"""Procedural data sets the project generates itself, so tests and the demo download nothing.

`shapes`: class-labelled images of one filled shape on a plain background, with random colour,
size and position, and a caption. Sample `i` depends only on (seed, i).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ["circle", "square", "triangle", "cross", "ring", "diamond", "hbar", "vbar", "star", "ellipse"]
COLOURS = {
    "red": (220, 50, 47),
    "green": (60, 180, 75),
    "blue": (40, 90, 220),
    "yellow": (240, 210, 40),
    "magenta": (200, 60, 200),
    "cyan": (40, 200, 210),
    "orange": (245, 130, 48),
    "white": (240, 240, 240),
}


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy - rad * math.sin(a)))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, cls: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    w = max(2, r * 0.45)
    if cls == "circle":
        draw.ellipse(box, fill=fill)
    elif cls == "square":
        draw.rectangle(box, fill=fill)
    elif cls == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif cls == "cross":
        draw.rectangle((cx - r, cy - w / 2, cx + r, cy + w / 2), fill=fill)
        draw.rectangle((cx - w / 2, cy - r, cx + w / 2, cy + r), fill=fill)
    elif cls == "ring":
        draw.ellipse(box, outline=fill, width=int(max(2, r * 0.35)))
    elif cls == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif cls == "hbar":
        draw.rectangle((cx - r, cy - w / 2, cx + r, cy + w / 2), fill=fill)
    elif cls == "vbar":
        draw.rectangle((cx - w / 2, cy - r, cx + w / 2, cy + r), fill=fill)
    elif cls == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif cls == "ellipse":
        draw.ellipse((cx - r, cy - r * 0.55, cx + r, cy + r * 0.55), fill=fill)
    else:
        raise ValueError(cls)


def shape_image(index: int, resolution: int = 32, seed: int = 0) -> tuple[Image.Image, int, str]:
    """→ (RGB image, class id, caption), a pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    cls = int(index % len(CLASSES))  # balanced classes
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    bg = tuple(int(v) for v in rng.integers(0, 60, size=3))
    S = resolution
    r = float(rng.uniform(0.2, 0.34) * S)
    cx, cy = (float(rng.uniform(r + 1, S - r - 1)) for _ in range(2))
    # Draw at 4x and downsample: anti-aliased edges look like real photos of shapes, not pixel art.
    k = 4
    img = Image.new("RGB", (S * k, S * k), bg)
    draw_shape(ImageDraw.Draw(img), CLASSES[cls], cx * k, cy * k, r * k, COLOURS[colour])
    img = img.resize((S, S), Image.Resampling.LANCZOS)
    where = "left" if cx < S / 3 else "right" if cx > 2 * S / 3 else "centre"
    caption = f"a {colour} {CLASSES[cls]} on the {where}"
    return img, cls, caption


# `moving-shapes`: one shape sliding across the frame in one of 8 directions; the class is the
# direction, so a video model can only get it right by looking at motion, not at one frame.
DIRECTIONS = ["right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right"]


def moving_shapes_video(
    index: int, resolution: int = 32, frames: int = 8, seed: int = 0
) -> tuple[np.ndarray, int, str]:
    """→ (frames (T, H, W, 3) uint8, class id = direction index, caption), a pure function of
    (seed, index)."""
    rng = np.random.default_rng([seed, 1, index])
    cls = int(index % len(DIRECTIONS))  # balanced classes
    shape = CLASSES[int(rng.integers(len(CLASSES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    bg = tuple(int(v) for v in rng.integers(0, 60, size=3))
    S, k = resolution, 4
    r = float(rng.uniform(0.14, 0.22) * S)
    angle = cls * math.pi / 4
    dx, dy = math.cos(angle), -math.sin(angle)  # image y grows downwards
    # Travel a straight line through the centre region, from -d/2 to +d/2 along the direction.
    travel = S - 2 * r - 2
    cx0 = S / 2 - dx * travel / 2 + float(rng.uniform(-1, 1))
    cy0 = S / 2 - dy * travel / 2 + float(rng.uniform(-1, 1))
    out = np.empty((frames, S, S, 3), dtype=np.uint8)
    for t in range(frames):
        a = t / max(frames - 1, 1)
        img = Image.new("RGB", (S * k, S * k), bg)
        draw_shape(
            ImageDraw.Draw(img), shape, (cx0 + dx * travel * a) * k, (cy0 + dy * travel * a) * k, r * k, COLOURS[colour]
        )
        out[t] = np.asarray(img.resize((S, S), Image.Resampling.LANCZOS))
    return out, cls, f"a {colour} {shape} moving {DIRECTIONS[cls]}"
