"""What does the first call at a new shape cost? (issue: performance, target 2)

    python bench/cold_shapes.py                 # SD 1.x size, random weights, one GPU

bench/sample_grid.py measured a sample grid at 7.4 s the first time and 2.6 s the second,
and validation's loss at 0.58 s the first time and 0.08 s after: an end-to-end run meets new
shapes at every aspect bucket, validation batch and grid. This times the UNet's no-grad
forward (bf16 autocast, cuDNN benchmark off as the shipped configs) at a few latent shapes
and batch sizes, first and second call, then prints the host ops of one more first call.
"""
from __future__ import annotations

import time

import torch

from common import CAPTIONS, emit, our_model, setup_cuda


def forward(model: torch.nn.Module, batch: int, h: int, w: int) -> None:
    z = torch.randn(batch, 4, h, w, device="cuda", dtype=torch.bfloat16)
    context = torch.randn(batch, 77, 768, device="cuda", dtype=torch.bfloat16)
    t = torch.full((batch,), 500, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.apply_model(z, t, context)


def main() -> None:
    setup_cuda()
    torch.backends.cudnn.benchmark = False
    model = our_model("configs/stable-diffusion/v1-finetune_everydream.yaml", use_checkpoint=True).eval()
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
