"""Small image files generated with Pillow, for the data tests (imported by conftest and tests)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def save_image(path: Path, size=(96, 64), mode="RGB", colour=None, exif_orientation: int | None = None,
               fmt: str | None = None) -> Path:
    """A gradient image (so crops and flips are visible) saved at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    rgb = np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)
    im = Image.fromarray(rgb, "RGB") if colour is None else Image.new("RGB", size, colour)
    if mode != "RGB":
        im = im.convert(mode)
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    im.save(path, format=fmt, **kwargs)
    return path


def png_rgb16(path: Path, size=(80, 72)) -> Path:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot save one)."""
    w, h = size
    rows = b"".join(b"\x00" + struct.pack(">" + "H" * 3 * w, *([65535, 32768, 0] * w)) for _ in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path
