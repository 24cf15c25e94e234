import math
import random

import pytest

from ldm.data.buckets import Bucket, cover_scale, crop_box, make_buckets, nearest_bucket


def test_table_for_512_matches_the_documented_list():
    landscape = [(512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256),
                 (960, 256), (1024, 256)]
    table = make_buckets(512)
    assert set(table) == {Bucket(w, h) for w, h in landscape} | {Bucket(h, w) for w, h in landscape}
    assert len(table) == 17 and table[0] == Bucket(512, 512)


@pytest.mark.parametrize("resolution", [256, 512, 768, 1024])
def test_tables_respect_step_area_and_aspect(resolution):
    table = make_buckets(resolution)
    assert len(set(table)) == len(table)
    for b in table:
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert b.width * b.height <= resolution ** 2
        assert b.width * b.height >= 0.75 * resolution ** 2  # close to R^2 within one step
        assert max(b.width / b.height, b.height / b.width) <= 4.0
    ratios = sorted(b.width / b.height for b in table)
    assert ratios[0] <= 0.3 and ratios[-1] >= 3.3  # spans (nearly) 1:4 .. 4:1


def test_table_is_configurable_and_validated():
    assert make_buckets(512, max_aspect=1.0) == (Bucket(512, 512),)
    assert all(max(b) / min(b) <= 2 for b in make_buckets(768, max_aspect=2.0))
    assert make_buckets(64) == (Bucket(64, 64),)
    with pytest.raises(ValueError, match="resolution"):
        make_buckets(500)
    with pytest.raises(ValueError, match="bucket_step"):
        make_buckets(512, step=60)
    with pytest.raises(ValueError, match="max_aspect"):
        make_buckets(512, max_aspect=0.5)


def test_nearest_aspect_is_symmetric_and_clamped():
    table = make_buckets(512)
    assert nearest_bucket(1000, 1000, table) == Bucket(512, 512)
    assert nearest_bucket(1920, 1080, table) == Bucket(640, 384)
    wide = nearest_bucket(1500, 1000, table)
    assert nearest_bucket(1000, 1500, table) == Bucket(wide.height, wide.width)
    assert nearest_bucket(10000, 100, table) == Bucket(1024, 256)
    assert nearest_bucket(100, 10000, table) == Bucket(256, 1024)
    # the chosen bucket minimises the log-aspect distance
    for w, h in [(640, 480), (300, 900), (1234, 567)]:
        best = nearest_bucket(w, h, table)
        d = lambda b: abs(math.log(w / h) - math.log(b.width / b.height))
        assert all(d(best) <= d(b) for b in table)


def test_cover_scale_and_upscale_detection():
    assert cover_scale(1024, 1024, Bucket(512, 512)) == 0.5
    assert cover_scale(300, 200, Bucket(576, 448)) > 1  # a small image is upscaled
    assert cover_scale(2000, 500, Bucket(512, 512)) == pytest.approx(512 / 500)


def test_centred_crop_box_has_bucket_aspect():
    left, top, right, bottom = crop_box(1000, 500, Bucket(512, 512))
    assert (left, top, right, bottom) == (250, 0, 750, 500)
    box = crop_box(640, 480, Bucket(640, 384))
    assert box[0] == 0 and box[2] == 640
    assert (box[2] - box[0]) / (box[3] - box[1]) == pytest.approx(640 / 384)
    assert box[1] == pytest.approx(480 / 2 - 384 / 2)


def test_jittered_crop_stays_inside_and_is_reproducible():
    boxes = [crop_box(1000, 500, Bucket(512, 512), jitter=0.1, rng=random.Random(s)) for s in range(50)]
    assert all(0 <= l and r <= 1000 and t == 0 and b == 500 for l, t, r, b in boxes)
    assert len({round(b[0], 3) for b in boxes}) > 10
    assert max(abs(b[0] - 250) for b in boxes) <= 0.1 * 1000 + 1e-9
    assert crop_box(1000, 500, Bucket(512, 512), 0.1, random.Random(3)) == boxes[3]
    # matching aspect: no room to move
    assert crop_box(512, 512, Bucket(512, 512), 0.2, random.Random(0)) == (0, 0, 512, 512)
    with pytest.raises(ValueError, match="rng"):
        crop_box(100, 50, Bucket(64, 64), jitter=0.1)
