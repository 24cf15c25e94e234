"""Decode one image into a bucket-sized tensor: Pillow only, nothing written back.

    open  ─► JPEG draft (DCT-domain 1/2..1/8 downscale when the bucket is much smaller)
          ─► EXIF orientation ─► 8-bit RGB (16-bit scaled, palette/gray/CMYK converted,
             alpha composited onto a solid background)
          ─► crop box + resize in one `Image.resize(box=...)` (bicubic or Lanczos)
          ─► optional horizontal flip ─► float tensor [3, H, W] in [-1, 1]
"""
from __future__ import annotations

import math
import random
import warnings

import numpy as np
import torch
from PIL import Image

from ldm.data.buckets import Bucket, cover_scale, crop_box
from ldm.data.scan import exif_orientation

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
BACKGROUNDS = ("white", "black", "random")
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def check_choice(value: str, choices, key: str) -> str:
    if value not in choices:
        raise ValueError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def background_colour(background: str, rng: random.Random | None) -> tuple[int, int, int]:
    if background == "white":
        return (255, 255, 255)
    if background == "black":
        return (0, 0, 0)
    if rng is None:
        raise ValueError("background: 'random' needs an rng")
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def to_rgb8(im: Image.Image, background: str = "white", rng: random.Random | None = None) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited onto `background`."""
    if im.mode in _SIXTEEN_BIT:
        a = np.asarray(im).astype(np.uint32)
        if im.mode != "I" or a.max() > 255:  # "I" may already hold 8-bit values
            a = a >> 8
        im = Image.fromarray(a.astype(np.uint8), "L")
    if im.mode == "P" or (im.mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, background_colour(background, rng))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return im if im.mode == "RGB" else im.convert("RGB")


def open_rgb(path: str, bucket: Bucket | None = None, background: str = "white",
             rng: random.Random | None = None) -> Image.Image:
    """The image at `path` as displayed (EXIF orientation applied), 8-bit RGB.

    With `bucket`, a JPEG is decoded at the smallest 1/1, 1/2, 1/4 or 1/8 scale that still
    covers the bucket, so a 24 MP photo costs about a 1.5 MP decode.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the scan enforces the limit
        im = Image.open(path)
    try:
        orientation = exif_orientation(im)
        if bucket is not None and im.format == "JPEG":
            w, h = im.size if orientation < 5 else im.size[::-1]  # displayed size
            scale = min(cover_scale(w, h, bucket), 1.0)
            need = (math.ceil(w * scale), math.ceil(h * scale))
            im.draft(im.mode, need if orientation < 5 else need[::-1])
        im.load()  # reads the pixels and releases the file
    except BaseException:
        im.close()
        raise
    if orientation in _ORIENT:
        im = im.transpose(_ORIENT[orientation])
    return to_rgb8(im, background, rng)


def fit_to_bucket(im: Image.Image, bucket: Bucket, resample: str = "bicubic", jitter: float = 0.0,
                  rng: random.Random | None = None) -> Image.Image:
    """Scale to cover the bucket and crop to it, in one resize over the crop box."""
    box = crop_box(im.width, im.height, bucket, jitter, rng)
    return im.resize((bucket.width, bucket.height), RESAMPLE[resample], box=box, reducing_gap=3.0)


def to_tensor(im: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> float32 [3, H, W] in [-1, 1]."""
    hwc = torch.from_numpy(np.array(im, dtype=np.uint8))  # [H, W, 3]
    return hwc.permute(2, 0, 1).contiguous().float().div_(127.5).sub_(1.0)


def load_bucket_image(path: str, bucket: Bucket, *, resample: str = "bicubic", background: str = "white",
                      jitter: float = 0.0, flip: bool = False, rng: random.Random | None = None) -> torch.Tensor:
    """The training input for one image: [3, bucket.height, bucket.width] in [-1, 1]."""
    im = fit_to_bucket(open_rgb(path, bucket, background, rng), bucket, resample, jitter, rng)
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(im)
