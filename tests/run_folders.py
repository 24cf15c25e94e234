"""Helpers of the main.py tests: run folders as an interrupted run leaves them."""
from __future__ import annotations

import shutil
from pathlib import Path


def stopped_at(run: Path, checkpoint: str, dest: Path) -> Path:
    """A copy of `run` (in `dest`) with its configs and only `checkpoint`, as if the run had
    stopped there; returns the copied checkpoint's path, for `-r`."""
    copy = dest / run.name
    shutil.copytree(run / "configs", copy / "configs")
    (copy / "checkpoints").mkdir()
    return Path(shutil.copy(run / "checkpoints" / checkpoint, copy / "checkpoints"))
