"""Checkpoint files that are never half-written, and a save when a run is interrupted.

* `AtomicCheckpointIO` writes every Lightning checkpoint to a temporary file in the
  target folder, fsyncs it and renames it over the target, so a crash or a full
  disk never leaves a truncated `last.ckpt` behind.
* `RunCheckpoint` is Lightning's ModelCheckpoint with `last.ckpt` written at the end of
  training too, whatever the save interval.
* `InterruptCheckpoint` turns the first Ctrl-C into a stop at the next batch
  boundary (a second Ctrl-C aborts at once), and on Ctrl-C, SIGTERM or an
  exception saves `interrupted-epoch=EE-step=SSSSS.ckpt` (or `errored-...`) and
  names the file.
"""
from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_torch_save(checkpoint, path)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` is always the state training ended with, also when
    the last save by step or epoch came a few steps before the end."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class _StopRequested(KeyboardInterrupt):
    """Raised at a batch boundary after the first Ctrl-C."""


class InterruptCheckpoint(pl.Callback):
    def __init__(self, dirpath: str | os.PathLike):
        self.dirpath = Path(dirpath)
        self._stop_requested = False
        self._previous_handler: Any = None
        self.saved_path: Path | None = None

    # -- a first Ctrl-C stops cleanly after the current optimizer step -----------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread (e.g. a notebook worker): keep the default
            self._previous_handler = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        print("\nCtrl-C: saving a checkpoint after this batch (press again to abort at once)", flush=True)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._stop_requested:
            raise _StopRequested()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    # -- save on the way out ----------------------------------------------------------
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        interrupted = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        kind = "interrupted" if interrupted else "errored"
        path = self.dirpath / f"{kind}-epoch={trainer.current_epoch:02d}-step={trainer.global_step:05d}.ckpt"
        try:
            trainer.save_checkpoint(path, weights_only=False)
        except Exception as e:  # saving what we can must not hide the original error
            rank_zero_warn(f"could not save {path} after {type(exception).__name__}: {e}")
            return
        self.saved_path = path
        if trainer.is_global_zero:
            if interrupted:
                rank_zero_info(f"Saved {path}; resume with: python main.py -r '{path}'")
            else:
                rank_zero_warn(f"Training failed with {type(exception).__name__}: {exception}. "
                               f"Saved the current state to {path}")
