"""Does replaying the DDIM loop's UNet calls from a CUDA graph shorten a sample grid, with the
same images, and what memory does it hold? (issue: performance, target 2: the grids are most
of main.py's pauses)

    python bench/sample_graph.py                 # SD 1.x size, random weights, one GPU

As the shipped fine-tune config trains and samples (batch 6, checkpointing, the VAE in the
step, cuDNN benchmark off): a few training steps first, so the allocator holds what training
holds; then grids of 6 images at 512 px (40 DDIM steps, guidance, fp32 decode), eager and
graphed, alternating, each shape's first call and a repeat; the largest difference between
the two paths' latents; the memory reserved after each; and training steps after the grids.
One JSON line per part.
"""
from __future__ import annotations

import argparse
import time

import torch

from common import CAPTIONS, emit, our_model, our_step
from ldm.callbacks.image_logger import sampling_mode  # noqa: E402 (common puts the repo on sys.path)
from ldm.models.diffusion import cuda_graph  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.models.diffusion.txt2img import txt2img  # noqa: E402

GiB = 2**30


def seconds(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/stable-diffusion/v1-finetune_everydream.yaml")
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--train_steps", type=int, default=5)
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = False  # as the shipped configs train and sample
    model = our_model(args.config, use_checkpoint=True)
    model.noise_rng = torch.Generator(device="cuda").manual_seed(0)
    batch = {"image": torch.rand(args.images, 3, 512, 512, device="cuda") * 2 - 1,
             "caption": CAPTIONS[:args.images]}
    train = our_step(model, batch, [q for q in model.model.parameters() if q.requires_grad], 1e-6)

    def train_steps(label: str) -> None:
        dt, _ = seconds(lambda: [train() for _ in range(args.train_steps)])
        emit({"part": f"training steps, {label}", "ms_per_step": round(1000 * dt / args.train_steps, 1),
              "reserved_GiB": round(torch.cuda.memory_reserved() / GiB, 2),
              "peak_GiB": round(torch.cuda.max_memory_allocated() / GiB, 2)})

    train()
    train_steps("before any grid")
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    prompts, seeds = CAPTIONS[:args.images], list(range(args.images))
    for side in (512, 448):  # a second shape: the first call at a new shape pays cuDNN's plans
        for graph in (False, True, False, True):
            torch.cuda.reset_peak_memory_stats()
            with sampling_mode(model):
                dt, _ = seconds(lambda: txt2img(model, prompts, seeds, height=side, width=side, steps=args.steps,
                                                autocast=autocast(), cuda_graph=graph))
            emit({"part": "txt2img (the ImageLogger's grid)", "side": side, "cuda_graph": graph, "s": round(dt, 3),
                  "reserved_GiB": round(torch.cuda.memory_reserved() / GiB, 2),
                  "peak_GiB": round(torch.cuda.max_memory_allocated() / GiB, 2)})
    with sampling_mode(model), autocast():
        cond = model.get_learned_conditioning(prompts)
        uncond = model.get_learned_conditioning([""])
        shape = (args.images, model.channels, 64, 64)
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        z = {}
        for graph in (False, True):
            dt, z[graph] = seconds(lambda: DDIMSampler(model).sample(cond, uncond, shape, steps=args.steps, x_T=x_T,
                                                                     cuda_graph=graph))
            emit({"part": "DDIM loop alone", "cuda_graph": graph, "s": round(dt, 3)})
        emit({"part": "latents, graphed vs eager", "max_abs_diff": float((z[True] - z[False]).abs().max()),
              "equal": bool(torch.equal(z[True], z[False])), "max_abs": float(z[False].abs().max()),
              "recording_failed": cuda_graph._failure})
    train_steps("after the grids")


if __name__ == "__main__":
    main()
