"""A callback for bench runs of main.py: where does the host's time go between steps?

    E2E_OVERRIDES="bench/configs/end_to_end.yaml bench/configs/host_probe.yaml" bash bench/end_to_end.sh

From the end of optimizer step `start - 1` to the end of step `start + steps - 1` it runs
cProfile and times Python's garbage collections, then prints the window's wall time per step,
the collections, and the functions by cumulative and by own time. Compare with
`python bench/train_step.py ... --host_profile`, the bare step's host time: the difference is
what the training loop, its hooks and the data pipeline add to a host-bound step.
"""
from __future__ import annotations

import cProfile
import gc
import pstats
import time
from typing import Any

import pytorch_lightning as pl


class HostProbe(pl.Callback):
    def __init__(self, start: int = 110, steps: int = 30, rows: int = 45):
        self.start, self.steps, self.rows = start, steps, rows
        self._profile: cProfile.Profile | None = None
        self._t0 = 0.0
        self._gc: list[tuple[int, float]] = []  # (generation, seconds)
        self._gc_start = 0.0

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self._gc.append((info["generation"], time.perf_counter() - self._gc_start))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self._profile is None and step == self.start - 1:
            gc.callbacks.append(self._on_gc)
            self._profile = cProfile.Profile()
            self._t0 = time.perf_counter()
            self._profile.enable()
        elif self._profile is not None and step == self.start + self.steps - 1:
            self._profile.disable()
            wall = time.perf_counter() - self._t0
            gc.callbacks.remove(self._on_gc)
            by_gen = {g: [round(1000 * sum(s for n, s in self._gc if n == g), 1), sum(n == g for n, _ in self._gc)]
                      for g in sorted({n for n, _ in self._gc})}
            print(f"host probe: steps {self.start}-{step}: {1000 * wall / self.steps:.1f} ms per step (profiled); "
                  f"{len(self._gc)} garbage collections, {1000 * sum(s for _, s in self._gc):.1f} ms in all; "
                  f"by generation [ms, collections]: {by_gen}; {gc.get_freeze_count()} objects frozen", flush=True)
            stats = pstats.Stats(self._profile).strip_dirs()
            stats.sort_stats("cumulative").print_stats(self.rows)
            stats.sort_stats("tottime").print_stats(self.rows)
            self._profile = None
