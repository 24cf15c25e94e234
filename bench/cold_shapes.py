"""What does the first call at a new shape cost? (issue: performance, target 2)

    python bench/cold_shapes.py                 # SD 1.x size, random weights, one GPU
    python bench/cold_shapes.py --grid --backend flash   # the grid's batch, with one SDPA kernel

bench/sample_grid.py measured a sample grid at 7.4 s the first time and 2.6 s the second,
and validation's loss at 0.58 s the first time and 0.08 s after: an end-to-end run meets new
shapes at every aspect bucket, validation batch and grid. This times the UNet's no-grad
forward (bf16 autocast, cuDNN benchmark off as the shipped configs) at a few latent shapes
and batch sizes, first and second call, then prints the host ops of one more first call.

`--grid`: instead, the sample grid's UNet batch (12: six images with guidance) at three
bucket shapes, first call, second call and the mean of the next 10, with the weights in bf16
as main.py's default optimizer keeps them; `--backend` restricts scaled_dot_product_attention
to one kernel (the first call's cost at a new shape is mostly cuDNN building its attention
graphs; flash and memory-efficient build none). Run each backend in a process of its own: the
convolutions' plans are kept per process.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import CAPTIONS, emit, our_model, setup_cuda


def forward(model: torch.nn.Module, batch: int, h: int, w: int) -> None:
    z = torch.randn(batch, 4, h, w, device="cuda", dtype=torch.bfloat16)
    context = torch.randn(batch, 77, 768, device="cuda", dtype=torch.bfloat16)
    t = torch.full((batch,), 500, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.apply_model(z, t, context)


def timed(model: torch.nn.Module, batch: int, h: int, w: int, calls: int = 1) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        forward(model, batch, h, w)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls


def grid(model: torch.nn.Module, backend: str) -> None:
    from ldm.optim.master_weights import MasterWeights
    MasterWeights(model.model)  # bf16 weights, as main.py's default optimizer (adamw_master) has them
    kernels = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}
    with sdpa_kernel(kernels[backend]) if backend != "default" else contextlib.nullcontext():
        for h, w in [(64, 64), (48, 80), (56, 72)]:
            first, second = timed(model, 12, h, w), timed(model, 12, h, w)
            emit({"part": "grid UNet forward", "backend": backend, "batch": 12, "latent": f"{h}x{w}",
                  "first_s": round(first, 3), "second_s": round(second, 3),
                  "steady_ms": round(1000 * timed(model, 12, h, w, calls=10), 2)})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--grid", action="store_true", help="the sample grid's batch at three shapes")
    p.add_argument("--backend", default="default", choices=["default", "cudnn", "flash", "efficient"])
    args = p.parse_args()
    setup_cuda()
    torch.backends.cudnn.benchmark = False
    model = our_model("configs/stable-diffusion/v1-finetune_everydream.yaml", use_checkpoint=True).eval()
    if args.grid:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model.get_learned_conditioning(CAPTIONS[:2])
        forward(model, 2, 32, 32)  # the process's first UNet call (CUDA's and cuDNN's own start) at another shape
        return grid(model, args.backend)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.get_learned_conditioning(CAPTIONS[:2])
    for batch, h, w in [(16, 64, 64), (16, 72, 56), (6, 64, 64), (2, 80, 48), (2, 64, 64)]:
        for call in (1, 2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            forward(model, batch, h, w)
            torch.cuda.synchronize()
            emit({"part": "UNet no-grad forward", "batch": batch, "latent": f"{h}x{w}", "call": call,
                  "s": round(time.perf_counter() - t0, 3)})
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        forward(model, 16, 88, 48)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))


if __name__ == "__main__":
    main()
