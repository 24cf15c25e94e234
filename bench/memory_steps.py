"""A callback for bench runs of main.py: where in the run does the GPU memory it holds grow?

    lightning: {callbacks: {memory_steps: {target: bench.memory_steps.MemorySteps}}}

After each training batch, validation and the run's start and end it prints
`memory steps: {...}` (the step, the hook, reserved, allocated and the peak reserved so far,
GiB) whenever the allocator's reserved memory moved by `step_gib` or more since the last
line: the first eager steps, the CUDA graphs' recording, the sample grids and validation each
show up where they take memory. Reading the allocator's counters does not wait for the GPU.
Where the run fails (main.py prints out-of-memory advice without a traceback), it prints the
line and the innermost frames of the failure.
"""
from __future__ import annotations

import json
import os
import traceback
from typing import Any

import pytorch_lightning as pl
import torch


class MemorySteps(pl.Callback):
    def __init__(self, step_gib: float = 0.25):
        self.step_bytes = int(step_gib * 2**30)
        self.last = -self.step_bytes

    def _line(self, trainer: pl.Trainer, hook: str, always: bool = False) -> None:
        if not torch.cuda.is_available():
            return
        reserved = torch.cuda.memory_reserved()
        if not always and abs(reserved - self.last) < self.step_bytes:
            return
        self.last = reserved
        gib = 2**30
        print("memory steps: " + json.dumps({
            "step": trainer.global_step, "hook": hook, "reserved_GiB": round(reserved / gib, 2),
            "allocated_GiB": round(torch.cuda.memory_allocated() / gib, 2),
            "peak_reserved_GiB": round(torch.cuda.max_memory_reserved() / gib, 2)}), flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", os.environ.get("PYTORCH_ALLOC_CONF"))
        print(f"memory steps: the allocator's settings: {conf}", flush=True)
        self._line(trainer, "train_start", always=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._line(trainer, "train_batch_end")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._line(trainer, "validation_end")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._line(trainer, "train_end", always=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._line(trainer, "exception", always=True)
        frames = traceback.extract_tb(exception.__traceback__)[-12:]
        print("memory steps: failed in\n" + "".join(traceback.format_list(frames)), flush=True)
