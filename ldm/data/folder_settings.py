"""Per-folder training settings: one small text file per setting, as EveryDream 2 names them (pure).

A file in a folder sets that option for every image in the folder and below it, like
`multiply.txt` (scan.py reads both):

    flip_p.txt         0.5     probability of a horizontal flip            (overrides flip_p)
    cond_dropout.txt   0.1     probability of an empty caption             (overrides conditional_dropout)
    shuffle_tags.txt   (empty) shuffle the caption's tags; "false" or 0 turns it off below (overrides shuffle_tags)
    tag_dropout.txt    0.1     probability of dropping each tag            (overrides tag_dropout)
    keep_tokens.txt    2       tags kept in front, in place                (overrides keep_tokens)
    loss_scale.txt     2       multiplies the loss weight of these images  (nested ones multiply)

For every key but loss_scale the nearest folder's file wins; loss_scale values multiply, as
multiply.txt values do. EveryDream 2 applies its files to their own folder only; here they
also reach the subfolders, the same rule as multiply.txt.

EveryDream 2's `local.yaml`, `global.yaml` and `batch_id.txt` are not read; the scan lists
them so the report can say so.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

SETTING_FILES = {"flip_p.txt": "flip_p", "cond_dropout.txt": "cond_dropout", "shuffle_tags.txt": "shuffle_tags",
                 "tag_dropout.txt": "tag_dropout", "keep_tokens.txt": "keep_tokens", "loss_scale.txt": "loss_scale"}
UNREAD_FILES = ("local.yaml", "local.yml", "global.yaml", "global.yml", "batch_id.txt")  # EveryDream 2's, not read
_TRUE, _FALSE = ("", "1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class FolderSettings:
    """The settings files that apply to an image (None: the config key's value)."""
    flip_p: float | None = None
    cond_dropout: float | None = None
    shuffle_tags: bool | None = None
    tag_dropout: float | None = None
    keep_tokens: int | None = None
    loss_scale: float = 1.0

    def below(self, files: Mapping[str, Any]) -> FolderSettings:
        """These settings, with a subfolder's own `files` ({key: value}) applied on top."""
        changes = {k: v for k, v in files.items() if k != "loss_scale"}
        if "loss_scale" in files:
            changes["loss_scale"] = self.loss_scale * files["loss_scale"]
        return dataclasses.replace(self, **changes) if changes else self

    def overrides(self) -> dict[str, Any]:
        """The keys set by a file (loss_scale when it is not 1)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        if out.get("loss_scale") == 1.0:
            del out["loss_scale"]
        return out


def setting_key(name: str) -> str | None:
    """The setting a file name holds (`"FLIP_P.TXT"` -> `"flip_p"`), else None."""
    return SETTING_FILES.get(name.lower())


def parse_setting(key: str, text: str, source: str) -> Any:
    """The value in a settings file; `source` names the file in the error."""
    raw = text.strip()
    if key == "shuffle_tags":
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError(f"{source}: expected nothing (on), true or false, got {raw[:40]!r}")
    if key == "keep_tokens":
        if not raw.isdigit():
            raise ValueError(f"{source}: expected a whole number of tags >= 0, got {raw[:40]!r}")
        return int(raw)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{source}: expected one number, got {raw[:40]!r}") from None
    if key == "loss_scale":
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{source}: the loss scale must be a finite number >= 0, got {value}")
    elif not 0.0 <= value <= 1.0:
        raise ValueError(f"{source}: expected a probability in [0, 1], got {value}")
    return value
