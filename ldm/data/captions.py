"""Captions and folder conventions: pure string rules, no file access.

Caption of an image, first match wins (the scanner supplies the sidecar text):
    <stem>.txt      whole file, surrounding whitespace stripped
    <stem>.caption  same
                    (with `caption_extension`, e.g. ".caption": only <stem> + that extension)
    fallback        `caption_fallback: filename` (default), the file name:
                    `first_underscore` (default): the stem up to its first "_",
                    so "john on a bench_(1).png" and "_(2).png" both give "john on a bench";
                    `strip_suffix_only`: only a trailing "_(N)" or "_N" is removed,
                    so booru-style names such as "hatsune_miku, smiling_(2)" keep their underscores.
                    `caption_fallback: folder` (kohya): the words of the nearest `<N>_<words>`
                    folder above the image, or "" when there is none.

Folder names: `<N>_<name>` (kohya convention, N >= 1) repeats every image below it N times.
"""
from __future__ import annotations

import re

FILENAME_MODES = ("first_underscore", "strip_suffix_only")
FALLBACKS = ("filename", "folder")
SIDECAR_EXTENSIONS = (".txt", ".caption")  # in order of precedence

_COPY_SUFFIX = re.compile(r"_(\(\d+\)|\d+)$")  # "_(12)" or "_12" at the end of a stem
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


def check_filename_mode(mode: str, key: str = "caption_from_filename") -> str:
    if mode not in FILENAME_MODES:
        raise ValueError(f"{key}: expected one of {', '.join(FILENAME_MODES)}, got {mode!r}")
    return mode


def check_fallback(fallback: str, key: str = "caption_fallback") -> str:
    if fallback not in FALLBACKS:
        raise ValueError(f"{key}: expected one of {', '.join(FALLBACKS)}, got {fallback!r}")
    return fallback


def sidecar_extensions(caption_extension: str | None, key: str = "caption_extension") -> tuple[str, ...]:
    """The sidecar extensions read as captions, lower case, in order of precedence:
    `.txt` then `.caption` for None, else only `caption_extension` (".caption", ".tags.txt" ...)."""
    if caption_extension is None:
        return SIDECAR_EXTENSIONS
    ext = caption_extension
    if not isinstance(ext, str) or len(ext) < 2 or not ext.startswith(".") or any(c in ext for c in "/\\"):
        raise ValueError(f"{key}: expected a file extension with its leading dot, such as \".txt\" or "
                         f"\".caption\", got {caption_extension!r}")
    return (ext.lower(),)


def split_sidecar(name: str, extensions: tuple[str, ...]) -> tuple[str, str] | None:
    """(image stem, extension) when `name` is a caption file for one of `extensions`
    (compared in lower case), else None: `split_sidecar("a.TXT", (".txt",)) == ("a", ".txt")`."""
    lower = name.lower()
    for ext in extensions:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[:-len(ext)], ext
    return None


def strip_copy_suffix(stem: str) -> str:
    """Remove one trailing duplicate marker `_(N)` / `_N`."""
    return _COPY_SUFFIX.sub("", stem)


def caption_from_filename(stem: str, mode: str = "first_underscore") -> str:
    """The caption a file name gives; `stem` is the name without its extension.

    In `first_underscore` mode a stem that starts with "_" would give an empty caption;
    it then falls back to `strip_suffix_only`, so a name never silently becomes "".
    """
    check_filename_mode(mode)
    kept = strip_copy_suffix(stem).strip()
    if mode == "strip_suffix_only":
        return kept
    cut = stem.split("_", 1)[0].strip()
    return cut or kept


def filename_caption_was_cut(stem: str) -> bool:
    """True when `first_underscore` drops more than a `_(N)` / `_N` duplicate marker.

    These are the names (booru tags, `big_john.png`) whose caption loses words; the plan
    counts them so the user can switch to `strip_suffix_only`.
    """
    return caption_from_filename(stem, "first_underscore") != caption_from_filename(stem, "strip_suffix_only")


def caption_from_sidecar(text: str) -> str:
    """A `.txt` / `.caption` file's content as the caption: all of it, stripped."""
    return text.strip()


def parse_kohya_folder(name: str) -> tuple[int, str] | None:
    """`"10_sks dog"` -> `(10, "sks dog")`; names without a leading `N_` (N >= 1) -> None."""
    m = _KOHYA_FOLDER.match(name)
    if m is None or int(m.group(1)) == 0:
        return None
    return int(m.group(1)), m.group(2)


def parse_multiply(text: str, source: str) -> float:
    """The number in a `multiply.txt`; `source` names the file in the error."""
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{source}: expected one number (e.g. 2 or 0.5), got {text.strip()[:40]!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{source}: the multiplier must be a finite number >= 0, got {value}")
    return value
