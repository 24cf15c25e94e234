"""Images/s of a main.py run over its logged steps, everything between them included
(data loading, validation, sample grids, checkpoints): from the TensorBoard events' wall times.

    python bench/end_to_end_report.py logs/<stamp>_e2e --batch 6 [--skip 20]

`--skip`: steps left out at the start (cuDNN benchmarking of the first bucket shapes).
Prints one JSON line. `steady_img_per_s` is the median rate between consecutive logged steps
(the plain training steps); `pauses` lists the intervals that took over 1.5x the median, with the
seconds they added (sample grids, validation, checkpoint copies), summed in `pause_seconds`."""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path)
    p.add_argument("--batch", type=int, required=True, help="images per step (data.params.batch_size x GPUs)")
    p.add_argument("--skip", type=int, default=20)
    args = p.parse_args()
    acc = EventAccumulator(str(args.run))
    acc.Reload()
    events = [e for e in acc.Scalars("train/loss_step") if e.step >= args.skip]
    if len(events) < 2:
        raise SystemExit(f"{args.run}: fewer than two train/loss_step events after step {args.skip}")
    first, last = events[0], events[-1]
    steps, seconds = last.step - first.step, last.wall_time - first.wall_time
    rates = [(b.step - a.step, b.wall_time - a.wall_time, b.step) for a, b in zip(events, events[1:])]
    per_step = statistics.median(dt / n for n, dt, _ in rates)
    pauses = [(step, round(dt - n * per_step, 1)) for n, dt, step in rates if dt > 1.5 * n * per_step]
    print(json.dumps({
        "impl": "main.py", "batch": args.batch, "steps": steps, "from_step": first.step, "to_step": last.step,
        "seconds": round(seconds, 1), "img_per_s": round(steps * args.batch / seconds, 2),
        "steady_img_per_s": round(args.batch / per_step, 2), "pause_seconds": round(sum(p for _, p in pauses), 1),
        "pauses": pauses,
        "checkpoints": len(list((args.run / "checkpoints").glob("*.ckpt"))),
        "sample_grids": len(list((args.run / "images").rglob("*.png"))),
    }))


if __name__ == "__main__":
    main()
