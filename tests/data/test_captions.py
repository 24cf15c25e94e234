import pytest

from ldm.data.captions import (caption_from_filename, caption_from_sidecar, check_filename_mode,
                               filename_caption_was_cut, parse_kohya_folder, parse_multiply)


@pytest.mark.parametrize("stem, first, suffix_only", [
    ("john sitting on a bench_(1)", "john sitting on a bench", "john sitting on a bench"),
    ("john sitting on a bench_(2)", "john sitting on a bench", "john sitting on a bench"),
    ("a pencil drawing of john", "a pencil drawing of john", "a pencil drawing of john"),
    ("big_john", "big", "big_john"),
    ("hatsune_miku, smiling_(12)", "hatsune", "hatsune_miku, smiling"),
    ("cat_7", "cat", "cat"),
    ("cat_(7)_(8)", "cat", "cat_(7)"),          # only one trailing marker is a suffix
    ("_(2)", "", ""),
    ("_leading underscore", "_leading underscore", "_leading underscore"),  # never cut to ""
    ("  spaced out _(1)", "spaced out", "spaced out"),
])
def test_caption_from_filename(stem, first, suffix_only):
    assert caption_from_filename(stem) == first
    assert caption_from_filename(stem, "first_underscore") == first
    assert caption_from_filename(stem, "strip_suffix_only") == suffix_only


def test_cut_detection_flags_only_lost_words():
    assert filename_caption_was_cut("big_john")
    assert filename_caption_was_cut("hatsune_miku, smiling_(3)")
    assert not filename_caption_was_cut("a man on a bench_(1)")
    assert not filename_caption_was_cut("a man_4")
    assert not filename_caption_was_cut("plain name")


def test_unknown_mode_names_the_key():
    with pytest.raises(ValueError, match="caption_from_filename.*'whole'"):
        check_filename_mode("whole")
    with pytest.raises(ValueError, match="caption_from_filename"):
        caption_from_filename("x", "keep_all")


def test_sidecar_text_is_whole_and_stripped():
    assert caption_from_sidecar("  a cat,\nsitting on a mat \n\n") == "a cat,\nsitting on a mat"
    assert caption_from_sidecar("\n") == ""


@pytest.mark.parametrize("name, parsed", [
    ("10_sks dog", (10, "sks dog")),
    ("1_x", (1, "x")),
    ("05_style", (5, "style")),
    ("2_man_laion", (2, "man_laion")),
    ("0_disabled", None),
    ("man_laion", None),
    ("10", None),
    ("10_", None),
    ("x10_dog", None),
])
def test_kohya_folder_names(name, parsed):
    assert parse_kohya_folder(name) == parsed


def test_multiply_values_and_errors():
    assert parse_multiply(" 0.5\n", "f") == 0.5
    assert parse_multiply("3", "f") == 3.0
    assert parse_multiply("0", "f") == 0.0
    with pytest.raises(ValueError, match="folder/multiply.txt.*'two'"):
        parse_multiply("two", "folder/multiply.txt")
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ValueError, match="folder/multiply.txt"):
            parse_multiply(bad, "folder/multiply.txt")
