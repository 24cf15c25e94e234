"""Does `model.params.channels_last` train as the plain layout does, on the GPU? The full fine-tune
(batch 8, fp32 weights, fused AdamW) from the same weights and random numbers: plain, plain
again (the run-to-run noise of cuDNN's kernels), and channels-last; eager, then with
`--compile` plain and channels-last compiled. One JSON line: each run's losses, how far the
weights moved, and how far each run's update differs from the first plain run's.

    python bench/channels_last_check.py [--steps 8] [--compile]
"""
from __future__ import annotations

import argparse

from common import emit, setup_cuda
from cudagraphs_check import rel, seeded_run
from train_step import step_args


def train(channels_last: bool, compile: bool, steps: int):
    args = step_args(batch=8, channels_last=channels_last)
    return seeded_run(args, steps, compile, unet_only=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    setup_cuda()
    runs = {"plain": (False, False), "plain_again": (False, False), "channels_last": (True, False)}
    if args.compile:
        runs.update(compiled=(False, True), compiled_channels_last=(True, True))
    results = {name: train(cl, comp, args.steps) for name, (cl, comp) in runs.items()}
    _, start, end = results["plain"]
    assert all(rel(s, start) == 0 for _, s, _ in results.values()), "the runs did not start from the same weights"
    moved = {n: end[n] - start[n] for n in end}
    record = {f"losses_{name}": [round(x, 6) for x in losses] for name, (losses, _, _) in results.items()}
    record["weights_moved_rel"] = rel(end, start)
    for name, (_, _, e) in results.items():
        if name != "plain":
            record[f"update_diff_{name}_rel"] = rel({n: e[n] - start[n] for n in e}, moved)
    emit(record)


if __name__ == "__main__":
    main()
