"""The epoch plan and its report, from plain records (no files)."""
import json
from collections import Counter

import pytest

from ldm.data.buckets import make_buckets
from ldm.data.plan import EpochPlanner, apportion, split_validation, take_fraction
from ldm.data.report import build_report, kohya_metadata, render_report
from ldm.data.scan import ImageRecord, ScanResult, SkippedFile

BUCKETS = make_buckets(512)


def rec(path, w=640, h=480, folder_repeats=1, multiply=1.0, caption=None, cut=False):
    return ImageRecord(path=path, width=w, height=h, caption=caption or path.rsplit("/", 1)[-1],
                       caption_source="filename", caption_cut=cut, folder_repeats=folder_repeats, multiply=multiply)


def mixed_records():
    """37 images over three buckets and three folders, one with folder repeats, one with multiply 0.5."""
    return ([rec(f"man/{i}.jpg", 640, 480) for i in range(13)]
            + [rec(f"2_dog/{i}.jpg", 480, 640, folder_repeats=2) for i in range(7)]
            + [rec(f"laion/{i}.jpg", 1000, 1000, multiply=0.5) for i in range(11)]
            + [rec(f"laion/wide/{i}.jpg", 2000, 500, multiply=0.5) for i in range(6)])


def placed(batches):
    """Copies per record, fills excluded."""
    return Counter(i for b in batches for i in b.items[:len(b.items) - b.fills])


def test_copies_follow_repeats_folder_repeats_and_multiply():
    p = EpochPlanner(mixed_records(), BUCKETS, batch_size=4, repeats=2)
    counts = p.counts(0)
    paths = [r.path for r in p.records]
    by = lambda prefix: [c for c, path in zip(counts, paths) if path.startswith(prefix)]
    assert by("man/") == [2] * 13                       # repeats 2
    assert by("2_dog/") == [4] * 7                      # x folder repeats 2
    assert by("laion/") == [1] * 17                     # x multiply 0.5


def test_fractional_weights_draw_a_fixed_share_afresh_each_epoch():
    records = [rec(f"a/{i}.jpg", multiply=0.5) for i in range(10)] + [rec(f"b/{i}.jpg") for i in range(3)]
    p = EpochPlanner(records, BUCKETS, batch_size=2, repeats=1.5)
    chosen = []
    for epoch in range(6):
        counts = p.counts(epoch)
        assert counts[:10].count(1) == 8 and counts[:10].count(0) == 2  # 0.75 x 10 -> 8 images once
        assert sum(counts[10:]) == 5                                   # 1.5 x 3 -> 4.5 -> 5
        assert counts == p.counts(epoch)                               # reproducible
        chosen.append(tuple(counts))
    assert len(set(chosen)) > 1                                        # redrawn per epoch
    assert p.samples_per_epoch() == sum(p.counts(3))


def test_fill_keeps_every_copy_and_counts_fills():
    p = EpochPlanner(mixed_records(), BUCKETS, batch_size=4, repeats=3)
    for epoch in range(3):
        plan = p.plan(epoch)
        assert placed(plan.batches) == Counter({i: c for i, c in enumerate(p.counts(epoch)) if c})
        assert all(len(b.items) == 4 for b in plan.batches)
        assert all({p.bucket_of[i] for i in b.items} == {b.bucket} for b in plan.batches)
        assert plan.fills == sum(b.fills for b in plan.batches) > 0
        assert plan.dropped == 0 and plan.samples == sum(p.counts(epoch))
        # fills come from the same bucket and avoid repeating an image inside the batch when possible
        for b in plan.batches:
            if b.fills and len(p.members[b.bucket]) >= 4:
                assert len(set(b.items)) == 4


def test_drop_incomplete_drops_only_partial_batches():
    p = EpochPlanner(mixed_records(), BUCKETS, batch_size=4, repeats=1, incomplete="drop")
    for epoch in range(3):
        plan = p.plan(epoch)
        counts = p.counts(epoch)
        per_bucket = {b: sum(counts[i] for i in p.members[b]) for b in p.buckets}
        assert plan.fills == 0 and all(len(b.items) == 4 for b in plan.batches)
        assert plan.dropped == sum(n % 4 for n in per_bucket.values()) > 0
        assert sum(placed(plan.batches).values()) + plan.dropped == plan.samples
    # what is dropped changes with the epoch, so no image is lost for the whole run
    missing = [{i for i, c in enumerate(p.counts(e)) if c} - set(placed(p.plan(e).batches)) for e in range(6)]
    assert all(missing) and len({frozenset(m) for m in missing}) > 1


def test_keep_leaves_short_batches():
    records = [rec(f"a/{i}.jpg") for i in range(5)]
    plan = EpochPlanner(records, BUCKETS, batch_size=4, incomplete="keep").plan(0)
    assert sorted(len(b.items) for b in plan.batches) == [1, 4] and plan.fills == 0


def test_order_is_a_function_of_seed_and_epoch():
    a = EpochPlanner(mixed_records(), BUCKETS, batch_size=4, repeats=2, seed=1)
    b = EpochPlanner(mixed_records(), BUCKETS, batch_size=4, repeats=2, seed=1)
    c = EpochPlanner(mixed_records(), BUCKETS, batch_size=4, repeats=2, seed=2)
    assert a.plan(5).batches == b.plan(5).batches
    assert a.plan(5).batches != a.plan(6).batches
    assert a.plan(5).batches != c.plan(5).batches
    # the batch order mixes buckets rather than running one bucket after another
    buckets = [x.bucket for x in a.plan(0).batches]
    assert sum(x != y for x, y in zip(buckets, buckets[1:])) > len(buckets) // 3


def test_repeats_of_one_image_rarely_share_a_batch():
    records = [rec(f"a/{i}.jpg") for i in range(40)]
    plan = EpochPlanner(records, BUCKETS, batch_size=8, repeats=5).plan(0)
    assert sum(len(b.items) - len(set(b.items)) for b in plan.batches) <= 4  # only at round boundaries


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("incomplete", ["fill", "drop"])
def test_ranks_get_disjoint_whole_batches_and_equal_steps(world_size, incomplete):
    p = EpochPlanner(mixed_records(), BUCKETS, batch_size=3, repeats=1, incomplete=incomplete)
    for epoch in range(4):
        plan = p.plan(epoch, world_size)
        shards = [plan.for_rank(r) for r in range(world_size)]
        assert len({len(s) for s in shards}) == 1 and len(shards[0]) == plan.steps > 0
        assert sum(len(s) for s in shards) == len(plan.batches)  # every batch on exactly one rank
        everywhere = placed([b for s in shards for b in s])
        assert max(everywhere.values()) <= max(p.counts(epoch))   # no image twice beyond its copies
        if incomplete == "fill":
            assert everywhere == Counter({i: c for i, c in enumerate(p.counts(epoch)) if c})
        else:
            assert sum(everywhere.values()) + plan.dropped == plan.samples and plan.pad_batches == 0
    with pytest.raises(ValueError, match="rank 3"):
        p.plan(0, 3).for_rank(3)


def test_rank_padding_adds_whole_fill_batches():
    records = [rec(f"a/{i}.jpg") for i in range(8)]  # 2 batches of 4
    plan = EpochPlanner(records, BUCKETS, batch_size=4).plan(0, world_size=3)
    assert len(plan.batches) == 3 and plan.pad_batches == 1 and plan.fills == 4
    assert placed(plan.batches) == Counter({i: 1 for i in range(8)})


def test_validation_split_is_seeded_stable_and_disjoint():
    records = [rec(f"x/{i:03d}.jpg") for i in range(200)]
    train, held = split_validation(records, 0.1, seed=7)
    assert len(held) == 20 and len(train) == 180
    assert not {r.path for r in train} & {r.path for r in held}
    assert split_validation(records, 0.1, seed=7) == (train, held)
    assert {r.path for r in split_validation(records, 0.1, seed=8)[1]} != {r.path for r in held}
    # adding images moves at most a few held-out ones back to training
    more = records + [rec(f"x/new{i}.jpg") for i in range(10)]
    held2 = {r.path for r in split_validation(more, 0.1, seed=7)[1]}
    assert len({r.path for r in held} - held2) <= 2
    assert split_validation(records[:3], 0.01, 7)[1] and split_validation(records[:1], 0.5, 7)[1] == []
    assert split_validation(records, 0.0, 7) == (records, [])
    with pytest.raises(ValueError, match="val_split"):
        split_validation(records, 1.0, 7)


def test_take_fraction():
    records = [rec(f"x/{i}.jpg") for i in range(50)]
    part = take_fraction(records, 0.4, seed=1)
    assert len(part) == 20 and part == take_fraction(records, 0.4, seed=1)
    assert len(take_fraction(records, 0.001, seed=1)) == 1 and take_fraction(records, 1.0, 1) == records
    with pytest.raises(ValueError, match="repeats"):
        take_fraction(records, 1.5, 1)


def test_planner_validates_its_settings():
    with pytest.raises(ValueError, match="batch_size"):
        EpochPlanner([], BUCKETS, batch_size=0)
    with pytest.raises(ValueError, match="repeats"):
        EpochPlanner([], BUCKETS, batch_size=1, repeats=0)
    with pytest.raises(ValueError, match="world_size"):
        EpochPlanner([rec("a.jpg")], BUCKETS, batch_size=1).plan(0, 0)


def test_report_numbers_and_text():
    records = mixed_records()
    records[0] = rec("man/long.jpg", caption="word " * 90)
    records[1] = rec("man/big_john.jpg", caption="big", cut=True)
    records.append(rec("man/small.jpg", 200, 150))  # upscaled into 576x448
    scan = ScanResult("/data", images=records, skipped=[SkippedFile("man/bad.jpg", "empty file (0 bytes)")])
    p = EpochPlanner(records, BUCKETS, batch_size=4, repeats=2)
    d = build_report(scan, p, world_size=2, epochs=3, accumulate_grad_batches=2,
                     token_counter=lambda text: len(text.split()))
    json.dumps(d)  # JSON-ready
    plan = p.plan(0, 2)
    assert d["images_found"] == 38 and d["training_images"] == 38
    assert {f["folder"]: (f["images"], f["skipped"]) for f in d["folders"]} == {
        "man": (14, 1), "2_dog": (7, 0), "laion": (17, 0)}
    assert d["epoch"]["samples"] == 14 * 2 + 7 * 4 + 17 == plan.samples
    assert sum(b["samples"] for b in d["buckets"]) == plan.samples
    assert sum(b["fills"] for b in d["buckets"]) == plan.fills == d["epoch"]["fills"]
    assert sum(b["batches"] for b in d["buckets"]) == len(plan.batches)
    s = d["steps"]
    assert s["batches_per_rank"] == plan.steps and s["steps_per_epoch"] == -(-plan.steps // 2)
    assert s["total_steps"] == 3 * s["steps_per_epoch"]
    assert s["formula_total_steps"] == pytest.approx(plan.samples * 3 / (4 * 2 * 2), abs=0.01)
    assert d["upscaled"]["count"] == 1 and d["upscaled"]["examples"][0]["path"] == "man/small.jpg"
    assert d["captions"]["long"]["count"] == 1 and d["captions"]["long"]["examples"][0]["tokens"] == 90
    assert d["captions"]["cut_at_underscore"]["count"] == 1
    assert {w["folder"]: w["folder_repeats"] for w in d["folder_weights"]} == {"2_dog": 2, "laion": 1, "laion/wide": 1}
    text = render_report(d)
    for needle in ["man/bad.jpg: empty file (0 bytes)", "576x448", f"exact {s['total_steps']} steps",
                   "formula 38 images x", "strip_suffix_only", "exceed 75 tokens", "man/long.jpg (90 tokens)",
                   "Upscaled to fit their bucket: 1"]:
        assert needle in text, needle


def test_apportion_is_proportional_whole_and_exact():
    assert apportion(10, [1, 1, 2]) == [3, 2, 5]  # 2.5, 2.5, 5: the tie goes to the first
    assert apportion(7, [0, 3, 0]) == [0, 7, 0]
    assert apportion(5, [0, 0]) == [0, 0]
    assert sum(apportion(101, [7, 13, 29, 1])) == 101


def test_reg_copies_match_the_training_count_with_fixed_bucket_totals():
    train = mixed_records()
    reg = ([rec(f"1_person/{i}.jpg", 640, 480) for i in range(9)]
           + [rec(f"1_person/t{i}.jpg", 480, 640) for i in range(4)])
    plain = EpochPlanner(train, BUCKETS, batch_size=4, repeats=2)
    p = EpochPlanner(train, BUCKETS, batch_size=4, repeats=2, reg_records=reg)
    per_bucket = set()
    for epoch in range(4):
        counts = p.counts(epoch)
        assert counts[:p.n_train] == plain.counts(epoch)             # training copies are unchanged
        assert sum(counts[p.n_train:]) == sum(counts[:p.n_train])    # as many reg copies as training copies
        assert p.own_counts(epoch)[p.n_train:] == [2] * 13           # repeats apply to reg images too
        per_bucket.add(tuple(sum(counts[i] for i in p.members[b] if p.is_reg(i)) for b in p.buckets))
        plan = p.plan(epoch)
        assert placed(plan.batches) == Counter({i: c for i, c in enumerate(counts) if c})
        assert any({p.is_reg(i) for i in b.items} == {True, False} for b in plan.batches)
    assert len(per_bucket) == 1                                       # the same batches per bucket every epoch
    assert p.plan(1).steps == p.plan(2).steps and p.plan(1).batches != p.plan(2).batches


def test_kohya_metadata_counts_folders_and_tags():
    train = [rec("10_sks dog/a.jpg", caption="sks dog, Grass, ,  grass "), rec("10_sks dog/b.jpg", caption=" , "),
             rec("10_sks dog/deeper/c.jpg", caption="SKS dog"), rec("loose.jpg", caption="a photo")]
    reg = [rec("1_dog/r.jpg"), rec("1_dog/s.jpg")]
    meta = kohya_metadata(train, [10, 10, 10, 1], reg, [1, 0])
    assert meta == {"dataset_dirs": {"(data_root)": {"n_repeats": 1, "img_count": 1},
                                     "10_sks dog": {"n_repeats": 10, "img_count": 3}},
                    "reg_dataset_dirs": {"1_dog": {"n_repeats": 1, "img_count": 2}},
                    "tag_frequency": {"(data_root)": {"a photo": 1}, "10_sks dog": {"sks dog": 2, "grass": 2}},
                    "num_train_images": 31, "num_reg_images": 1}
    assert kohya_metadata(train[:1], [25], [], [])["dataset_dirs"]["10_sks dog"]["n_repeats"] == 25
