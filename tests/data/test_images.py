"""Header reading (scan) and decoding (images) of every kind of file a user may have."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from image_files import png_rgb16, save_image
from ldm.data.buckets import Bucket
from ldm.data.images import load_bucket_image, open_rgb, to_rgb8, to_tensor
from ldm.data.scan import read_image_header


def test_alpha_is_composited_onto_the_chosen_background(tmp_path):
    im = Image.new("RGBA", (80, 80), (255, 0, 0, 0))
    im.paste((0, 0, 255, 255), (0, 0, 40, 80))  # left half opaque blue, right half transparent
    assert to_rgb8(im, "white").getpixel((60, 10)) == (255, 255, 255)
    assert to_rgb8(im, "black").getpixel((60, 10)) == (0, 0, 0)
    assert to_rgb8(im, "black").getpixel((10, 10)) == (0, 0, 255)
    a, b = (to_rgb8(im, "random", random.Random(s)).getpixel((60, 10)) for s in (1, 2))
    assert a != b and a == to_rgb8(im, "random", random.Random(1)).getpixel((60, 10))
    half = to_rgb8(Image.new("LA", (8, 8), (0, 128)), "white").getpixel((0, 0))
    assert all(126 <= c <= 128 for c in half)
    with pytest.raises(ValueError, match="rng"):
        to_rgb8(im, "random")


@pytest.mark.parametrize("mode", ["P", "L", "1", "CMYK", "YCbCr", "LA", "PA", "I;16", "I"])
def test_every_mode_becomes_8bit_rgb(mode):
    src = Image.new("RGB", (16, 16), (200, 100, 50)).convert("L" if mode in ("LA", "1", "I;16", "I") else "RGB")
    im = src.convert(mode) if mode not in ("I;16",) else Image.fromarray(np.full((16, 16), 40000, np.uint16))
    out = to_rgb8(im, "white")
    assert out.mode == "RGB" and out.size == (16, 16)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    a = np.array([[0, 32768, 65535, 4096]], np.uint16).repeat(4, 0)
    out = np.asarray(to_rgb8(Image.fromarray(a)))
    assert out[0, :, 0].tolist() == [0, 128, 255, 16]


def test_palette_transparency_is_honoured():
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.info["transparency"] = 1
    assert to_rgb8(im, "white").getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_rgb_png_and_cmyk_jpeg_load(tmp_path):
    rgb16 = open_rgb(str(png_rgb16(tmp_path / "deep.png")))
    assert rgb16.mode == "RGB" and rgb16.getpixel((0, 0)) == (255, 128, 0)
    cmyk = open_rgb(str(save_image(tmp_path / "c.jpg", (64, 64), mode="CMYK", colour=(255, 0, 0))))
    r, g, b = cmyk.getpixel((32, 32))
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied_in_header_and_pixels(tmp_path):
    im = Image.new("RGB", (160, 80), (0, 0, 0))
    im.paste((255, 0, 0), (0, 0, 20, 20))  # red marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    assert read_image_header(str(path)) == (80, 160)
    shown = open_rgb(str(path))
    assert shown.size == (80, 160)
    assert shown.getpixel((70, 10))[0] > 200 and shown.getpixel((10, 10))[0] < 60  # marker now top-right


def test_tensor_shape_range_and_flip(tmp_path):
    path = str(save_image(tmp_path / "g.png", (300, 200)))
    bucket = Bucket(576, 448)
    x = load_bucket_image(path, bucket)
    assert x.shape == (3, 448, 576) and x.dtype == torch.float32
    assert -1.0 <= x.min() < -0.9 and 0.9 < x.max() <= 1.0   # the gradient spans the full range
    assert x[0, :, 0].mean() < x[0, :, -1].mean()             # red grows left to right
    flipped = load_bucket_image(path, bucket, flip=True)
    assert torch.equal(flipped, x.flip(-1))
    lanczos = load_bucket_image(path, bucket, resample="lanczos")
    assert lanczos.shape == x.shape and not torch.equal(lanczos, x)
    assert to_tensor(Image.new("RGB", (2, 1), (255, 0, 0))).tolist() == [[[1.0, 1.0]], [[-1.0, -1.0]], [[-1.0, -1.0]]]


def test_jitter_moves_the_crop_reproducibly(tmp_path):
    path = str(save_image(tmp_path / "wide.png", (400, 100)))
    a = load_bucket_image(path, Bucket(64, 64), jitter=0.2, rng=random.Random(1))
    b = load_bucket_image(path, Bucket(64, 64), jitter=0.2, rng=random.Random(1))
    c = load_bucket_image(path, Bucket(64, 64), jitter=0.2, rng=random.Random(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_big_jpeg_is_drafted_but_still_covers_the_bucket(tmp_path):
    path = str(save_image(tmp_path / "big.jpg", (2400, 1600)))
    bucket = Bucket(576, 448)
    im = open_rgb(path, bucket)
    assert im.size[0] <= 1200 and im.size[0] >= 576 and im.size[1] >= 448  # decoded at 1/2 or less
    assert load_bucket_image(path, bucket).shape == (3, 448, 576)
    assert open_rgb(path).size == (2400, 1600)  # no bucket, no draft


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"this is text, not a PNG", "not an image"),
])
def test_header_reasons_for_bad_bytes(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=reason):
        read_image_header(str(path))


def test_header_reasons_for_truncated_small_and_bomb(tmp_path, monkeypatch):
    good = save_image(tmp_path / "ok.jpg", (200, 150))
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:700])
    with pytest.raises(ValueError, match="truncated JPEG"):
        read_image_header(str(tmp_path / "cut.jpg"))
    png = save_image(tmp_path / "ok.png", (200, 150)).read_bytes()
    (tmp_path / "cut.png").write_bytes(png[:-20])
    with pytest.raises(ValueError, match="truncated PNG"):
        read_image_header(str(tmp_path / "cut.png"))
    with pytest.raises(ValueError, match="too small: 48x200"):
        read_image_header(str(save_image(tmp_path / "s.png", (48, 200))))
    assert read_image_header(str(save_image(tmp_path / "s2.png", (48, 200))), min_side=32) == (48, 200)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ValueError, match="decompression-bomb"):
        read_image_header(str(good))  # 30,000 px: over the limit, under twice the limit
    with pytest.raises(ValueError, match="decompression-bomb"):
        read_image_header(str(save_image(tmp_path / "huge.png", (400, 400))))  # over twice: Pillow refuses


def test_a_file_truncated_after_the_scan_fails_loudly_at_load(tmp_path):
    path = save_image(tmp_path / "ok.jpg", (400, 300))
    assert read_image_header(str(path)) == (400, 300)
    path.write_bytes(path.read_bytes()[:2000])  # cut short after the scan
    with pytest.raises(OSError, match="truncated"):
        load_bucket_image(str(path), Bucket(64, 64))
