"""A torch profile of main.py's training steps, to set beside the bare step's (issue: performance,
target 2: with `cuda_graphs` main.py's steps between the pauses ran 2.2% slower than the bare step).

    E2E_OVERRIDES="... bench/configs/step_profile.yaml" bash bench/end_to_end.sh /tmp/e2e

From global step `start`, `steps` steps under torch's profiler (host and GPU), then the same
report as `python bench/train_step.py ... --profile` prints for the bare step (bench/profiling.py):
the GPU's time by kind of kernel, its idle time per step and the longest idle gaps, each with
what the host ran while the GPU waited. With bench/bare_in_process.py's `profile: true` the
bare step in the same process prints its own after it is timed. The kernels both run are the
same; what main.py adds shows as kernels of its own (the images' copy, metrics) or as idle gaps.
Both also write every kernel's GPU time per step to the run's directory (step_profile_main.json,
step_profile_bare.json), to diff by name.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/'s modules import each other by name


class StepProfile(pl.Callback):
    def __init__(self, start: int = 120, steps: int = 8):
        self.start, self.steps = start, steps
        self._prof: Any = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._prof is None and trainer.global_step == self.start and torch.cuda.is_available():
            from torch.profiler import ProfilerActivity, profile
            self._prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self._prof.start()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._prof is not None and trainer.global_step == self.start + self.steps:
            from profiling import print_profile
            torch.cuda.synchronize()
            self._prof.stop()
            print(f"== step profile: main.py, global steps {self.start}-{trainer.global_step - 1}", flush=True)
            print_profile(self._prof, self.steps, dump=str(Path(trainer.log_dir) / "step_profile_main.json"))
            self._prof, self.start = None, -1  # once
