"""`make demo`: the whole workflow on a tiny model, on CPU, in a few minutes.

1. writes a small captioned dataset of "meebs" (file-name captions, mixed aspect ratios,
   one image with transparency) to logs/demo-data/meebs;
2. runs the normal training command on it:
       python main.py --base configs/tiny/finetune-demo.yaml -t -n demo --data_root logs/demo-data/meebs
3. prunes the last checkpoint with prune_ckpt.py, and prints where everything is.

The tiny model starts from random weights here; see doc/ARCHITECTURE.md.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = "configs/tiny/finetune-demo.yaml"


def main() -> int:
    from ldm.prune import prune_checkpoint
    from ldm.train import main as train_main
    from scripts.make_shapes import make_meebs

    logs = ROOT / "logs"
    data = logs / "demo-data" / "meebs"
    if not data.is_dir():
        make_meebs(data, count=60, size=64, seed=0)
    print(f"demo data: {len(list(data.glob('*.png')))} images in {data}")

    before = set(logs.glob("*_demo"))
    t0 = time.perf_counter()
    argv = ["--base", str(ROOT / CONFIG), "-t", "-n", "demo", "--data_root", str(data), "-l", str(logs)]
    print("running: python main.py " + " ".join(argv))
    rc = train_main(argv)
    if rc != 0:
        return rc
    run = max(set(logs.glob("*_demo")) - before)
    report = prune_checkpoint(run / "checkpoints" / "last.ckpt", safetensors=True)
    print(report.summary())
    print(f"\nDemo finished in {time.perf_counter() - t0:.0f} s. Run folder: {run}\n"
          f"  checkpoints:   {run / 'checkpoints'}\n"
          f"  sample grids:  {run / 'images' / 'train'}\n"
          f"  data plan:     {run / 'dataset_plan.json'}\n"
          f"  pruned model:  {report.dst}\n"
          f"  TensorBoard:   .venv/bin/tensorboard --logdir {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
