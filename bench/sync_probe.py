"""A callback for bench runs of main.py: does one training step make the host wait for the GPU?

    lightning: {callbacks: {sync_probe: {target: bench.sync_probe.SyncProbe, params: {step: 105}}}}

From the end of optimizer step `step - 1` to the end of step `step` (the loop's work between
steps, the next batch's fetch and transfer, the step and its hooks) it turns on CUDA's sync
debug mode and prints `sync probe: N host syncs in step S`, then the innermost Python frames
of each sync. Pick a step where the progress bar (every 10 steps) and the loggers
(log_every_n_steps) do not read metrics back: those syncs are known and rare.
"""
from __future__ import annotations

import traceback
import warnings
from typing import Any

import pytorch_lightning as pl
import torch


class SyncProbe(pl.Callback):
    def __init__(self, step: int = 105, frames: int = 5):
        self.step, self.frames = step, frames
        self._saved: Any = None
        self._stacks: list[list[str]] = []

    def _record(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                line: Any = None) -> None:
        if "synchroniz" in str(message):
            frames = traceback.extract_stack()[:-2]  # without this function and warnings' own frame
            if frames[-1].name == "set_sync_debug_mode":  # torch's note on the mode itself, when it is turned off
                return
            self._stacks.append([f"{f.filename}:{f.lineno} {f.name}" for f in frames[-self.frames:]])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not torch.cuda.is_available():
            return
        if self._saved is not None:
            torch.cuda.set_sync_debug_mode("default")
            catcher, warnings.showwarning = self._saved
            catcher.__exit__(None, None, None)
            self._saved = None
            print(f"sync probe: {len(self._stacks)} host syncs in step {trainer.global_step}", flush=True)
            for i, stack in enumerate(self._stacks):
                print(f"  sync {i + 1}:\n    " + "\n    ".join(stack), flush=True)
        elif trainer.global_step == self.step - 1:
            catcher = warnings.catch_warnings()
            catcher.__enter__()
            warnings.simplefilter("always")
            self._saved = (catcher, warnings.showwarning)
            warnings.showwarning = self._record
            torch.cuda.set_sync_debug_mode("warn")
