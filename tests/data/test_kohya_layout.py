"""kohya's DreamBooth-LoRA layout: caption_extension, folder captions, a regularisation folder
with its loss weight, and the kohya numbers of the plan report."""
import json
import math
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from image_files import save_image
from ldm.data.captions import check_fallback, sidecar_extensions, split_sidecar
from ldm.data.ed_validate import EDValidateBatch
from ldm.data.batching import collate_batch
from ldm.data.every_dream import EveryDreamBatch, dry_run_report
from ldm.data.scan import DatasetError, scan_folder

COUNT = lambda text: len(text.split())  # stand-in token counter
WIDE = (200, 64)                         # the 192x64 bucket at resolution 128; (128, 96) goes to 128x128


@pytest.fixture
def kohya(tmp_path):
    """img/ and reg/ as kohya_ss prepares them: 4x10 + 3x2 = 46 training copies, 6 reg images."""
    img, reg = tmp_path / "img", tmp_path / "reg"
    for name in "abc":
        save_image(img / "10_meeb person" / f"{name}.png", (128, 96))
    save_image(img / "10_meeb person" / "d.png", WIDE)
    (img / "10_meeb person" / "a.caption").write_text("meeb person, Smiling,  red hat,", encoding="utf-8")
    (img / "10_meeb person" / "b.txt").write_text("a txt caption", encoding="utf-8")
    for i in range(3):
        save_image(img / "2_style" / f"s{i}.png", (128, 96))
    (img / "2_style" / "s0.caption").write_text("Oil, painting", encoding="utf-8")
    for i in range(6):
        save_image(reg / "1_person" / f"r{i}.png", WIDE if i == 0 else (128, 96))
    return img, reg


def dataset(root, **kw):
    kw = {"batch_size": 2, "resolution": 128, "caption_extension": ".caption", "caption_fallback": "folder", **kw}
    return EveryDreamBatch(str(root), **kw)


def epoch_items(ds, epoch):
    """Every item of one epoch through a DataLoader, planned ones only (fills left out), and the batches."""
    sampler = ds.batch_sampler(1, 0)
    sampler.set_epoch(epoch)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=0, collate_fn=collate_batch)
    items, batches = [], list(loader)
    for batch, planned in zip(batches, ds.planner.plan(epoch).batches):
        keep = len(planned.items) - planned.fills
        items += list(zip(batch["path"][:keep], batch["loss_weight"][:keep].tolist()))
    return items, batches


def test_caption_extension_values_and_errors():
    assert sidecar_extensions(None) == (".txt", ".caption")
    assert sidecar_extensions(".Caption") == (".caption",)
    for bad in ("txt", ".", "", "./x", 3):
        with pytest.raises(ValueError, match="caption_extension"):
            sidecar_extensions(bad)
    assert split_sidecar("a.TXT", (".txt", ".caption")) == ("a", ".txt")
    assert split_sidecar("a.tags.txt", (".tags.txt",)) == ("a", ".tags.txt")
    assert split_sidecar("a.caption", (".txt",)) is None and split_sidecar(".txt", (".txt",)) is None
    with pytest.raises(ValueError, match="caption_fallback.*'tags'"):
        check_fallback("tags")
    with pytest.raises(ValueError, match="caption_extension.*image extension"):
        scan_folder(".", caption_extension=".png")


def test_only_the_chosen_sidecar_extension_is_a_caption(kohya):
    img, _ = kohya
    default = {r.path: (r.caption, r.caption_source) for r in scan_folder(img).images}
    assert default["10_meeb person/b.png"] == ("a txt caption", "txt")
    assert default["10_meeb person/a.png"] == ("meeb person, Smiling,  red hat,", "caption")
    only_caption = scan_folder(img, caption_extension=".caption")
    captions = {r.path: (r.caption, r.caption_source) for r in only_caption.images}
    assert captions["10_meeb person/b.png"] == ("b", "filename")  # b.txt is not read
    assert captions["10_meeb person/a.png"][1] == "caption"
    assert only_caption.ignored == {".txt": 1} and not only_caption.orphan_captions
    only_txt = {r.path: r.caption_source for r in scan_folder(img, caption_extension=".TXT").images}
    assert only_txt["10_meeb person/a.png"] == "filename" and only_txt["10_meeb person/b.png"] == "txt"


def test_folder_fallback_takes_the_nearest_kohya_folder_words(tmp_path):
    save_image(tmp_path / "10_meeb person" / "x_(1).png", (96, 96))
    save_image(tmp_path / "2_a b" / "3_c d" / "y.png", (96, 96))
    save_image(tmp_path / "2_a b" / "plain" / "z.png", (96, 96))
    save_image(tmp_path / "0_off" / "w.png", (96, 96))
    save_image(tmp_path / "root image.png", (96, 96))
    save_image(tmp_path / "2_a b" / "with sidecar.png", (96, 96))
    (tmp_path / "2_a b" / "with sidecar.txt").write_text("its own words")
    got = {r.path: (r.caption, r.caption_source, r.caption_cut, r.folder_repeats)
           for r in scan_folder(tmp_path, caption_fallback="folder").images}
    assert got == {"10_meeb person/x_(1).png": ("meeb person", "folder", False, 10),
                   "2_a b/3_c d/y.png": ("c d", "folder", False, 6),
                   "2_a b/plain/z.png": ("a b", "folder", False, 2),
                   "0_off/w.png": ("", "folder", False, 1),
                   "root image.png": ("", "folder", False, 1),
                   "2_a b/with sidecar.png": ("its own words", "txt", False, 2)}
    assert {r.caption for r in scan_folder(tmp_path).images} >= {"x", "y", "root image"}  # default: file names


def test_bad_keys_are_named(kohya, tmp_path):
    img, reg = kohya
    for key, value in [("caption_extension", "caption"), ("caption_fallback", "class"),
                       ("prior_loss_weight", -0.5), ("prior_loss_weight", math.nan)]:
        with pytest.raises(ValueError, match=key):
            dataset(img, reg_data_root=str(reg), **{key: value})
    with pytest.raises(ValueError, match="caption_extension"):
        EDValidateBatch(str(img), batch_size=1, caption_extension="txt")
    with pytest.raises(DatasetError, match=r"reg_data_root '.*nope' does not exist"):
        dataset(img, reg_data_root=str(tmp_path / "nope"))
    empty = tmp_path / "empty_reg" / "1_person"
    empty.mkdir(parents=True)
    (empty / "notes.md").write_text("no images")
    with pytest.raises(DatasetError, match=r"reg_data_root '.*empty_reg': no usable images.*1 other file"):
        dataset(img, reg_data_root=str(tmp_path / "empty_reg"))
    (empty / "broken.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"reg_data_root .*broken.png: empty file"):
        dataset(img, reg_data_root=str(tmp_path / "empty_reg"))
    with pytest.raises(DatasetError, match="reg_data_root .* overlap"):
        dataset(img, reg_data_root=str(img / "2_style"))
    few = tmp_path / "few"
    save_image(few / "x.png", (96, 96))
    (few / "multiply.txt").write_text("0.1")
    with pytest.raises(DatasetError, match="reg_data_root .*no regularisation copy"):
        dataset(img, reg_data_root=str(few))


def test_an_epoch_with_reg_is_twice_the_training_samples_with_the_right_loss_weights(kohya):
    img, reg = kohya
    plain = dataset(img)
    ds = dataset(img, reg_data_root=str(reg), prior_loss_weight=0.25)
    for epoch in (0, 3):
        items, batches = epoch_items(ds, epoch)
        weights = Counter(w for _, w in items)
        assert weights == {1.0: 46, 0.25: 46}
        assert all(w == 0.25 for p, w in items if p.startswith("1_person/"))
        assert all(w == 1.0 for p, w in items if not p.startswith("1_person/"))
        assert Counter(p for p, w in items if w == 1.0) == Counter(p for p, _ in epoch_items(plain, epoch)[0])
        reg_copies = Counter(p for p, w in items if w == 0.25)
        assert len(reg_copies) == 6 and max(reg_copies.values()) - min(reg_copies.values()) <= 1  # cycled
        for b in batches:
            assert b["loss_weight"].dtype == torch.float32 and b["loss_weight"].shape == (len(b["path"]),)
        assert any(len(set(b["loss_weight"].tolist())) == 2 for b in batches)  # reg shares batches, not paired
    assert len(ds) == 13 and len(ds.records) == ds.planner.n_train + 6
    assert abs(len(ds.batch_sampler(1, 0)) - 2 * len(plain.batch_sampler(1, 0))) <= 2
    assert all((b["loss_weight"] == 1).all() for b in epoch_items(plain, 0)[1])
    reg_index = ds.planner.n_train
    assert ds[(reg_index, 1)]["loss_weight"] == 0.25 and ds[(reg_index, 1)]["caption"] in ("person", "")


def test_reg_copies_are_cut_per_epoch_when_there_are_more_than_training_copies(tmp_path):
    save_image(tmp_path / "img" / "1_meeb" / "a.png", (96, 96))
    save_image(tmp_path / "img" / "1_meeb" / "b.png", (96, 96))
    for i in range(10):
        save_image(tmp_path / "reg" / "2_person" / f"r{i}.png", (96, 96))  # 20 reg copies for 2 training
    ds = dataset(tmp_path / "img", reg_data_root=str(tmp_path / "reg"), batch_size=1)
    chosen = []
    for epoch in range(5):
        counts = ds.planner.counts(epoch)
        assert sum(counts[:2]) == 2 and sum(counts[2:]) == 2
        chosen.append(frozenset(i for i in range(2, 12) if counts[i]))
    assert len(set(chosen)) > 1  # another cut each epoch, so no reg image is never used
    text, d = ds.plan_report(1, 1, token_counter=COUNT)
    assert d["regularisation"]["samples_before_matching"] == 20 and "cut" in d["regularisation"]["summary"]


def test_reg_plans_are_reproducible_rank_consistent_and_resume(kohya):
    img, reg = kohya
    a, b = (dataset(img, reg_data_root=str(reg), seed=4) for _ in range(2))
    assert a.planner.plan(2, 2).batches == b.planner.plan(2, 2).batches
    assert a.planner.counts(2)[7:] != dataset(img, reg_data_root=str(reg), seed=5).planner.counts(2)[7:]
    steps = {a.planner.plan(e, 2).steps for e in range(6)}
    assert steps == {len(a.batch_sampler(2, 0))}  # the same number of batches every epoch
    shards = []
    for rank in range(2):
        s = a.batch_sampler(2, rank)
        s.set_epoch(1)
        shards.append(list(s))
    keys = [k for shard in shards for batch in shard for k in batch]
    assert len(keys) == len(set(keys)) and len(shards[0]) == len(shards[1])
    first = a.batch_sampler(1, 0)
    first.set_epoch(5)
    full = list(first)
    resumed = b.batch_sampler(1, 0)
    resumed.load_state_dict({"epoch": 5, "batches_done": 7, "world_size": 1})
    resumed.set_epoch(5)
    assert list(resumed) == full[7:]


def test_regularisation_images_are_never_held_out(kohya):
    img, reg = kohya
    ds = dataset(img, reg_data_root=str(reg), val_split=0.5, seed=2)
    val = EDValidateBatch(str(img), batch_size=2, resolution=128, val_split=0.5, seed=2,
                          caption_extension=".caption", caption_fallback="folder")
    assert len(ds.held_out) == 4 and ds.planner.n_train == 3
    assert sorted(r.path for r in ds.records[ds.planner.n_train:]) == [f"1_person/r{i}.png" for i in range(6)]
    assert {r.path for r in val.records} == {r.path for r in ds.held_out}
    assert {r.caption for r in val.records} <= {"meeb person", "meeb person, Smiling,  red hat,", "style",
                                                 "Oil, painting"}
    batch = collate_batch([val[k] for k in next(iter(val.batch_sampler(1, 0)))])
    assert batch["loss_weight"].tolist() == [1.0] * len(batch["path"])


def test_plan_report_states_the_doubling_and_the_kohya_numbers(kohya):
    img, reg = kohya
    ds = dataset(img, reg_data_root=str(reg), prior_loss_weight=0.5)
    text, d = ds.plan_report(1, 2, token_counter=COUNT)
    json.dumps(d)
    assert ("46 training samples + 46 regularisation samples per epoch = 92 samples: steps per epoch are "
            "doubled by the regularisation images") in text
    assert "cycled" in d["regularisation"]["summary"] and d["regularisation"]["summary"] in text
    assert d["epoch"]["training_samples"] == 46 and d["epoch"]["regularisation_samples"] == 46
    assert d["epoch"]["samples"] == 92 and d["training_images"] == 7
    assert d["steps"]["formula_total_steps"] == pytest.approx(46 * 2 * 2 / 2)
    assert "x 2 regularisation" in text and "loss weight (prior_loss_weight) 0.5" in text
    assert sum(b["reg_images"] for b in d["buckets"]) == 6
    assert d["kohya"] == {
        "dataset_dirs": {"10_meeb person": {"n_repeats": 10, "img_count": 4},
                         "2_style": {"n_repeats": 2, "img_count": 3}},
        "reg_dataset_dirs": {"1_person": {"n_repeats": 1, "img_count": 6}},
        "tag_frequency": {"10_meeb person": {"meeb person": 4, "smiling": 1, "red hat": 1},
                          "2_style": {"style": 2, "oil": 1, "painting": 1}},
        "num_train_images": 46, "num_reg_images": 6,
        "fields": {"ss_flip_aug": "False", "ss_shuffle_caption": "False", "ss_keep_tokens": "0",
                   "ss_caption_dropout_rate": "0.04", "ss_caption_tag_dropout_rate": "0.0",
                   "ss_random_crop": "False", "ss_color_aug": "False"}}
    assert d["settings"]["reg_data_root"] == str(reg) and d["settings"]["caption_fallback"] == "folder"
    plain_text, plain = dataset(img).plan_report(1, 2, token_counter=COUNT)
    assert plain["regularisation"] is None and "doubled" not in plain_text
    assert plain["kohya"]["reg_dataset_dirs"] == {} and plain["kohya"]["num_reg_images"] == 0
    assert plain["steps"]["formula_reg_factor"] == 1 and d["steps"]["formula_reg_factor"] == 2


def test_dry_run_report_passes_the_new_keys(kohya):
    img, reg = kohya
    params = {"resolution": 128, "caption_extension": ".caption", "caption_fallback": "folder",
              "reg_data_root": str(reg), "prior_loss_weight": 0.3}
    text, d = dry_run_report(params, str(img), batch_size=2, epochs=1, token_counter=COUNT,
                             validation={"target": "ldm.data.ed_validate.EDValidateBatch",
                                         "params": {"resolution": 128, "caption_fallback": "folder"}})
    assert d["regularisation"]["prior_loss_weight"] == 0.3 and "doubled" in text
    assert d["captions"]["sources"] == {"caption": 2, "folder": 5}
