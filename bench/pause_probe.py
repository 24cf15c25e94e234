"""Where main.py's pauses go, call by call, without adding a sync (issue: performance, target 2).

    lightning: {callbacks: {pause_probe: {target: bench.pause_probe.PauseProbe}}}
    E2E_OVERRIDES="bench/configs/end_to_end.yaml bench/configs/pause_probe.yaml" bash bench/end_to_end.sh

At setup it wraps the hooks of the other callbacks, the module's validation_step and the
checkpoint IO's save_checkpoint in a host clock, and notes every call that takes over
`min_ms` milliseconds, with the global step. GPU work shows where the host waits for it (a
grid's `.cpu()`, the checkpoint's copy, the metrics read back at the end of validation),
not where it was queued. It also notes the gaps between consecutive training batches that
took over 1.5x the median. At the end of training it prints one line per gap: its seconds
and the slow calls inside it, so the gap's parts add up (less the step itself), each with its
start in the gap, and the loop's marks (validation start and end, epoch end and start) at
theirs: the time between marks that no call covers is Lightning's loop and the loader's.
Python's garbage collections over `min_ms` are listed among the calls as "gc gen N", and so are
the checkpoint writer thread's reserve of the first save's host memory and its cudaHostRegister
call (`reserve`, host_arena.py), and each recording of a shape's CUDA graphs (`cuda_graphs
record`, model.params.cuda_graphs); a call is listed in every gap it overlaps.

With `stack_after_s` (from global step `stack_from`), a step that runs longer than that has the
Python stacks of all threads written to <log dir>/pause_stacks.txt by faulthandler's watchdog,
which needs no GIL: where the training thread and the writer threads are during a stall that
no hook explains.
"""
from __future__ import annotations

import faulthandler
import functools
import gc
import json
import statistics
import time
from typing import Any, Callable

import pytorch_lightning as pl

from ldm.callbacks import checkpointing, host_arena
from ldm.modules import cuda_graphs


class PauseProbe(pl.Callback):
    def __init__(self, min_ms: float = 50.0, stack_after_s: float | None = None, stack_from: int = 100):
        self.min_s = min_ms / 1000
        self.stack_after_s, self.stack_from = stack_after_s, stack_from
        self._stacks: Any = None
        self.calls: list[tuple[int, str, float, float]] = []  # (global step, name, start, seconds)
        self.batch_starts: list[tuple[int, float]] = []
        self.marks: list[tuple[str, float]] = []  # (hook, host time) of the loop's phases
        self._trainer: pl.Trainer | None = None

    def _wrap(self, owner: Any, attr: str, name: str) -> None:
        original: Callable = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - start
                if seconds >= self.min_s:
                    step = self._trainer.global_step if self._trainer is not None else -1
                    self.calls.append((step, name, start, seconds))
        setattr(owner, attr, timed)  # an instance attribute: the class and other instances are untouched

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        for cb in trainer.callbacks:
            if cb is self:
                continue
            for attr in dir(type(cb)):
                if attr.startswith("on_") and getattr(type(cb), attr) is not getattr(pl.Callback, attr, None):
                    self._wrap(cb, attr, f"{type(cb).__name__}.{attr}")
        self._wrap(pl_module, "validation_step", "validation_step")
        self._wrap(trainer.strategy.checkpoint_io, "save_checkpoint", "save_checkpoint")
        # the first save's host memory, reserved by the writer thread after the first step
        self._wrap(checkpointing, "_touched_host_tensors", "reserve (writer thread)")
        self._wrap(host_arena, "_register", "cudaHostRegister (writer thread)")
        # a bucket shape's CUDA graphs recorded at its first call (a class attribute: every instance)
        self._wrap(cuda_graphs.GraphedUNet, "_record", "cuda_graphs record")
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif getattr(self, "_gc_start", None) is not None:
            seconds = time.perf_counter() - self._gc_start
            if seconds >= self.min_s:
                step = self._trainer.global_step if self._trainer is not None else -1
                self.calls.append((step, f"gc gen {info['generation']}", self._gc_start, seconds))
            self._gc_start = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.batch_starts.append((trainer.global_step, time.perf_counter()))
        if self.stack_after_s is not None and trainer.global_step >= self.stack_from:
            if self._stacks is None:
                self._stacks = open(f"{trainer.log_dir or trainer.default_root_dir}/pause_stacks.txt", "w")
            faulthandler.cancel_dump_traceback_later()
            print(f"--- step {trainer.global_step} at {time.perf_counter():.3f}", file=self._stacks, flush=True)
            faulthandler.dump_traceback_later(self.stack_after_s, file=self._stacks)

    def _mark(self, name: str) -> None:
        self.marks.append((name, time.perf_counter()))

    def on_validation_start(self, *args: Any) -> None:
        self._mark("validation_start")

    def on_validation_end(self, *args: Any) -> None:
        self._mark("validation_end")

    def on_train_epoch_end(self, *args: Any) -> None:
        self._mark("train_epoch_end")

    def on_train_epoch_start(self, *args: Any) -> None:
        self._mark("train_epoch_start")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._gc in gc.callbacks:
            gc.callbacks.remove(self._gc)
        if self._stacks is not None:
            faulthandler.cancel_dump_traceback_later()
            self._stacks.close()
        periods = [(b[1] - a[1], a[0], a[1], b[1]) for a, b in zip(self.batch_starts, self.batch_starts[1:])]
        if not periods:
            return
        median = statistics.median(p[0] for p in periods)
        for seconds, step, start, end in periods:
            if seconds < 1.5 * median:
                continue
            inside = [(name, round(s, 3), round(t - start, 3)) for _, name, t, s in self.calls
                      if t < end and t + s > start]  # overlapping the gap (a start before it is negative)
            marks = [(name, round(t - start, 3)) for name, t in self.marks if start <= t < end]
            print("pause probe: " + json.dumps({"step": step, "seconds": round(seconds, 3), "median_step_s":
                                                round(median, 4), "calls": inside, "marks": marks}), flush=True)
