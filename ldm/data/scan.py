"""Walk a data folder and describe every image from its header, without decoding pixels.

The result is a list of plain `ImageRecord`s (size, caption, folder weights) and a list of
`SkippedFile`s with one reason each; everything after this (buckets, plans, reports) works
on those records alone. Nothing in the user's folder is written.

Rules:
- any depth; folders and files whose names start with "." (and Windows-hidden ones) are
  skipped; symlinked folders are followed once (a loop is not walked twice);
- image extensions, case-insensitive: IMAGE_EXTENSIONS;
- the size is the one the model will see: EXIF orientations 5-8 swap width and height;
- caption: `<stem>.txt`, else `<stem>.caption` (or only `<stem><caption_extension>`), else
  the file name or, with `caption_fallback="folder"`, the words of the nearest `<N>_<words>`
  folder above the image (see captions.py);
- a folder named `<N>_<name>` repeats everything below it N times; a `multiply.txt`
  scales its folder and everything below it; nested values multiply;
- the settings files of folder_settings.py (`flip_p.txt`, `loss_scale.txt` ...) apply to
  their folder and everything below it.
"""
from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ldm.data.captions import (caption_from_filename, caption_from_sidecar, check_fallback, check_filename_mode,
                               filename_caption_was_cut, parse_kohya_folder, parse_multiply, sidecar_extensions,
                               split_sidecar)
from ldm.data.folder_settings import UNREAD_FILES, FolderSettings, parse_setting, setting_key

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".avif"})
MULTIPLY_FILE = "multiply.txt"
MIN_SIDE = 64
_TAIL_BYTES = 4096  # how much of a JPEG/PNG's end is read to find its end marker


class DatasetError(ValueError):
    """The data folder cannot give a training set; the message names the folder and what was found."""


@dataclass(frozen=True)
class ImageRecord:
    path: str                  # relative to data_root, "/"-separated
    width: int                 # as displayed: EXIF orientation applied
    height: int
    caption: str
    caption_source: str        # the sidecar's extension without the dot ("txt", "caption"), "filename" or "folder"
    caption_cut: bool = False  # the file-name caption lost words at an underscore
    folder_repeats: int = 1    # product of N over the `N_name` folders on the path
    multiply: float = 1.0      # product of the multiply.txt values of its folder and above
    settings: FolderSettings = FolderSettings()  # the settings files of its folder and above

    @property
    def folder(self) -> str:
        """The folder holding the image, relative to data_root ("" for the root itself)."""
        return self.path.rpartition("/")[0]


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


@dataclass
class ScanResult:
    data_root: str
    images: list[ImageRecord] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    orphan_captions: list[str] = field(default_factory=list)   # sidecars with no image of that stem
    ignored: dict[str, int] = field(default_factory=dict)      # other files, counted by extension
    multipliers: dict[str, float] = field(default_factory=dict)  # folder -> its multiply.txt value
    settings: dict[str, dict] = field(default_factory=dict)      # folder -> {key: value} of its settings files
    unread: list[str] = field(default_factory=list)              # EveryDream 2 files that are not read


def exif_orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8 from an opened image's header (1 when absent or unreadable).

    PNG keeps EXIF in a chunk that Pillow may only reach by decoding, so for PNG only an
    eXIf chunk seen while reading the header counts; the loader uses this same function,
    so the size the plan assumes is the size the loader produces.
    """
    try:
        if im.format == "PNG":
            raw = im.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = im.getexif()
        value = int(exif.get(0x0112, 1))
    except Exception:  # a malformed EXIF block must not cost the image; it is shown unrotated
        return 1
    return value if 1 <= value <= 8 else 1


def _has_end_marker(path: str, fmt: str | None, size: int) -> bool:
    """A cheap truncation check: JPEG ends with FFD9, PNG with an IEND chunk (near the end)."""
    marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(fmt or "")
    if marker is None:
        return True
    with open(path, "rb") as f:
        f.seek(max(0, size - _TAIL_BYTES))
        return marker in f.read()


def read_image_header(path: str, min_side: int = MIN_SIDE) -> tuple[int, int]:
    """(width, height) as displayed, or ValueError with the reason the image is unusable."""
    size = os.stat(path).st_size
    if size == 0:
        raise ValueError("empty file (0 bytes)")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            with Image.open(path) as im:
                width, height, fmt = im.size[0], im.size[1], im.format
                orientation = exif_orientation(im)
    except Image.DecompressionBombError:
        raise ValueError(f"over Pillow's decompression-bomb limit ({limit} pixels)") from None
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can read (wrong extension or corrupt header)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"corrupt image header ({e})") from None
    if limit and width * height > limit:
        raise ValueError(f"{width}x{height} is over Pillow's decompression-bomb limit ({limit} pixels)")
    if not _has_end_marker(path, fmt, size):
        raise ValueError(f"truncated {fmt} (no end marker; an interrupted download or copy?)")
    if orientation >= 5:
        width, height = height, width
    if min(width, height) < min_side:
        raise ValueError(f"too small: {width}x{height}, the minimum is {min_side} px per side")
    return width, height


def _hidden(entry: os.DirEntry) -> bool:
    if entry.name.startswith("."):
        return True
    if os.name != "nt":
        return False
    attrs = getattr(entry.stat(follow_symlinks=False), "st_file_attributes", 0)
    return bool(attrs & getattr(stat, "FILE_ATTRIBUTE_HIDDEN", 0))


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8-sig") as f:
        return f.read()


@dataclass(frozen=True)
class _CaptionRules:
    """How an image's caption is found (each field is the config key of the same name)."""
    caption_from_filename: str = "first_underscore"
    caption_extension: str | None = None
    caption_fallback: str = "filename"

    def __post_init__(self):
        check_filename_mode(self.caption_from_filename)
        check_fallback(self.caption_fallback)
        if set(sidecar_extensions(self.caption_extension)) & IMAGE_EXTENSIONS:
            raise ValueError(f"caption_extension: {self.caption_extension!r} is an image extension")

    @cached_property
    def extensions(self) -> tuple[str, ...]:
        return sidecar_extensions(self.caption_extension)


def scan_folder(data_root: str | os.PathLike, caption_from_filename_mode: str = "first_underscore",
                min_side: int = MIN_SIDE, *, caption_extension: str | None = None,
                caption_fallback: str = "filename", key: str = "data_root") -> ScanResult:
    """Walk `data_root` (recursively) and return its images, skips and side files.
    The caption settings are the config keys of those names; `key` names the folder in errors."""
    rules = _CaptionRules(caption_from_filename_mode, caption_extension, caption_fallback)
    root = Path(data_root)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DatasetError(f"{key} {str(root)!r} {what}")
    result = ScanResult(data_root=str(root))
    seen_dirs: set[tuple[int, int]] = set()
    # (relative folder, repeats, multiply, words of the nearest `N_words` folder, settings)
    stack: list[tuple[str, int, float, str, FolderSettings]] = [("", 1, 1.0, "", FolderSettings())]
    while stack:
        rel, repeats, multiply, words, settings = stack.pop()
        abs_dir = os.path.join(root, rel)
        st = os.stat(abs_dir)
        if (st.st_dev, st.st_ino) in seen_dirs:
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(abs_dir), key=lambda e: e.name)
        except OSError as e:
            result.skipped.append(SkippedFile(rel or ".", f"cannot list folder: {e.strerror}"))
            continue
        entries = [e for e in entries if not _hidden(e)]
        files = [e for e in entries if e.is_file()]
        local: dict[str, object] = {}
        for e in files:
            key = setting_key(e.name)
            try:
                if e.name.lower() == MULTIPLY_FILE:
                    value = parse_multiply(_read_text(e.path), source=e.path)
                    result.multipliers[rel] = value
                    multiply *= value
                elif key is not None:
                    local[key] = parse_setting(key, _read_text(e.path), source=e.path)
            except (ValueError, OSError) as err:
                raise DatasetError(str(err)) from None
            if e.name.lower() in UNREAD_FILES:
                result.unread.append(_join(rel, e.name))
        if local:
            result.settings[rel] = local
            settings = settings.below(local)
        files = [e for e in files if not _settings_file(e.name)]
        _scan_files(result, rel, files, repeats, multiply, words, rules, min_side, settings)
        for e in reversed([e for e in entries if e.is_dir()]):
            kohya = parse_kohya_folder(e.name)
            stack.append((_join(rel, e.name), repeats * (kohya[0] if kohya else 1), multiply,
                          kohya[1] if kohya else words, settings))
        for e in entries:  # broken links and other non-files with an image extension
            if not e.is_file() and not e.is_dir() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS:
                result.skipped.append(SkippedFile(_join(rel, e.name), "cannot read (broken link or special file)"))
    result.images.sort(key=lambda r: r.path)
    result.skipped.sort(key=lambda s: s.path)
    result.unread.sort()
    return result


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _settings_file(name: str) -> bool:
    """multiply.txt, a settings file or an EveryDream 2 file: never a caption or an ignored file."""
    lower = name.lower()
    return lower == MULTIPLY_FILE or setting_key(lower) is not None or lower in UNREAD_FILES


def _scan_files(result: ScanResult, rel: str, files: list[os.DirEntry], repeats: int, multiply: float,
                words: str, rules: _CaptionRules, min_side: int, settings: FolderSettings) -> None:
    sidecars: dict[tuple[str, str], os.DirEntry] = {}
    image_stems: set[str] = set()
    for e in files:
        stem, ext = os.path.splitext(e.name)
        ext = ext.lower()
        sidecar = split_sidecar(e.name, rules.extensions)
        if sidecar is not None:
            sidecars[sidecar] = e
        elif ext in IMAGE_EXTENSIONS:
            image_stems.add(stem)
        else:
            result.ignored[ext or "(no extension)"] = result.ignored.get(ext or "(no extension)", 0) + 1
    for (stem, ext), e in sidecars.items():
        if stem not in image_stems:
            result.orphan_captions.append(_join(rel, e.name))
    for e in files:
        stem, ext = os.path.splitext(e.name)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        path = _join(rel, e.name)
        try:
            width, height = read_image_header(e.path, min_side)
            caption, source = _caption(stem, sidecars, rules, words)
        except (ValueError, OSError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            result.skipped.append(SkippedFile(path, reason))
            continue
        result.images.append(ImageRecord(
            path=path, width=width, height=height, caption=caption, caption_source=source,
            caption_cut=(source == "filename" and rules.caption_from_filename == "first_underscore"
                         and filename_caption_was_cut(stem)),
            folder_repeats=repeats, multiply=multiply, settings=settings))


def _caption(stem: str, sidecars: dict[tuple[str, str], os.DirEntry], rules: _CaptionRules,
             words: str) -> tuple[str, str]:
    for ext in rules.extensions:
        entry = sidecars.get((stem, ext))
        if entry is not None:
            try:
                return caption_from_sidecar(_read_text(entry.path)), ext[1:]
            except UnicodeDecodeError:
                raise ValueError(f"caption file {entry.name} is not UTF-8 text") from None
    if rules.caption_fallback == "folder":
        return words, "folder"
    return caption_from_filename(stem, rules.caption_from_filename), "filename"
