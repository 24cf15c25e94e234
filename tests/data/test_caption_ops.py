"""Caption processing (pure): kohya's order, kept tags, separator, shuffle, tag dropout, seeds."""
import random
from collections import Counter

import pytest

from ldm.data.caption_ops import CaptionOptions, process_tags, split_tags, training_caption

CAPTION = "meeb person, smiling, red hat, outdoors, sunny"
TAGS = ["meeb person", "smiling", "red hat", "outdoors", "sunny"]


def run(caption, seed=0, **options):
    return process_tags(caption, CaptionOptions(**options), random.Random(seed))


def test_without_options_the_caption_is_untouched():
    odd = "  a cat,sitting ,, on a mat,  "
    assert process_tags(odd, CaptionOptions(), None) == odd
    assert process_tags(odd, CaptionOptions(keep_tokens=2), None) == odd  # keep_tokens alone draws nothing
    assert training_caption(odd, False, CaptionOptions(), None) == odd


def test_whole_caption_dropout_comes_first():
    assert training_caption(CAPTION, True, CaptionOptions(shuffle_tags=True, keep_tokens=1), random.Random(0)) == ""


def test_split_tags_strips_and_drops_empty_tags():
    assert split_tags(" a ,b,, c ,") == ([], ["a", "b", "c"], [])
    assert split_tags(CAPTION, keep_tokens=2) == (TAGS[:2], TAGS[2:], [])
    assert split_tags("no commas at all", keep_tokens=3) == (["no commas at all"], [], [])
    assert split_tags("a, b ||| c, d ||| e, f", separator="|||") == (["a", "b"], ["c", "d"], ["e", "f"])
    assert split_tags("a, b ||| c ||| d ||| e", separator="|||") == (["a", "b"], ["c"], ["d", "e"])
    assert split_tags("a, b, c", keep_tokens=1, separator="|||") == (["a"], ["b", "c"], [])  # no separator: keep_tokens


def test_shuffle_keeps_the_first_tags_and_every_tag():
    seen = Counter()
    for seed in range(200):
        out = run(CAPTION, seed, shuffle_tags=True, keep_tokens=1).split(", ")
        assert out[0] == "meeb person" and sorted(out) == sorted(TAGS)
        seen[tuple(out)] += 1
    assert len(seen) == 24  # all 4! orders of the free tags occur
    assert run(CAPTION, 7, shuffle_tags=True) == run(CAPTION, 7, shuffle_tags=True)  # a function of the seed
    assert len({run(CAPTION, s, shuffle_tags=True).split(", ")[0] for s in range(50)}) == 5


def test_separator_fixes_front_and_end_and_never_reaches_the_text():
    caption = "meeb person, red hat ||| smiling, outdoors, sunny ||| best quality"
    for seed in range(50):
        out = run(caption, seed, shuffle_tags=True, keep_tokens=4, keep_tokens_separator="|||").split(", ")
        assert out[:2] == ["meeb person", "red hat"] and out[-1] == "best quality"
        assert sorted(out[2:-1]) == ["outdoors", "smiling", "sunny"]
    assert process_tags(caption, CaptionOptions(keep_tokens_separator="|||"), None) == \
        "meeb person, red hat, smiling, outdoors, sunny, best quality"
    assert run("no separator, here", keep_tokens_separator="|||") == "no separator, here"


def test_tag_dropout_drops_free_tags_only():
    assert run(CAPTION, tag_dropout=1.0, keep_tokens=2) == "meeb person, smiling"
    assert run(CAPTION, tag_dropout=0.0, keep_tokens=2) == CAPTION
    kept = Counter()
    for seed in range(2000):
        out = run(CAPTION, seed, tag_dropout=0.25, keep_tokens=1).split(", ")
        assert out[0] == "meeb person" and [t for t in TAGS if t in out] == out  # order kept without shuffle
        kept.update(out[1:])
    for tag in TAGS[1:]:
        assert kept[tag] / 2000 == pytest.approx(0.75, abs=0.04)


def test_kohya_order_shuffle_then_dropout_from_one_stream():
    options = CaptionOptions(shuffle_tags=True, keep_tokens=1, tag_dropout=0.3)
    for seed in range(20):
        rng = random.Random(seed)
        free = TAGS[1:]
        rng.shuffle(free)
        free = [t for t in free if rng.random() >= 0.3]
        assert process_tags(CAPTION, options, random.Random(seed)) == ", ".join(TAGS[:1] + free)


@pytest.mark.parametrize("options,key", [
    (dict(keep_tokens=-1), "keep_tokens"),
    (dict(keep_tokens=1.5), "keep_tokens"),
    (dict(tag_dropout=1.5), "tag_dropout"),
    (dict(keep_tokens_separator="a,b"), "keep_tokens_separator"),
    (dict(shuffle_tags="yes"), "shuffle_tags"),
])
def test_bad_options_name_the_key(options, key):
    with pytest.raises(ValueError, match=key):
        CaptionOptions(**options)
