"""Images/s of a main.py run over its logged steps, everything between them included
(data loading, validation, sample grids, checkpoints): from the TensorBoard events' wall times.

    python bench/end_to_end_report.py logs/<stamp>_e2e --batch 6 [--skip 20] [--log main.log]

`--skip`: steps left out at the start (cuDNN benchmarking of the first bucket shapes).
Prints one JSON line. `steady_img_per_s` is the median rate between consecutive logged steps
(the plain training steps); `peak_memory_GiB` the highest window peak the run logged
(perf/peak_memory_gib); `pauses` lists the intervals that took over 1.5x the median, with the
seconds they added (sample grids, validation, checkpoint copies), summed in `pause_seconds`.
With `--log` (the output of a run with `lightning.trainer.profiler: simple`), `profile` gives
calls and total seconds of the hooks the pauses are made of; `--intervals` (E2E_INTERVALS=1 in
bench/end_to_end.sh) the ms per step of every interval, to see a slower stretch that is no pause."""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

PROFILED = ("save_checkpoint", "ImageLogger.on_train_batch_end", "ImageLogger.on_train_epoch_end",
            "validation_step", "train_dataloader_next", "optimizer_step", "run_training_epoch")


def profile(log: Path) -> dict[str, list[float]]:
    """{hook: [calls, total seconds]} from the table Lightning's SimpleProfiler prints."""
    rows = {}
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"[0-9.e-]+", cells[3] or "x"):
            for name in PROFILED:
                if cells[0] == name or cells[0].endswith(("." + name, "]" + name)):
                    rows[name] = [int(cells[2]), round(float(cells[3]), 2)]
    return rows


def peak_memory(acc: EventAccumulator) -> float | None:
    """The highest of the Throughput callback's per-window peaks (GiB allocated), if it logged them."""
    if "perf/peak_memory_gib" not in acc.Tags()["scalars"]:
        return None
    return round(max(e.value for e in acc.Scalars("perf/peak_memory_gib")), 2)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path)
    p.add_argument("--batch", type=int, required=True, help="images per step (data.params.batch_size x GPUs)")
    p.add_argument("--skip", type=int, default=20)
    p.add_argument("--log", type=Path, help="main.py's output, for the profiler's table")
    p.add_argument("--exclude_seconds", type=float, default=0.0,
                   help="seconds inside the window that were not main.py's (bare steps run during the run)")
    p.add_argument("--intervals", action="store_true",
                   help="also list each interval between logged steps as [its last step, ms per step]")
    args = p.parse_args()
    acc = EventAccumulator(str(args.run))
    acc.Reload()
    events = [e for e in acc.Scalars("train/loss_step") if e.step >= args.skip]
    if len(events) < 2:
        raise SystemExit(f"{args.run}: fewer than two train/loss_step events after step {args.skip}")
    first, last = events[0], events[-1]
    steps, seconds = last.step - first.step, last.wall_time - first.wall_time - args.exclude_seconds
    rates = [(b.step - a.step, b.wall_time - a.wall_time, b.step) for a, b in zip(events, events[1:])]
    per_step = statistics.median(dt / n for n, dt, _ in rates)
    pauses = [(step, round(dt - n * per_step, 1)) for n, dt, step in rates if dt > 1.5 * n * per_step]
    print(json.dumps({
        "impl": "main.py", "batch": args.batch, "steps": steps, "from_step": first.step, "to_step": last.step,
        "seconds": round(seconds, 1), "img_per_s": round(steps * args.batch / seconds, 2),
        **({"excluded_seconds": args.exclude_seconds} if args.exclude_seconds else {}),
        "steady_img_per_s": round(args.batch / per_step, 2), "pause_seconds": round(sum(p for _, p in pauses), 1),
        "pauses": pauses,
        "peak_memory_GiB": peak_memory(acc),
        "checkpoints": len(list((args.run / "checkpoints").glob("*.ckpt"))),
        "sample_grids": len(list((args.run / "images").rglob("*.png"))),
        **({"profile": profile(args.log)} if args.log else {}),
        **({"intervals": [[step, round(1000 * dt / n)] for n, dt, step in rates]} if args.intervals else {}),
    }))


if __name__ == "__main__":
    main()
