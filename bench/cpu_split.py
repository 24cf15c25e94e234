"""A callback for bench runs of main.py: does sharing cores with the loader workers slow the
host-bound training thread? (issue: performance, target 2)

    lightning: {callbacks: {cpu_split: {target: bench.cpu_split.CpuSplit, params: {main_cores: 2}}}}

At the first training batch (the loader's workers exist by then) it puts every thread of main.py's
process (the training thread, autograd's device thread, the pin-memory and writer threads) on
the first `main_cores` physical cores, with their SMT siblings, and every child process (the
loader workers) on the other cores, so that no worker runs on a core, or a hyperthread of a
core, the step's host work runs on.
Prints `cpu split: {...}`. Linux only (sched_setaffinity, /sys topology).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl


def cores(cpus: list[int]) -> list[list[int]]:
    """The usable CPUs grouped by physical core (SMT siblings together), in order."""
    groups: dict[tuple[str, str], list[int]] = {}
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        key = ((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip())
        groups.setdefault(key, []).append(cpu)
    return list(groups.values())


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


class CpuSplit(pl.Callback):
    def __init__(self, main_cores: int = 2):
        self.main_cores = main_cores
        self.done = False

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> Any:
        if self.done:
            return
        self.done = True
        groups = cores(sorted(os.sched_getaffinity(0)))
        main = sorted(c for g in groups[:self.main_cores] for c in g)
        rest = sorted(c for g in groups[self.main_cores:] for c in g)
        if not rest:
            print(f"cpu split: not done ({len(groups)} physical cores, main_cores {self.main_cores})", flush=True)
            return
        tids = [int(t) for t in os.listdir("/proc/self/task")]
        for tid in tids:
            os.sched_setaffinity(tid, main)
        kids = children(os.getpid())
        for pid in kids:
            os.sched_setaffinity(pid, rest)
        print("cpu split: " + json.dumps({"physical_cores": len(groups), "main": main, "workers": rest,
                                          "threads": len(tids), "children": len(kids)}), flush=True)
