"""Where a training step's time goes, phase by phase, on the host and on the GPU, without syncs.

    E2E_OVERRIDES="bench/configs/end_to_end.yaml bench/configs/phase_probe.yaml" bash bench/end_to_end.sh
    python bench/train_step.py --impl ours --batch 6 --ckpt --encode --master --phases

At each mark (main.py: Lightning's hooks; the bare step: the same points in its own loop) it
reads the host's clock and records a CUDA event. Over `steps` steps it prints one JSON line:
per phase (from one mark to the next, and from a step's last mark to the next step's first),
the median milliseconds the host spent and the GPU's timeline advanced, and the steps over 1.5x
the median step (with their longest phase), which a median hides. In a step bound by the
host the two agree; where the GPU is behind, the host's phases are short and the GPU's long.
Compare main.py's line with the bare step's: the phases where main.py's host takes longer are
what the training loop, its hooks and the data pipeline add.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch


class Phases:
    """Marks within steps; `summary()` gives the median host and GPU milliseconds per phase."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[str, float, torch.cuda.Event | None]]] = []
        self._current: list[tuple[str, float, torch.cuda.Event | None]] = []

    def mark(self, name: str) -> None:
        event = torch.cuda.Event(enable_timing=True) if torch.cuda.is_available() else None  # None: a CPU check
        if event is not None:
            event.record()
        self._current.append((name, time.perf_counter(), event))

    def end_step(self) -> None:
        self.steps.append(self._current)
        self._current = []

    def summary(self) -> dict[str, Any]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        host: dict[str, list[float]] = {}
        gpu: dict[str, list[float]] = {}
        longest: list[tuple[str, float]] = []  # per step: its longest phase on the host
        for step, following in zip(self.steps, self.steps[1:]):
            marks = step + following[:1]  # the last phase runs to the next step's first mark
            phases = []
            for (a, ta, ea), (b, tb, eb) in zip(marks, marks[1:]):
                name = f"{a}->{b}"
                host.setdefault(name, []).append(1000 * (tb - ta))
                gpu.setdefault(name, []).append(ea.elapsed_time(eb) if ea is not None else float("nan"))
                phases.append((name, 1000 * (tb - ta)))
            longest.append(max(phases, key=lambda p: p[1]))
        med = {name: (round(statistics.median(host[name]), 2), round(statistics.median(gpu[name]), 2))
               for name in host}
        periods = [1000 * (b[0][1] - a[0][1]) for a, b in zip(self.steps, self.steps[1:])]
        median = statistics.median(periods)
        slow = [[i, round(ms), longest[i][0], round(longest[i][1])]
                for i, ms in enumerate(periods) if ms > 1.5 * median]
        return {"steps": len(periods), "step_ms": round(median, 1), "step_ms_mean": round(statistics.fmean(periods), 1),
                "slow_steps": slow,  # [index from the first, ms, its longest phase, that phase's host ms]
                "phases_host_gpu_ms": med}


def report(label: str, phases: Phases) -> None:
    print(f"phase probe ({label}): {json.dumps(phases.summary())}", flush=True)


class PhaseProbe(pl.Callback):
    """Marks at Lightning's hooks for `steps` steps from global step `start`. In automatic
    optimization the order is: batch start, training_step, zero_grad, backward, the
    optimizer's update, batch end; then the loop fetches and transfers the next batch."""

    def __init__(self, start: int = 110, steps: int = 30):
        self.start, self.steps = start, steps
        self._phases: Phases | None = None

    def _mark(self, name: str) -> None:
        if self._phases is not None:
            self._phases.mark(name)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._phases is None and trainer.global_step == self.start:
            self._phases = Phases()
        self._mark("batch_start")

    def on_before_zero_grad(self, *args: Any) -> None:
        self._mark("zero_grad")

    def on_before_backward(self, *args: Any) -> None:
        self._mark("backward")

    def on_after_backward(self, *args: Any) -> None:
        self._mark("after_backward")

    def on_before_optimizer_step(self, *args: Any) -> None:
        self._mark("update")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._phases is None:
            return
        self._mark("batch_end")
        self._phases.end_step()
        if len(self._phases.steps) > self.steps:
            report(f"main.py, steps {self.start}-{trainer.global_step - 1}", self._phases)
            self._phases = None
            self.start = -1  # once
