"""A callback for bench runs of main.py: the bare training step, timed in main.py's own process
after its training ends (bench/end_to_end.sh's baseline for target 2).

    lightning: {callbacks: {bare_in_process: {target: bench.bare_in_process.BareInProcess}}}

On this host the bare step, bound by the host's kernel launches at batch 6, ran up to 1.45x
faster per pixel in one process than in the next (doc/performance/end-to-end.md, fifteenth session), more
than what target 2 measures. Here it runs on the same CPU placement and allocator as the run
it is compared with: `bench/train_step.py`'s step (`shared_step` under bf16 autocast, the
trainer's own optimizer stepped with a closure, `zero_grad`) on random images of the run's
buckets (its dataset_plan.json), each bucket once first, then as often as the plan has batches
of each; with bench/phase_probe.py's marks, to set beside main.py's phase probe line; after
the last checkpoint's background write is done (runs R and S of the sixteenth session timed
it while that write went on). Prints
`bare in process: {...}` (img/s, ms/step and the phases). It trains the run's model on noise
after its last checkpoint: for bench runs only. With `before: true` it also runs at the start
of training, before the first batch (`bare in process (before): {...}`): the host's speed
drifts within one process too, so bench/end_to_end.sh compares with the mean of the two. That
run trains the model on noise before the run does: a bench setting only. With
`with_loader: true`, after the run: the bare step, the bare step with the run's training loader
(its workers and pinning thread) delivering a batch to the GPU beside each step, and the bare
step again: what the data pipeline's presence costs a host-bound step, without Lightning.
With `during: [steps]`, also `during_steps` bare steps between two of the run's steps at each
of those global steps (bench/configs/bare_during.yaml): a baseline sampled across the run's own
time, as the host's speed swings within a process; bench/end_to_end.sh leaves their time out
of main.py's and compares with their mean. With `profile: true`, after the run's bare step is
timed, `profile_steps` more under torch's profiler, reported as bench/step_profile.py reports
main.py's steps.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/'s modules import each other by name


class BareInProcess(pl.Callback):
    def __init__(self, logdir: str, steps: int = 60, on_cpu: bool = False, before: bool = False,
                 with_loader: bool = False, during: list[int] | None = None, during_steps: int = 20,
                 profile: bool = False, profile_steps: int = 8):
        self.plan = Path(logdir) / "dataset_plan.json"
        self.steps, self.on_cpu = steps, on_cpu  # on_cpu: a check of this code with a tiny config
        self.before, self.with_loader = before, with_loader
        self.during, self.during_steps = sorted(during or []), during_steps
        self.batch_size = 0
        self.profile, self.profile_steps = profile, profile_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.during and trainer.global_step == self.during[0]:  # between two of the run's steps
            self.during.pop(0)
            t0 = time.perf_counter()
            self.measure(trainer, pl_module, self.batch_size, f"bare in process (step {trainer.global_step})",
                         steps=self.during_steps, wait_writes=False)
            print(f"bare in process (step {trainer.global_step}) took {time.perf_counter() - t0:.3f} s", flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.before:  # the host's speed drifts within a process too: the baseline on both sides of the run
            self.measure(trainer, pl_module, trainer.datamodule.batch_size, "bare in process (before)")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.batch_size = max(self.batch_size, len(batch["caption"]))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.measure(trainer, pl_module, self.batch_size, "bare in process", profile=self.profile)
        if self.with_loader:  # A, B, A: the bare step, with the run's loader, without again
            self.measure(trainer, pl_module, self.batch_size, "bare in process (with the loader)", loader=True)
            self.measure(trainer, pl_module, self.batch_size, "bare in process (again)")

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, n: int, label: str,
                loader: bool = False, steps: int | None = None, wait_writes: bool = True,
                profile: bool = False) -> None:
        from common import CAPTIONS, our_step
        from profiling import profile as torch_profile
        from phase_probe import Phases
        from thread_probe import Sample
        from train_step import bucket_steps

        if not (torch.cuda.is_available() or self.on_cpu):
            print(f"{label}: not run (no GPU; on_cpu: true runs it)", flush=True)
            return
        writes = getattr(trainer.strategy.checkpoint_io, "wait", None)
        if writes is not None and wait_writes:  # the last checkpoint's background write would share the host
            writes()
        steps = steps or self.steps
        pl_module.train()
        model = pl_module
        batch = {"tokens": model.cond_stage_model.tokenize(CAPTIONS[:n]).to(model.device), "caption": CAPTIONS[:n]}
        inner = our_step(model, batch, [], lr=0.0, opt=trainer.optimizers[0])
        step = bucket_steps(inner, batch, str(self.plan), n)
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        if loader:  # the run's training loader (its workers, the pinning thread) beside each step, its batch
            batches = iter(trainer.datamodule.train_dataloader())  # moved to the GPU and dropped
            plain = step

            def step() -> None:
                for value in next(batches).values():
                    if isinstance(value, torch.Tensor):
                        value.to(model.device, non_blocking=True)
                plain()
            step.buckets = plain.buckets
        for _ in range(3 * step.buckets + 2):  # bucket_steps' three passes (graphs: recorded) first
            step()
        sync()
        inner.phases = Phases()
        threads = Sample()
        threads.begin()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        dt = time.perf_counter() - t0
        threads = threads.end(steps)
        phases, inner.phases = inner.phases.summary(), None
        memory = {"reserved_GiB": round(torch.cuda.memory_reserved() / 2**30, 2)} if torch.cuda.is_available() else {}
        print(f"{label}: " + json.dumps({
            "batch": n, "steps": steps, "img_per_s": round(n * steps / dt, 2),
            "ms_per_step": round(1000 * dt / steps, 1), **memory, "phases": phases,
            "threads": threads}), flush=True)
        if profile and torch.cuda.is_available():
            print(f"== step profile: {label}", flush=True)
            torch_profile(step, steps=self.profile_steps, dump=str(self.plan.parent / "step_profile_bare.json"))
