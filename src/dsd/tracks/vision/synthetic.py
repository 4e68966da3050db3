"""The embedded image data set: small photographs of shapes, generated deterministically from a seed.

Written as JPEGs in ImageFolder layout (`train/<class>/*.jpg`, `val/...`, `test/...`), so the vision track
reads it with exactly the loader that reads ImageNet. Difficulty comes from clutter (smaller distractor
shapes of other classes), random colours with low contrast at times, rotation, scale, blur and noise; hollow
and filled versions of the same outline are separate classes.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from dsd import paths

CLASSES = (
    "circle",
    "ring",
    "square",
    "frame",
    "triangle",
    "diamond",
    "cross",
    "star",
    "hexagon",
    "crescent",
)
# Images per class. Every seed is scored on the same test images, so their draw is shared by all seeds: the
# report's interval counts it, and a larger test set narrows it (at the cost of evaluation time).
SPLITS = {"train": 200, "val": 50, "test": 150}
SUPERSAMPLE = 4


def _polygon(center, radius, sides, angle, star=False):
    points = []
    count = sides * 2 if star else sides
    for i in range(count):
        r = radius * (0.45 if star and i % 2 else 1.0)
        a = angle + 2 * math.pi * i / count
        points.append((center[0] + r * math.cos(a), center[1] + r * math.sin(a)))
    return points


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, center, radius, angle, color, background) -> None:
    """One shape; `background` is used to cut holes (ring, frame, crescent)."""
    x, y = center
    box = (x - radius, y - radius, x + radius, y + radius)
    width = max(2, int(radius * 0.35))
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "ring":
        draw.ellipse(box, outline=color, width=width)
    elif kind == "square":
        draw.polygon(_polygon(center, radius * 1.2, 4, angle + math.pi / 4), fill=color)
    elif kind == "frame":
        draw.polygon(_polygon(center, radius * 1.2, 4, angle + math.pi / 4), outline=color, width=width)
    elif kind == "triangle":
        draw.polygon(_polygon(center, radius * 1.15, 3, angle), fill=color)
    elif kind == "diamond":
        points = _polygon(center, radius, 4, angle)
        points = [(x + (px - x) * 0.6, py) for px, py in points]
        draw.polygon(points, fill=color)
    elif kind == "cross":
        for a in (angle, angle + math.pi / 2):
            dx, dy = math.cos(a) * radius, math.sin(a) * radius
            draw.line((x - dx, y - dy, x + dx, y + dy), fill=color, width=width)
    elif kind == "star":
        draw.polygon(_polygon(center, radius * 1.2, 5, angle, star=True), fill=color)
    elif kind == "hexagon":
        draw.polygon(_polygon(center, radius, 6, angle), fill=color)
    elif kind == "crescent":
        draw.ellipse(box, fill=color)
        shift = radius * 0.55
        ox, oy = x + math.cos(angle) * shift, y + math.sin(angle) * shift
        draw.ellipse((ox - radius, oy - radius, ox + radius, oy + radius), fill=background)
    else:
        raise ValueError(f"unknown shape {kind!r}")


def _color(rng: np.random.Generator, low: int, high: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(low, high, size=3))


def render(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    """One image of class `label` with clutter; all randomness comes from `rng`.

    The object is brighter than the background and the distractors (so the task is about shape, not about
    finding the object), except for a share of low-contrast images.
    """
    big = size * SUPERSAMPLE
    background = _color(rng, 0, 110)
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 3))):  # distractors: smaller, dimmer shapes of other classes
        other = CLASSES[int(rng.choice([i for i in range(len(CLASSES)) if i != label]))]
        r = big * rng.uniform(0.07, 0.13)
        c = rng.uniform(r, big - r, size=2)
        draw_shape(draw, other, c, r, rng.uniform(0, 2 * math.pi), _color(rng, 40, 170), background)
    r = big * rng.uniform(0.24, 0.38)
    c = rng.uniform(r * 0.9, big - r * 0.9, size=2)
    color = _color(rng, 60, 256)
    color = tuple(max(v, 170) if i == int(rng.integers(3)) else v for i, v in enumerate(color))
    if rng.random() < 0.1:  # low contrast: object colour near the background's
        color = tuple(int(np.clip(b + rng.integers(-60, 61), 0, 255)) for b in background)
    draw_shape(draw, CLASSES[label], c, r, rng.uniform(0, 2 * math.pi), color, background)
    image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0, 0.6) * SUPERSAMPLE))
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0, rng.uniform(2, 12), size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _split_index(split: str) -> int:
    """A split's stream of the generator: fixed by name, never by the order the splits were listed in."""
    known = list(SPLITS)
    return known.index(split) if split in known else len(known) + sum(map(ord, split))


def generate(out_dir: str | Path, seed: int = 0, size: int = 32, per_class: dict | None = None) -> dict:
    """Write the data set; returns a summary. Same seed and sizes -> identical files."""
    out_dir = Path(out_dir)
    per_class = per_class or SPLITS
    counts = {}
    for split in per_class:  # a previous generation's images (other counts or seed) must not stay among these
        shutil.rmtree(out_dir / split, ignore_errors=True)
    jobs = [(split, label) for split in per_class for label in range(len(CLASSES))]
    for split, label in tqdm(jobs, desc="shapes", unit="class", leave=False):
        folder = out_dir / split / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, _split_index(split), label])
        for i in range(per_class[split]):
            paths.write_image(render(rng, label, size), folder / f"{CLASSES[label]}_{i:05d}.jpg", quality=90)
        counts[split] = counts.get(split, 0) + per_class[split]
    return {"classes": list(CLASSES), "images": counts, "size": size, "seed": seed}
