"""Does `compile: reduce-overhead` (the UNet blocks as CUDA graphs) train a full fine-tune as
`compile: true` does? The 12 GiB configuration (batch 6, bf16 UNet, adamw_bf16 stepped in the
backward pass, the text encoder training) from the same weights and the same random numbers,
three times: compiled, compiled again (the run-to-run noise of the GPU's kernels), and with
CUDA graphs. Prints one JSON line: each run's losses and how far the weights moved and
differ at the end.

    python bench/cudagraphs_check.py [--steps 8]
"""
from __future__ import annotations

import argparse
import gc

import torch

from common import emit, setup_cuda
from train_step import ours, step_args


def train(cudagraphs: bool, steps: int) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    args = step_args(text_encoder=True, low_memory=True, batch=6, cudagraphs=cudagraphs)
    return seeded_run(args, steps, compile=True)


def seeded_run(args: argparse.Namespace, steps: int, compile: bool, unet_only: bool = False):
    """`steps` training steps of bench/train_step.py's model for `args`, from the weights of
    seed 0 and the random numbers of seed 1: the losses, and the trained weights (the UNet's
    alone with `unet_only`) at the start and at the end, on the host."""
    torch.manual_seed(0)  # the model's random weights
    step, compile_all, model = ours(args, with_model=True)
    if compile:
        compile_all()
    watched = {n: p for n, p in (model.model if unet_only else model).named_parameters() if p.requires_grad}
    start = {n: p.detach().float().cpu() for n, p in watched.items()}
    torch.manual_seed(1)  # noise, timesteps, stochastic rounding
    losses = [float(step()) for _ in range(steps)]
    end = {n: p.detach().float().cpu() for n, p in watched.items()}
    del step, compile_all, model, watched
    gc.collect()
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return losses, start, end


def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|a - b| / |b| over all the weights."""
    num = sum(float((a[n] - b[n]).square().sum()) for n in a)
    return (num / sum(float(b[n].square().sum()) for n in a)) ** 0.5


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    setup_cuda()
    compiled, start, end = train(False, args.steps)
    again, start2, end2 = train(False, args.steps)
    graphed, start3, end3 = train(True, args.steps)
    assert rel(start2, start) == 0 and rel(start3, start) == 0, "the runs did not start from the same weights"
    moved = {n: end[n] - start[n] for n in end}
    emit({"losses_compiled": compiled, "losses_compiled_again": again, "losses_cudagraphs": graphed,
          "weights_moved_rel": rel(end, start),
          "update_diff_compiled_again_rel": rel({n: end2[n] - start[n] for n in end}, moved),
          "update_diff_cudagraphs_rel": rel({n: end3[n] - start[n] for n in end}, moved)})


if __name__ == "__main__":
    main()
