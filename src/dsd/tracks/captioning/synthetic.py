"""Embedded captioning data: small generated scenes of shapes with 5 varied captions each.

Every image holds two shapes (sometimes a third, distractor one) with a colour and a size on a noisy dark grey
background; the captions name the shapes (the larger first) and their spatial relation. Synonyms, optional adjectives, both word orders of a relation and several
sentence frames make the 5 references of one image differ, so even a perfect describer stays well below
BLEU-4 = 100, while colour, shape and layout are learnable from the pixels. Everything is a pure function of
the seed (numpy default_rng + PIL drawing, PNG so the pixels are exact). Output is the Karpathy layout
(`dataset_scenes.json` + an image folder), read by the same code as Flickr8k.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dsd import paths

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "diamond")
NOUNS = {
    "circle": ("circle", "circle", "ball", "disc"),
    "square": ("square", "square", "box", "block"),
    "triangle": ("triangle", "triangle", "triangle", "wedge"),
    "diamond": ("diamond", "diamond", "diamond", "rhombus"),
}
SIZES = {"small": ("small", "small", "little", "tiny"), "large": ("large", "big", "big", "large")}
# relation of A to B -> phrases (the inverse relation describes B relative to A)
RELATIONS = {
    "left": ("to the left of", "left of", "on the left of", "next to", "beside"),
    "right": ("to the right of", "right of", "on the right of", "next to", "beside"),
    "above": ("above", "above", "over", "on top of"),
    "below": ("below", "below", "under", "beneath", "underneath"),
}
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
NUMBERS = {2: "two", 3: "three"}


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _noun_phrase(rng: np.random.Generator, obj: dict) -> str:
    """'a [size] [colour] noun'; colour is usually said, size about half the time."""
    words = ["a"]
    if rng.random() < 0.5:
        words.append(_pick(rng, SIZES[obj["size"]]))
    if rng.random() < 0.85:
        words.append(obj["colour"])
    words.append(_pick(rng, NOUNS[obj["shape"]]))
    return " ".join(words)


def _captions(rng: np.random.Generator, objects: list[dict], relation: str) -> list[str]:
    """Five captions from five different sentence frames (A relation B, B inverse A, lists, counts...)."""
    a, b = objects[0], objects[1]

    def np_(o):
        return _noun_phrase(rng, o)

    def rel(r):
        return _pick(rng, RELATIONS[r])

    frames = [
        lambda: f"{np_(a)} {rel(relation)} {np_(b)}",
        lambda: f"{np_(a)} is {rel(relation)} {np_(b)}",
        lambda: f"{np_(b)} is {rel(INVERSE[relation])} {np_(a)}",
        lambda: f"there is {np_(a)} {rel(relation)} {np_(b)}",
        lambda: f"{np_(b)} {rel(INVERSE[relation])} {np_(a)}",
        lambda: f"{np_(a)} and {np_(b)}",
        lambda: f"{NUMBERS[len(objects)]} shapes " + " and ".join(np_(o) for o in objects),
        lambda: f"{np_(b)} with {np_(a)} {rel(relation)} it",
    ]
    if len(objects) == 3:
        frames.append(lambda: f"{np_(a)} {rel(relation)} {np_(b)} and {np_(objects[2])}")
    order = rng.permutation(len(frames))[:5]
    return [frames[i]() for i in order]


def _draw(draw: ImageDraw.ImageDraw, obj: dict) -> None:
    x, y, r, fill = obj["x"], obj["y"], obj["r"], COLOURS[obj["colour"]]
    if obj["shape"] == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif obj["shape"] == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif obj["shape"] == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    else:
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)


def _place(rng: np.random.Generator, radius: int, placed: list[dict], size: int) -> tuple[int, int] | None:
    for _ in range(100):
        x, y = (int(v) for v in rng.integers(radius + 1, size - radius - 1, size=2))
        if all(max(abs(x - o["x"]), abs(y - o["y"])) > radius + o["r"] + 2 for o in placed):
            return x, y
    return None


def make_scene(rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, list[str]]:
    """One image and its 5 captions."""
    while True:
        count = 3 if rng.random() < 0.3 else 2
        objects: list[dict] = []
        for _ in range(count):
            size_name = "large" if rng.random() < 0.5 else "small"
            r = int(rng.integers(size // 7, size // 5 + 1)) if size_name == "large" else int(size // 14 + 1)
            where = _place(rng, r, objects, size)
            if where is None:
                break
            objects.append(
                {
                    "shape": _pick(rng, SHAPES),
                    "colour": _pick(rng, list(COLOURS)),
                    "size": size_name,
                    "r": r,
                    "x": where[0],
                    "y": where[1],
                }
            )
        if len(objects) < count:
            continue
        if objects[1]["size"] == "large" and objects[0]["size"] == "small":
            objects[0], objects[1] = objects[1], objects[0]  # the captions mention the larger shape first
        a, b = objects[0], objects[1]
        if (a["shape"], a["colour"]) != (b["shape"], b["colour"]):
            break
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]  # relation of A to B, by the dominant axis
    relation = ("left" if dx > 0 else "right") if abs(dx) >= abs(dy) else ("above" if dy > 0 else "below")
    background = tuple(int(v) for v in 50 + rng.integers(-10, 11, size=3))  # dark grey: colours stand out
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj)
    noise = rng.integers(-8, 9, size=(size, size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), _captions(rng, objects, relation)


def generate(
    out_dir: str | Path,
    seed: int = 0,
    splits: tuple[int, int, int] = (1500, 250, 250),
    image_size: int = 64,
    json_name: str = "dataset_scenes.json",
    image_dir: str = "images",
) -> Path:
    """Write `image_dir/*.png` and a Karpathy-format JSON under out_dir; returns the JSON path."""
    out_dir = Path(out_dir)
    (out_dir / image_dir).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, sentid = [], 0
    names = ["train"] * splits[0] + ["val"] * splits[1] + ["test"] * splits[2]
    for imgid, split in enumerate(names):
        image, captions = make_scene(rng, image_size)
        filename = f"scene_{imgid:05d}.png"
        paths.write_image(image, out_dir / image_dir / filename, format="PNG", optimize=False)
        sentences = []
        for raw in captions:
            sentences.append({"tokens": raw.split(), "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append(
            {
                "filename": filename,
                "imgid": imgid,
                "split": split,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
    path = out_dir / json_name
    tmp = path.with_suffix(".json.tmp")
    made_with = {"seed": seed, "splits": list(splits), "image_size": image_size}
    tmp.write_text(json.dumps({"dataset": "scenes", "generator": made_with, "images": images}))
    tmp.replace(path)  # the JSON appears last and whole: its presence means the images are all there
    return path
