"""EveryDreamBatch / EDValidateBatch over real files: scan, loading, sampler, resume, errors."""
import logging
import os
import time
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from image_files import save_image
from ldm.data.ed_validate import EDValidateBatch
from ldm.data.batching import collate_batch
from ldm.data.every_dream import EveryDreamBatch, dry_run_report
from ldm.data.scan import DatasetError, scan_folder
from ldm.util import ConfigError, instantiate_from_config

COUNT = lambda text: len(text.split())  # stand-in token counter


def test_scan_finds_every_usable_image_and_names_each_skip(image_zoo):
    scan = scan_folder(image_zoo)
    paths = {r.path: r for r in scan.images}
    assert len(paths) == 12
    assert {s.path: s.reason.split(" (")[0].split(":")[0] for s in scan.skipped} == {
        "odd/zero bytes.png": "empty file", "odd/cut short.jpg": "truncated JPEG",
        "odd/notes.png": "not an image Pillow can read", "odd/tiny thumb.png": "too small"}
    assert not any(".hidden" in p or ".dotfile" in p for p in paths)
    assert paths["man/a man on a bench_(2).JPG"].caption == "a man on a bench"
    assert paths["man/deep/er/a man in a hat.png"].caption == "a man in a hat"
    assert (paths["man/IMG_0001.webp"].caption, paths["man/IMG_0001.webp"].caption_source) == (
        "a man lying on a wide sofa", "txt")
    photo = paths["man/photo.jpeg"]
    assert (photo.caption, photo.caption_source) == ("a very tall window", "caption")
    assert paths["paintings_laion/café à l’aube, oil painting.jpg"].caption == "café à l’aube, oil painting"
    assert paths["paintings_laion/hatsune_miku, smiling_(3).png"].caption_cut
    assert paths["paintings_laion/hatsune_miku, smiling_(3).png"].multiply == 0.5
    assert paths["3_sks dog/sks dog running.png"].folder_repeats == 3
    assert (paths["odd/a rotated photo.jpg"].width, paths["odd/a rotated photo.jpg"].height) == (80, 160)
    assert scan.orphan_captions == ["man/stray.txt"]
    kept = scan_folder(image_zoo, "strip_suffix_only")
    assert {r.path: r.caption for r in kept.images}["paintings_laion/hatsune_miku, smiling_(3).png"] == \
        "hatsune_miku, smiling"


def test_folder_weights_nest_and_multiply(tmp_path):
    save_image(tmp_path / "2_a" / "3_b" / "x.png", (96, 96))
    save_image(tmp_path / "2_a" / "y.png", (96, 96))
    save_image(tmp_path / "m" / "deeper" / "z.png", (96, 96))
    save_image(tmp_path / "0_plain" / "w.png", (96, 96))
    (tmp_path / "m" / "multiply.txt").write_text("0.5")
    (tmp_path / "m" / "deeper" / "MULTIPLY.TXT").write_text("3")
    weights = {r.path: (r.folder_repeats, r.multiply) for r in scan_folder(tmp_path).images}
    assert weights == {"2_a/3_b/x.png": (6, 1.0), "2_a/y.png": (2, 1.0), "m/deeper/z.png": (1, 1.5),
                       "0_plain/w.png": (1, 1.0)}
    scan = scan_folder(tmp_path)
    assert scan.multipliers == {"m": 0.5, "m/deeper": 3.0} and not scan.ignored


def test_a_caption_file_that_is_not_utf8_is_a_named_skip(tmp_path):
    save_image(tmp_path / "a.png", (96, 96))
    (tmp_path / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    scan = scan_folder(tmp_path)
    assert not scan.images and scan.skipped[0].reason == "caption file a.txt is not UTF-8 text"


def test_symlink_loops_do_not_hang_the_walk(tmp_path):
    save_image(tmp_path / "d" / "sub" / "a cat.png", (96, 96))
    os.symlink(tmp_path / "d", tmp_path / "d" / "sub" / "loop")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "d" / "broken.png")
    scan = scan_folder(tmp_path / "d")
    assert [r.path for r in scan.images] == ["sub/a cat.png"]
    assert [s.path for s in scan.skipped] == ["broken.png"]


def test_an_epoch_through_a_dataloader_keeps_every_image(image_zoo, caplog):
    with caplog.at_level(logging.WARNING):
        ds = EveryDreamBatch(str(image_zoo), batch_size=2, repeats=2, resolution=128, flip_p=0.5,
                             crop_jitter=0.05, background="random", seed=3)
    assert sum("skipped" in r.message and "cut short.jpg" in r.message for r in caplog.records) == 1
    sampler = ds.batch_sampler(world_size=1, rank=0)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=0, collate_fn=collate_batch)
    sampler.set_epoch(1)
    seen, fills = Counter(), 0
    plan = ds.planner.plan(1)
    for batch, planned in zip(loader, plan.batches):
        x = batch["image"]
        assert x.shape[:2] == (2, 3) and (x.shape[3], x.shape[2]) == planned.bucket
        assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
        assert len(batch["caption"]) == 2 and all(isinstance(c, str) for c in batch["caption"])
        seen.update(batch["path"][:2 - planned.fills])
        fills += planned.fills
    counts = ds.planner.counts(1)
    assert seen == Counter({r.path: c for r, c in zip(ds.records, counts) if c})
    assert counts[[r.path for r in ds.records].index("3_sks dog/sks dog running.png")] == 6  # 2 x folder 3
    assert len(loader) == plan.steps and fills == plan.fills


def test_items_are_reproducible_and_dropout_applies(image_zoo):
    ds = EveryDreamBatch(str(image_zoo), batch_size=1, resolution=64, flip_p=0.5, crop_jitter=0.1,
                         conditional_dropout=0.5, min_side=32)
    keys = [(i, 1000 + i) for i in range(len(ds))]
    a, b = [ds[k] for k in keys], [ds[k] for k in keys]
    assert all(torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"] for x, y in zip(a, b))
    assert 0 < sum(x["caption"] == "" for x in a) < len(a)
    assert ds[0]["path"] == ds.records[0].path and ds[0]["image"].shape[0] == 3


def test_mid_epoch_resume_continues_at_the_exact_batch(image_zoo):
    ds = EveryDreamBatch(str(image_zoo), batch_size=2, repeats=3, resolution=128)
    first = ds.batch_sampler(1, 0)
    first.set_epoch(4)
    full = list(first)
    first.set_epoch(4)
    it = iter(first)
    done = [next(it) for _ in range(3)]
    state = first.state_dict(batches_done=3)
    assert state["epoch"] == 4 and state["batches_done"] == 3 and done == full[:3]
    resumed = ds.batch_sampler(1, 0)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # Lightning calls this before iterating
    assert list(resumed) == full[3:]
    resumed.set_epoch(5)
    assert len(list(resumed)) == len(full)  # the next epoch starts from its beginning


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_out_an_epoch(image_zoo, world_size):
    ds = EveryDreamBatch(str(image_zoo), batch_size=2, repeats=2, resolution=128)
    shards = []
    for rank in range(world_size):
        s = ds.batch_sampler(world_size, rank)
        s.set_epoch(2)
        shards.append(list(s))
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(ds.batch_sampler(world_size, 0))
    keys = [k for s in shards for b in s for k in b]
    assert len(keys) == len(set(keys))  # a (record, sample seed) key is never handed to two ranks
    plan = ds.planner.plan(2, world_size)
    assert sum(len(s) for s in shards) == len(plan.batches)


def test_a_file_that_breaks_mid_run_is_replaced_from_its_bucket(tmp_path, caplog):
    for i in range(3):
        save_image(tmp_path / f"a cat_{i}.png", (128, 96))
    ds = EveryDreamBatch(str(tmp_path), batch_size=2, resolution=128)
    victim = ds.records.index(next(r for r in ds.records if r.path == "a cat_1.png"))
    os.remove(tmp_path / "a cat_1.png")
    with caplog.at_level(logging.WARNING):
        item = ds[(victim, 7)]
    assert item["path"] != "a cat_1.png" and item["image"].shape == ds[0]["image"].shape
    assert any("a cat_1.png" in r.message and "another" in r.message for r in caplog.records)
    for i in (0, 2):
        os.remove(tmp_path / f"a cat_{i}.png")
    with pytest.raises(DatasetError, match="no image of bucket"):
        ds[(victim, 8)]


def test_empty_missing_and_all_skipped_roots_say_what_was_found(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        EveryDreamBatch(str(tmp_path / "nope"), batch_size=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("hi")
    with pytest.raises(DatasetError, match=r"empty'.*no image files, 1 other file"):
        EveryDreamBatch(str(tmp_path / "empty"), batch_size=1)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"")
    (bad / "b.png").write_text("nope")
    with pytest.raises(DatasetError, match=r"2 image file\(s\) skipped.*a.jpg: empty file") as e:
        EveryDreamBatch(str(bad), batch_size=1)
    assert isinstance(e.value, ValueError)
    (bad / "multiply.txt").write_text("lots")
    with pytest.raises(DatasetError, match="multiply.txt"):
        EveryDreamBatch(str(bad), batch_size=1)


def test_unknown_or_bad_params_name_the_key(image_zoo):
    node = {"target": "ldm.data.every_dream.EveryDreamBatch", "params": {"repeats": 2, "flip": 0.5}}
    with pytest.raises(ConfigError, match="flip"):
        instantiate_from_config(node, path="data.params.train", data_root=str(image_zoo), batch_size=1)
    for key, value in [("flip_p", 2), ("seed", -1), ("background", "grey"), ("resample", "nearest"),
                       ("caption_from_filename", "all"), ("resolution", 500), ("val_split", 1.0), ("repeats", 0)]:
        with pytest.raises(ValueError, match=key):
            EveryDreamBatch(str(image_zoo), batch_size=1, **{key: value})
    with pytest.raises(DatasetError, match="drop_incomplete"):
        EveryDreamBatch(str(image_zoo), batch_size=64, drop_incomplete=True)


def test_validation_is_held_out_fixed_and_can_use_its_own_folder(image_zoo, tmp_path):
    train = EveryDreamBatch(str(image_zoo), batch_size=2, resolution=128, val_split=0.25, seed=9)
    val = EDValidateBatch(str(image_zoo), batch_size=2, resolution=128, val_split=0.25, seed=9)
    assert len(val) == 3 and len(train) == 12 - 3 - 0
    assert not {r.path for r in val.records} & {r.path for r in train.records}
    assert {r.path for r in val.records} == {r.path for r in train.held_out}
    s = val.batch_sampler(1, 0)
    s.set_epoch(0)
    once = list(s)
    s.set_epoch(7)
    assert list(s) == once
    item = val[once[0][0]]
    assert item["caption"] == val.records[once[0][0][0]].caption  # no caption dropout in validation
    assert len(EDValidateBatch(str(image_zoo), batch_size=2, resolution=128, repeats=0.5).records) == 6
    other = tmp_path / "val"
    save_image(other / "a held out cat.png", (96, 96))
    assert [r.path for r in EDValidateBatch(str(other), batch_size=4, resolution=64).records] == ["a held out cat.png"]
    with pytest.raises(ValueError, match="repeats"):
        EDValidateBatch(str(image_zoo), batch_size=2, repeats=2)


def test_dry_run_report_from_config_params(image_zoo):
    text, plan = dry_run_report({"repeats": 2, "resolution": 128, "val_split": 0.25, "seed": 9}, str(image_zoo),
                                batch_size=2, epochs=3, world_size=2, token_counter=COUNT,
                                validation={"target": "ldm.data.ed_validate.EDValidateBatch",
                                            "params": {"val_split": 0.25, "seed": 9}})
    assert plan["images_found"] == 12 and plan["held_out_images"] == 3 and plan["training_images"] == 9
    assert len(plan["skipped"]) == 4 and plan["validation"] == {
        "images": 3, "data_root": str(image_zoo), "also_in_training": 0}
    assert plan["steps"]["total_steps"] == 3 * plan["steps"]["steps_per_epoch"]
    assert "odd/notes.png: not an image" in text and "Total for 3 epochs" in text
    _, mismatched = dry_run_report({"resolution": 128, "val_split": 0.25}, str(image_zoo), batch_size=2,
                                   token_counter=COUNT, validation={
                                       "target": "ldm.data.ed_validate.EDValidateBatch", "params": {}})
    assert mismatched["validation"]["also_in_training"] > 0
    assert any("also training" in w for w in mismatched["warnings"])
    with pytest.raises(ConfigError, match="data.params.train.*bogus"):
        dry_run_report({"bogus": 1}, str(image_zoo), batch_size=2, token_counter=COUNT)


def test_scanning_is_fast_headers_only(tmp_path):
    jpg = save_image(tmp_path / "src.jpg", (640, 480)).read_bytes()
    png = save_image(tmp_path / "src.png", (96, 128)).read_bytes()
    root = tmp_path / "many"
    for folder in range(20):
        d = root / f"f{folder}"
        d.mkdir(parents=True)
        for i in range(100):
            (d / f"img {i}_{folder}.{'jpg' if i % 2 else 'png'}").write_bytes(jpg if i % 2 else png)
    start = time.perf_counter()
    scan = scan_folder(root)
    elapsed = time.perf_counter() - start
    assert len(scan.images) == 2000 and not scan.skipped
    assert elapsed < 2000 * 0.002, f"scan took {elapsed:.2f} s for 2000 files"  # 10,000 files: ~seconds


def test_lightning_sets_each_epoch_on_the_batch_sampler(image_zoo):
    """Lightning calls set_epoch on loader.sampler and loader.batch_sampler.sampler only; the
    batch sampler must be reachable there or every epoch repeats epoch 0's plan."""
    from lightning_fabric.utilities.data import _set_sampler_epoch

    ds = EveryDreamBatch(str(image_zoo), batch_size=2, repeats=3, resolution=128)
    sampler = ds.batch_sampler(1, 0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_batch)
    epoch0 = list(sampler)
    _set_sampler_epoch(loader, 1)
    assert sampler.epoch == 1
    assert list(sampler) != epoch0
