"""What shares the host with the training thread? (issue: performance, target 2)

    E2E_OVERRIDES="bench/configs/end_to_end.yaml bench/configs/thread_probe.yaml" bash bench/end_to_end.sh

main.py's steady steps ran 3-15% slower than the bare step in the same process, by an amount
that changed from run to run while the bare step's did not. Over a window of steady steps this
reads, from /proc, without stopping anything:
    threads     CPU ms per step of each thread of this process (the Python name where there is one)
    main        the training thread's voluntary context switches per step (it blocked: waiting for
                the GIL, a lock, the GPU) and involuntary ones (the kernel gave its core to another)
    children    CPU ms per step of the child processes (the loader's workers)
    host        busy cores of the whole machine and the share of time stolen by the hypervisor
bench/bare_in_process.py takes the same sample over the bare step's window, for comparison.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from typing import Any

import pytorch_lightning as pl

TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def _stat(path: str) -> tuple[float, int, int, int]:
    """(CPU ms, processor, voluntary, involuntary context switches) of a task or process."""
    with open(path + "/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # fields 3 (state) onwards
    with open(path + "/status") as f:
        status = f.read()
    switches = [int(re.search(rf"^{kind}_ctxt_switches:\s+(\d+)", status, re.M).group(1))
                for kind in ("voluntary", "nonvoluntary")]
    return (int(fields[11]) + int(fields[12])) * TICK_MS, int(fields[36]), *switches


def _children() -> float:
    """CPU ms of the child processes (their threads included)."""
    me, total = str(os.getpid()), 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[1] == me:
                total += (int(fields[11]) + int(fields[12])) * TICK_MS
        except OSError:  # it ended meanwhile
            pass
    return total


def _host() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of all cores."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return total - idle - iowait - steal, steal, total


def _threads() -> dict[int, tuple[float, int, int, int]]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[int(tid)] = _stat(f"/proc/self/task/{tid}")
        except OSError:
            pass
    return out


def _name(tid: int) -> str:
    for t in threading.enumerate():
        if t.native_id == tid:
            return t.name
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return str(tid)


class Sample:
    """begin() ... end(steps) -> the window's figures per step (see the module docstring)."""

    def begin(self) -> None:
        self.t0, self.threads, self.children, self.host = time.perf_counter(), _threads(), _children(), _host()

    def end(self, steps: int, top: int = 8) -> dict[str, Any]:
        wall, threads, children, host = time.perf_counter() - self.t0, _threads(), _children(), _host()
        main = threading.main_thread().native_id
        per_thread = {tid: (threads[tid][0] - self.threads.get(tid, (0.0,))[0]) / steps for tid in threads}
        busy, steal, total = (b - a for a, b in zip(self.host, host))
        m0, m1 = self.threads.get(main), threads.get(main)
        return {
            "steps": steps, "ms_per_step": round(1000 * wall / steps, 1),
            "threads_cpu_ms_per_step": {f"{_name(tid)}{' (main)' if tid == main else ''}": round(ms, 1)
                                        for tid, ms in sorted(per_thread.items(), key=lambda kv: -kv[1])[:top]},
            "main_switches_per_step": None if not (m0 and m1) else
            {"voluntary": round((m1[2] - m0[2]) / steps, 1), "involuntary": round((m1[3] - m0[3]) / steps, 1),
             "last_cpu": m1[1]},
            "children_cpu_ms_per_step": round((children - self.children) / steps, 1),
            "host_busy_cores": round(busy / total * os.cpu_count(), 2) if total else None,
            "host_steal_share": round(steal / total, 4) if total else None,
        }


class ThreadProbe(pl.Callback):
    """Samples optimizer steps [start, start + steps) of the first epoch's steady part."""

    def __init__(self, start: int = 100, steps: int = 40):
        self.start, self.steps = start, steps
        self.sample: Sample | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self.start:
            self.sample = Sample()
            self.sample.begin()
        elif step == self.start + self.steps and self.sample is not None:
            print("thread probe: " + json.dumps({"from_step": self.start, **self.sample.end(self.steps)}), flush=True)
            self.sample = None
