"""Images/s of a main.py run over its logged steps, everything between them included
(data loading, validation, sample grids, checkpoints): from the TensorBoard events' wall times.

    python bench/end_to_end_report.py logs/<stamp>_e2e --batch 6 [--skip 20]

`--skip`: steps left out at the start (cuDNN benchmarking of the first bucket shapes).
Prints one JSON line."""
from __future__ import annotations

import argparse
import json
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
    print(json.dumps({
        "impl": "main.py", "batch": args.batch, "steps": steps, "from_step": first.step, "to_step": last.step,
        "seconds": round(seconds, 1), "img_per_s": round(steps * args.batch / seconds, 2),
        "checkpoints": len(list((args.run / "checkpoints").glob("*.ckpt"))),
        "sample_grids": len(list((args.run / "images").rglob("*.png"))),
    }))


if __name__ == "__main__":
    main()
