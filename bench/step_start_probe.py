"""What the host does at the start of a training step, before the UNet's first kernel: the
text-encoder cache's lookup (one torch.stack) took ~3 ms of host time there in a profile of the
compiled batch-32 step, against ~0.02-0.04 ms alone (bench/stack_host.py), and the GPU then
waited ~3.5 ms for the UNet's first kernel. Times the lookup in the step, as it is and with the
GPU synchronized first, with the allocator's counters.

    python bench/step_start_probe.py [--compile] [--batch 32]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import setup_cuda
from train_step import ours, step_args


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="the shipped compiled row: compile + channels_last")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    setup_cuda()
    torch.backends.cudnn.benchmark = False
    args = step_args(batch=a.batch, compile=a.compile, channels_last=a.compile, master=True)
    step, compile_all, model = ours(args, with_model=True)
    step()
    if a.compile:
        compile_all()
    cache = model.text_cache
    lookup = cache.lookup
    times: list[float] = []
    mode = {"sync": False}

    def timed(captions):
        if mode["sync"]:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = lookup(captions)
        times.append(1000 * (time.perf_counter() - t0))
        return out
    cache.lookup = timed
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    for sync in (False, True, False):
        mode["sync"] = sync
        times.clear()
        before = torch.cuda.memory_stats()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / a.steps
        after = torch.cuda.memory_stats()
        counters = {k: after.get(k, 0) - before.get(k, 0) for k in
                    ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")}
        print(f"sync before lookup {sync}: lookup host median {statistics.median(times):.3f} ms, "
              f"max {max(times):.3f}; step {1000 * dt:.1f} ms; allocator {counters}", flush=True)


if __name__ == "__main__":
    main()
