"""Fixtures for the data tests: a data_root with every kind of file, generated in a temp dir."""
from __future__ import annotations

from pathlib import Path

import pytest

from image_files import png_rgb16, save_image

@pytest.fixture
def image_zoo(tmp_path: Path) -> Path:
    """A data_root with every case the scanner and loader must handle.

    Usable (12): landscape/portrait/square/4:1/1:4, nested, kohya folder, multiply.txt,
    sidecars, unicode, alpha, CMYK, 16-bit, EXIF-rotated, upper-case extension.
    Skipped (4): zero-byte, truncated, not an image, too small. Hidden files are not seen.
    """
    root = tmp_path / "data"
    save_image(root / "man" / "a man on a bench_(1).jpg", (128, 96))
    save_image(root / "man" / "a man on a bench_(2).JPG", (96, 128))
    save_image(root / "man" / "deep" / "er" / "a man in a hat.png", (100, 100))
    save_image(root / "man" / "IMG_0001.webp", (256, 64))
    (root / "man" / "IMG_0001.txt").write_text("  a man lying on a wide sofa\n", encoding="utf-8")
    save_image(root / "man" / "photo.jpeg", (64, 256))
    (root / "man" / "photo.caption").write_text("a very tall window", encoding="utf-8")
    (root / "man" / "stray.txt").write_text("no image has this name", encoding="utf-8")
    save_image(root / "3_sks dog" / "sks dog running.png", (120, 80))
    save_image(root / "3_sks dog" / "sks dog sitting.png", (80, 120))
    save_image(root / "paintings_laion" / "café à l’aube, oil painting.jpg", (90, 90))
    save_image(root / "paintings_laion" / "hatsune_miku, smiling_(3).png", (90, 90), mode="RGBA")
    (root / "paintings_laion" / "multiply.txt").write_text("0.5\n")
    save_image(root / "odd" / "a cmyk poster.jpg", (96, 96), mode="CMYK")
    png_rgb16(root / "odd" / "a deep colour photo.png")
    save_image(root / "odd" / "a rotated photo.jpg", (160, 80), exif_orientation=6)
    # bad files
    (root / "odd" / "zero bytes.png").write_bytes(b"")
    good = save_image(tmp_path / "full.jpg", (200, 150)).read_bytes()
    (root / "odd" / "cut short.jpg").write_bytes(good[: len(good) // 2])
    (root / "odd" / "notes.png").write_text("this is text, not a PNG")
    save_image(root / "odd" / "tiny thumb.png", (48, 200))
    save_image(root / ".hidden" / "secret.png", (96, 96))
    save_image(root / "man" / ".dotfile.png", (96, 96))
    return root
