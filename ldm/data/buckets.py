"""Aspect-ratio buckets: the table, nearest-aspect assignment and crop boxes (pure math).

For a training resolution R and a step s (64: the VAE's 8x times the UNet's 8x), every
bucket is w x h with both sides multiples of s and area w*h <= R^2, as close to R^2 as
the step allows:

    w = R, R+s, R+2s, ...      h = floor(R^2 / w / s) * s      while w / h <= max_aspect

plus each (h, w) transposed. For R = 512: 512x512, 576x448, 640x384, 704x320, 768x320,
832x256, 896x256, 960x256, 1024x256 and the portrait twins (17 buckets). The area never
exceeds R^2, so a batch size that fits at R x R fits in every bucket.

An image goes to the bucket whose log-aspect |log(w/h) - log(bw/bh)| is smallest (log, so
a 2:1 and a 1:2 image are treated alike), is scaled to cover it and cropped to it.
"""
from __future__ import annotations

import math
import random
from typing import NamedTuple, Sequence


class Bucket(NamedTuple):
    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def make_buckets(resolution: int = 512, step: int = 64, max_aspect: float = 4.0) -> tuple[Bucket, ...]:
    """The bucket table for `resolution`, square first, then landscape/portrait pairs by aspect."""
    if step < 8 or step % 8:
        raise ValueError(f"bucket_step: expected a multiple of 8 (the VAE downsamples by 8), got {step}")
    if resolution < step or resolution % step:
        raise ValueError(f"resolution: expected a multiple of bucket_step={step}, got {resolution}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect: expected >= 1 (4 means 4:1 .. 1:4), got {max_aspect}")
    area = resolution * resolution
    table = [Bucket(resolution, resolution)]
    w = resolution + step
    while True:
        h = (area // w) // step * step
        if h < step or w / h > max_aspect:
            break
        table += [Bucket(w, h), Bucket(h, w)]
        w += step
    return tuple(table)


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket closest in log-aspect; ties go to the earlier bucket in the table."""
    log_aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(log_aspect - math.log(b.width / b.height)))


def cover_scale(width: int, height: int, bucket: Bucket) -> float:
    """Scale that makes a width x height image just cover the bucket (> 1 means upscaling)."""
    return max(bucket.width / width, bucket.height / height)


def crop_box(width: int, height: int, bucket: Bucket, jitter: float = 0.0,
             rng: random.Random | None = None) -> tuple[float, float, float, float]:
    """The region of the source image, (left, top, right, bottom) in source pixels, that
    resizes to exactly the bucket.

    The region has the bucket's aspect and is as large as the image allows; it is centred,
    then shifted by up to `jitter` x (source side) along each axis, drawn from `rng`, and
    clamped inside the image. When the aspects match there is no room and no shift.
    """
    if jitter and rng is None:
        raise ValueError("crop_box: jitter needs an rng")
    scale = cover_scale(width, height, bucket)
    crop_w, crop_h = bucket.width / scale, bucket.height / scale  # <= width, height
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    if jitter:
        left += rng.uniform(-jitter, jitter) * width
        top += rng.uniform(-jitter, jitter) * height
    left = min(max(left, 0.0), width - crop_w)
    top = min(max(top, 0.0), height - crop_h)
    return left, top, left + crop_w, top + crop_h
