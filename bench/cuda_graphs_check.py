"""Does `model.params.cuda_graphs` (the UNet's eager forward and backward replayed from CUDA
graphs, one pair per shape) train as the eager step does? The fine-tune configs' step (batch
`--batch`, the VAE in the step, bf16 weights with fp32 masters) on three bucket shapes, from the
same weights and random numbers, three times: eager, eager again (the run-to-run noise of the
GPU's kernels), and with the graphs (the first step eager, then each shape recorded at its first
call and replayed after). Prints one JSON line: each run's losses and recordings, how far the
weights moved and how far the graphed run's update differs from the eager one's. The eager runs
must record nothing (the configs' `auto` is turned off in bench/train_step.py's model).

    python bench/cuda_graphs_check.py [--steps 12] [--batch 2] [--config CONFIG (default: the SD 1.x fine-tune)]
"""
from __future__ import annotations

import argparse
import json
import tempfile

from common import emit, setup_cuda
from ldm.modules.cuda_graphs import GraphedUNet
from cudagraphs_check import rel, seeded_run
from train_step import step_args

BUCKETS = [(512, 512), (640, 384), (384, 640)]  # (height, width) in pixels


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--config", default="configs/stable-diffusion/v1-finetune_everydream.yaml",
                   help="the fine-tune config whose model trains (SD 1.x, SD 2.x, SD 2.x v)")
    args = p.parse_args()
    setup_cuda()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"buckets": [{"height": h, "width": w, "batches": 2} for h, w in BUCKETS]}, f)
    recordings = []  # one entry per shape recorded, by any run
    record = GraphedUNet._record
    GraphedUNet._record = lambda self, *inputs: recordings.append(1) or record(self, *inputs)
    runs, recorded = {}, {}
    for name, graphs in (("eager", False), ("eager_again", False), ("graphs", True)):
        settings = step_args(batch=args.batch, encode=True, master=True, plan=f.name, graphs=graphs,
                             config=args.config)
        before = len(recordings)
        runs[name] = seeded_run(settings, args.steps, compile=graphs, unet_only=True)
        recorded[name] = len(recordings) - before
    (eager, start, end), (again, start2, end2), (graphed, start3, end3) = runs.values()
    assert rel(start2, start) == 0 and rel(start3, start) == 0, "the runs did not start from the same weights"
    moved = {n: end[n] - start[n] for n in end}
    emit({"config": args.config, "recordings": recorded,
          "losses_eager": eager, "losses_eager_again": again, "losses_graphs": graphed,
          "weights_moved_rel": rel(end, start),
          "update_diff_eager_again_rel": rel({n: end2[n] - start[n] for n in end}, moved),
          "update_diff_graphs_rel": rel({n: end3[n] - start[n] for n in end}, moved)})
    assert recorded == {"eager": 0, "eager_again": 0, "graphs": len(BUCKETS)}, f"recordings per run: {recorded}"


if __name__ == "__main__":
    main()
