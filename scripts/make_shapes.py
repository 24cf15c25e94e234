"""Procedurally generated, captioned images of coloured shapes.

    python scripts/make_shapes.py OUT_DIR [--count 64] [--size 64] [--seed 0] [--concept shapes|meeb]

Each image is saved as `<caption>_(<n>).png`, so the caption comes from the file name
(`a small red circle on a white background_(3).png`). Aspect ratios vary (square,
landscape, portrait) so the aspect buckets are exercised. `--concept meeb` draws a
figure the shapes model has never seen: a rounded blob with two eyes, in a few colours
and poses, with captions like `a meeb waving on a black background`; one of the meebs
is saved with transparency.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 190), "orange": (240, 140, 30),
}
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "ring")
SIZES = {"small": 0.25, "large": 0.42}
ASPECTS = ((1, 1), (1, 1), (3, 2), (2, 3), (2, 1), (1, 2))
POSES = ("standing", "waving", "jumping")


def _canvas(rng: random.Random, size: int, background: tuple[int, int, int]) -> Image.Image:
    aw, ah = rng.choice(ASPECTS)
    scale = size / max(aw, ah)
    return Image.new("RGB", (max(int(aw * scale), 16), max(int(ah * scale), 16)), background)


def draw_shape(img: Image.Image, shape: str, colour: tuple[int, int, int], rel: float, rng: random.Random) -> None:
    w, h = img.size
    r = rel * min(w, h)
    cx = rng.uniform(r, w - r)
    cy = rng.uniform(r, h - r)
    d = ImageDraw.Draw(img)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "ring":
        d.ellipse(box, outline=colour, width=max(int(r * 0.35), 2))
    else:
        raise ValueError(f"unknown shape {shape!r}")


def draw_meeb(img: Image.Image, colour: tuple[int, int, int], pose: str, rng: random.Random) -> None:
    w, h = img.size
    r = 0.3 * min(w, h)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + (-0.12 * h if pose == "jumping" else 0.05 * h)
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((cx - r, cy - r, cx + r, cy + 1.2 * r), radius=r * 0.6, fill=colour)
    for ex in (cx - 0.4 * r, cx + 0.4 * r):  # two big eyes
        d.ellipse((ex - 0.22 * r, cy - 0.45 * r, ex + 0.22 * r, cy - 0.01 * r), fill=(255, 255, 255))
        d.ellipse((ex - 0.09 * r, cy - 0.3 * r, ex + 0.09 * r, cy - 0.12 * r), fill=(0, 0, 0))
    if pose == "waving":
        d.line((cx + r, cy, cx + 1.5 * r, cy - 0.8 * r), fill=colour, width=max(int(0.2 * r), 2))


def make_shapes(out: Path, count: int, size: int = 64, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    seen: dict[str, int] = {}
    paths = []
    for _ in range(count):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        size_word, bg = rng.choice(list(SIZES)), rng.choice(list(BACKGROUNDS))
        img = _canvas(rng, size, BACKGROUNDS[bg])
        draw_shape(img, shape, COLOURS[colour], SIZES[size_word], rng)
        caption = f"a {size_word} {colour} {shape} on a {bg} background"
        seen[caption] = seen.get(caption, 0) + 1
        path = out / f"{caption}_({seen[caption]}).png"
        img.save(path)
        paths.append(path)
    return paths


def make_meebs(out: Path, count: int, size: int = 64, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    seen: dict[str, int] = {}
    paths = []
    colours = ("green", "purple", "orange")
    for i in range(count):
        colour, pose, bg = rng.choice(colours), rng.choice(POSES), rng.choice(("white", "black"))
        img = _canvas(rng, size, BACKGROUNDS[bg])
        draw_meeb(img, COLOURS[colour], pose, rng)
        caption = f"a {colour} meeb {pose} on a {bg} background"
        seen[caption] = seen.get(caption, 0) + 1
        path = out / f"{caption}_({seen[caption]}).png"
        if i == 0:  # one RGBA image: the background becomes transparent
            pixels = np.asarray(img)
            alpha = np.where((pixels == BACKGROUNDS[bg]).all(axis=-1), 0, 255).astype(np.uint8)
            Image.fromarray(np.dstack([pixels, alpha]), "RGBA").save(path)
        else:
            img.save(path)
        paths.append(path)
    return paths


def dominant_colour(img: Image.Image, background: str, min_pixels: int = 20) -> str | None:
    """The palette colour nearest the median of the pixels that differ from `background`
    (None when fewer than `min_pixels` do): what a prompt's colour word should give."""
    pixels = np.asarray(img.convert("RGB")).reshape(-1, 3).astype(np.int32)
    fg = pixels[np.abs(pixels - np.array(BACKGROUNDS[background])).sum(axis=1) > 90]
    if len(fg) < min_pixels:
        return None
    median = np.median(fg, axis=0)
    return min(COLOURS, key=lambda name: np.abs(np.array(COLOURS[name]) - median).sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--size", type=int, default=64, help="long side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concept", choices=("shapes", "meeb"), default="shapes")
    args = ap.parse_args(argv)
    make = make_meebs if args.concept == "meeb" else make_shapes
    paths = make(args.out, args.count, args.size, args.seed)
    print(f"wrote {len(paths)} images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
