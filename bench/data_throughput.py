"""Decode + resize + crop throughput of the data loader, per CPU core (not a test).

    python bench/data_throughput.py [--count 40] [--resolution 512]

Generates photo-like JPEGs in a temp folder (1 MP at 1152x864, and one 24 MP at 6000x4000),
then times `ldm.data.images.load_bucket_image` on one thread: bicubic and Lanczos for the
1 MP files, and the 24 MP file with and without the JPEG draft (DCT-domain downscale).
A DataLoader with N workers reaches about N times the per-core figure.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.data.buckets import make_buckets, nearest_bucket  # noqa: E402
from ldm.data.images import fit_to_bucket, load_bucket_image, open_rgb, to_tensor  # noqa: E402


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour fields plus fine grain: compresses and decodes like a photo, unlike flat colour."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(im, np.float32) + grain, 0, 255).astype(np.uint8), "RGB")


def timed(fn, paths, repeat: int = 1) -> float:
    """Seconds per image, best of `repeat` passes."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for p in paths:
            fn(p)
        best = min(best, (time.perf_counter() - start) / len(paths))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=40, help="number of 1 MP JPEGs")
    ap.add_argument("--resolution", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    buckets = make_buckets(args.resolution)
    with tempfile.TemporaryDirectory() as tmp:
        small = []
        for i in range(args.count):
            w, h = (1152, 864) if i % 2 else (864, 1152)
            path = os.path.join(tmp, f"p{i}.jpg")
            photo_like(w, h, i).save(path, quality=90)
            small.append(path)
        big = os.path.join(tmp, "big.jpg")
        photo_like(6000, 4000, 99).save(big, quality=90)
        bucket_of = {p: nearest_bucket(*Image.open(p).size, buckets) for p in small + [big]}

        results = []
        for resample in ("bicubic", "lanczos"):
            s = timed(lambda p: load_bucket_image(p, bucket_of[p], resample=resample), small, repeat=2)
            results.append((f"1 MP JPEG -> bucket, {resample}", s))
        s = timed(lambda p: load_bucket_image(p, bucket_of[p]), [big] * 3)
        results.append(("24 MP JPEG -> bucket, bicubic, with draft", s))
        s = timed(lambda p: to_tensor(fit_to_bucket(open_rgb(p), bucket_of[p])), [big] * 3)
        results.append(("24 MP JPEG -> bucket, bicubic, full decode", s))

    print(f"one thread, resolution {args.resolution}, Pillow {Image.__version__}, {os.cpu_count()} CPUs visible")
    for name, sec in results:
        print(f"  {name:44s} {sec * 1e3:7.1f} ms/image  {1 / sec:7.1f} images/s per core")


if __name__ == "__main__":
    main()
