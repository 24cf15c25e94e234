"""Caption options and per-folder settings files through the dataset: each changes what it
should (captions, flips, loss weights) and nothing else, the same for the same sample seed."""
import json

import pytest
import torch
from torch.utils.data import DataLoader

from image_files import save_image
from ldm.data.ed_validate import EDValidateBatch
from ldm.data.batching import collate_batch
from ldm.data.every_dream import EveryDreamBatch
from ldm.data.folder_settings import FolderSettings, parse_setting
from ldm.data.scan import DatasetError, scan_folder

COUNT = lambda text: len(text.split())
TAGS = ["sks dog", "sitting", "red collar", "grass", "sunny"]


@pytest.fixture
def tagged(tmp_path):
    """a/ (2 images) and a/sub/ (1) with settings files; b/ (2) without; tag captions everywhere."""
    root = tmp_path / "data"
    for rel in ("a/one.png", "a/two.png", "a/sub/three.png", "b/four.png", "b/five.png"):
        save_image(root / rel, (96, 64))
        (root / rel).with_suffix(".txt").write_text(", ".join(TAGS), encoding="utf-8")
    (root / "a" / "flip_p.txt").write_text("1")
    (root / "a" / "loss_scale.txt").write_text("2\n")
    (root / "a" / "shuffle_tags.txt").write_text("")
    (root / "a" / "sub" / "flip_p.txt").write_text("0")
    (root / "a" / "sub" / "loss_scale.txt").write_text("0.25")
    (root / "a" / "sub" / "shuffle_tags.txt").write_text("false")
    (root / "b" / "local.yaml").write_text("flip_p: 0.5\n")
    return root


def dataset(root, **kw):
    return EveryDreamBatch(str(root), **{"batch_size": 1, "resolution": 64, "min_side": 32,
                                         "conditional_dropout": 0.0, **kw})


def items(ds, seed=11):
    return {ds.records[i].path: ds[(i, seed + i)] for i in range(len(ds))}


def test_settings_files_nest_and_are_not_captions(tagged):
    scan = scan_folder(tagged)
    got = {r.path: r.settings for r in scan.images}
    assert got["a/one.png"] == FolderSettings(flip_p=1.0, shuffle_tags=True, loss_scale=2.0)
    assert got["a/sub/three.png"] == FolderSettings(flip_p=0.0, shuffle_tags=False, loss_scale=0.5)
    assert got["b/four.png"] == FolderSettings()
    assert scan.settings == {"a": {"flip_p": 1.0, "loss_scale": 2.0, "shuffle_tags": True},
                             "a/sub": {"flip_p": 0.0, "loss_scale": 0.25, "shuffle_tags": False}}
    assert scan.unread == ["b/local.yaml"] and not scan.orphan_captions and not scan.ignored
    assert all(r.caption == ", ".join(TAGS) for r in scan.images)


def test_folder_flip_and_loss_scale_change_only_their_images(tagged):
    ds = items(dataset(tagged, flip_p=0.0))
    shuffled = dataset(tagged)
    assert len({shuffled[(0, s)]["caption"] for s in range(30)}) > 5  # a/one.png: shuffle_tags.txt
    for f in ("flip_p.txt", "loss_scale.txt", "shuffle_tags.txt"):  # the same folder without the files
        (tagged / "a" / f).unlink()
        (tagged / "a" / "sub" / f).unlink()
    bare = items(dataset(tagged, flip_p=0.0))
    for path, item in ds.items():
        in_a = path in ("a/one.png", "a/two.png")
        assert item["path"] == bare[path]["path"] == path
        assert torch.equal(item["image"], bare[path]["image"].flip(-1) if in_a else bare[path]["image"])
        assert item["loss_weight"] == {"a/one.png": 2.0, "a/two.png": 2.0, "a/sub/three.png": 0.5}.get(path, 1.0)
        assert bare[path]["loss_weight"] == 1.0 and bare[path]["caption"] == ", ".join(TAGS)
        assert sorted(item["caption"].split(", ")) == sorted(TAGS)
        if not in_a:
            assert item["caption"] == ", ".join(TAGS)  # no shuffle outside a/ (and off again in a/sub)


def test_caption_options_change_the_caption_and_nothing_else(tagged):
    base = dataset(tagged)
    ds = dataset(tagged, shuffle_tags=True, keep_tokens=1, tag_dropout=0.2)
    keys = [(i, 500 + i) for i in range(len(ds))] * 6
    changed = 0
    for key in keys:
        a, b = ds[key], base[key]
        assert torch.equal(a["image"], b["image"]) and a["path"] == b["path"]
        assert a["loss_weight"] == b["loss_weight"]
        tags = a["caption"].split(", ")
        assert tags[0] == "sks dog" and set(tags) <= set(TAGS) and len(set(tags)) == len(tags)
        assert ds[key]["caption"] == a["caption"]  # the same sample seed gives the same caption
        changed += a["caption"] != b["caption"]
    assert changed > len(keys) // 2
    assert len({ds[(0, s)]["caption"] for s in range(40)}) > 10  # another seed, another draw


def test_global_flip_and_crop_jitter_change_the_image_only(tmp_path):
    root = tmp_path / "wide"
    for name in ("x", "y"):
        save_image(root / f"{name}.png", (160, 64))
        (root / f"{name}.txt").write_text("sks dog, grass")
    base = dataset(root, flip_p=0.0)
    flipped, jittered = dataset(root, flip_p=1.0), dataset(root, flip_p=0.0, crop_jitter=0.2)
    moved = 0
    for key in [(i, 40 + s) for i in range(2) for s in range(10)]:
        b, f, j = base[key], flipped[key], jittered[key]
        assert torch.equal(f["image"], b["image"].flip(-1))
        moved += not torch.equal(j["image"], b["image"])
        for other in (f, j):
            assert (other["caption"], other["path"], other["loss_weight"]) == (b["caption"], b["path"], 1.0)
    assert moved > 10


def test_whole_caption_dropout_empties_captions_only(tagged):
    base, ds = dataset(tagged, conditional_dropout=0.0), dataset(tagged, conditional_dropout=1.0)
    for key in [(i, 3 + i) for i in range(len(ds))]:
        assert ds[key]["caption"] == "" and base[key]["caption"] != ""
        assert torch.equal(ds[key]["image"], base[key]["image"])
    (tagged / "b" / "cond_dropout.txt").write_text("1")
    per_folder = items(dataset(tagged, conditional_dropout=0.0))
    assert {p for p, it in per_folder.items() if it["caption"] == ""} == {"b/four.png", "b/five.png"}


def test_an_epoch_through_a_loader_is_the_same_twice(tagged):
    ds = dataset(tagged, batch_size=2, repeats=3, shuffle_tags=True, tag_dropout=0.3)

    def epoch():
        sampler = ds.batch_sampler(1, 0)
        sampler.set_epoch(2)
        return [c for b in DataLoader(ds, batch_sampler=sampler, collate_fn=collate_batch) for c in b["caption"]]

    first = epoch()
    assert first == epoch() and len(set(first)) > 3


def test_regularisation_loss_scale_multiplies_prior_loss_weight(tagged, tmp_path):
    reg = tmp_path / "reg"
    save_image(reg / "1_dog" / "r.png", (96, 64))
    (reg / "1_dog" / "loss_scale.txt").write_text("3")
    ds = dataset(tagged, reg_data_root=str(reg), prior_loss_weight=0.5)
    weights = {ds.records[i].path: ds[(i, 1)]["loss_weight"] for i in range(len(ds))}
    assert weights["1_dog/r.png"] == 1.5 and weights["a/one.png"] == 2.0


def test_validation_applies_no_settings_but_removes_the_separator(tagged):
    (tagged / "b" / "four.txt").write_text("sks dog ||| grass, sunny", encoding="utf-8")
    val = EDValidateBatch(str(tagged), batch_size=1, resolution=64, min_side=32, keep_tokens_separator="|||")
    got = {val.records[i].path: val[i] for i in range(len(val))}
    assert got["b/four.png"]["caption"] == "sks dog, grass, sunny"
    assert all(it["loss_weight"] == 1.0 for it in got.values())
    assert got["a/one.png"]["caption"] == ", ".join(TAGS)
    train = items(dataset(tagged, flip_p=0.0, keep_tokens_separator="|||"))
    assert train["b/four.png"]["caption"] == "sks dog, grass, sunny"
    assert torch.equal(got["a/one.png"]["image"], train["a/one.png"]["image"].flip(-1))  # validation never flips


def test_plan_report_lists_settings_and_the_kohya_fields(tagged):
    ds = dataset(tagged, shuffle_tags=False, keep_tokens=1, tag_dropout=0.1, conditional_dropout=0.05)
    text, d = ds.plan_report(1, 1, token_counter=COUNT)
    json.dumps(d)
    assert d["kohya"]["fields"] == {"ss_flip_aug": "True", "ss_shuffle_caption": "True", "ss_keep_tokens": "1",
                                    "ss_caption_dropout_rate": "0.05", "ss_caption_tag_dropout_rate": "0.1",
                                    "ss_random_crop": "False", "ss_color_aug": "False"}
    assert {f["folder"]: f["images"] for f in d["folder_settings"]} == {"a": 2, "a/sub": 1}
    assert "Folder settings a (2 images): flip_p 1, loss_scale 2, shuffle_tags True" in text
    assert "b/local.yaml" in text and "not read" in text
    assert any("as_trained" in s for s in d["captions"]["samples"])
    for f in ("flip_p.txt", "shuffle_tags.txt"):
        (tagged / "a" / f).unlink()
    _, plain = dataset(tagged).plan_report(1, 1, token_counter=COUNT)
    fields = plain["kohya"]["fields"]
    assert fields["ss_flip_aug"] == "False" and fields["ss_shuffle_caption"] == "False"
    assert "as_trained" not in json.dumps(plain["captions"])


@pytest.mark.parametrize("name,text,message", [
    ("flip_p.txt", "1.5", "probability"),
    ("loss_scale.txt", "-1", "loss scale"),
    ("keep_tokens.txt", "two", "whole number"),
    ("shuffle_tags.txt", "maybe", "true or false"),
    ("tag_dropout.txt", "x", "one number"),
])
def test_a_bad_settings_file_stops_the_scan_naming_it(tagged, name, text, message):
    (tagged / "b" / name).write_text(text)
    with pytest.raises(DatasetError, match=f"b.{name}.*{message}"):
        dataset(tagged)


def test_parse_setting_values():
    assert parse_setting("keep_tokens", " 3\n", "f") == 3
    assert parse_setting("shuffle_tags", "\n", "f") is True and parse_setting("shuffle_tags", "No", "f") is False
    assert parse_setting("loss_scale", "0", "f") == 0.0 and parse_setting("cond_dropout", "0.1", "f") == 0.1
