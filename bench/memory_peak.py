"""What is on the GPU at a training step's peak, grouped by the line of our code that allocated it.

    python bench/memory_peak.py --batch 1 --ckpt --low_memory     # the 6 GiB question
    python bench/memory_peak.py --batch 32                          # same arguments as train_step.py

Records the CUDA caching allocator's history from the model build on, runs warm-up steps and
two more, replays the history to the highest point of those two steps and prints the tensors
alive there, summed by the innermost frame in ldm/ or bench/ (or in torch, if none).
"""
from __future__ import annotations

import argparse
import collections

import torch

from common import emit, setup_cuda
from train_step import ours, step_args


def frame_of(frames: list[dict]) -> str:
    for f in frames:
        if "/ldm/" in f["filename"] or "/bench/" in f["filename"]:
            return f"{f['filename'].split('/')[-2]}/{f['filename'].split('/')[-1]}:{f['line']} {f['name']}"
    return f"{frames[0]['filename'].split('/')[-1]}:{frames[0]['line']} {frames[0]['name']}" if frames else "?"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ckpt", action="store_true")
    p.add_argument("--low_memory", action="store_true")
    p.add_argument("--encode", action="store_true")
    p.add_argument("--text_encoder", action="store_true")
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    setup_cuda()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    step, _ = ours(step_args(**{k: v for k, v in vars(args).items() if k != "rows"}))
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = len(torch.cuda.memory._snapshot()["device_traces"][0])
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    trace = torch.cuda.memory._snapshot()["device_traces"][0]
    torch.cuda.memory._record_memory_history(enabled=None)

    live, current, peak, peak_at = {}, 0, -1, 0
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            current += ev["size"]
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            current -= live.pop(ev["addr"])["size"]
        if i >= start and current > peak:
            peak, peak_at = current, i
    live = {}
    for ev in trace[: peak_at + 1]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
        elif ev["action"] == "free_completed":
            live.pop(ev["addr"], None)
    groups = collections.Counter()
    for ev in live.values():
        groups[frame_of(ev["frames"])] += ev["size"]
    emit({**vars(args), "peak_GiB": round(peak / 2**30, 3), "max_allocated_GiB":
          round(torch.cuda.max_memory_allocated() / 2**30, 3), "trace_events": len(trace)})
    for where, size in groups.most_common(args.rows):
        print(f"{size / 2**30:8.3f} GiB  {where}")


if __name__ == "__main__":
    main()
