"""Where does an epoch end's time go outside the checkpoint? (issue: performance, target 2)

    python bench/sample_grid.py                  # SD 1.x size, random weights, one GPU
    python bench/sample_grid.py --device cpu --config tests/configs/tiny.yaml --size 64   # a smoke run
    python bench/sample_grid.py --logger [--reps 6]    # only txt2img as the SD configs' ImageLogger runs it

The end-to-end run pauses ~4 s for each sample grid (8 images, 40 DDIM steps with guidance)
and ~3 s for an epoch's validation (doc/PERFORMANCE.md). This times the parts of one grid as
the ImageLogger makes it (txt2img under bf16 autocast, the VAE decode in the VAE's precision,
the PNG file and the TensorBoard image), the decode alternatives, and validation_step's loss
(fixed_noise_loss at batch 6) cold and warm. One JSON line per part, seconds per call.
`--logger`: only the grid's txt2img as the shipped SD fine-tune configs run it (DPM-Solver++(2M),
20 steps, the batch's 6 captions, the frozen VAE and text encoder and the UNet in bf16), `--reps`
times after one warm-up call, and their median; with `--profile` the GPU time by kernel of one more
call; and GroupNorm32's few-rows path (group_norm_few_rows) against torch's kernel at a decode's shapes.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from common import CAPTIONS, emit, our_model, setup_cuda
from ldm.callbacks.image_logger import make_grid, sampling_mode  # noqa: E402 (common puts the repo on sys.path)
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.models.diffusion.txt2img import txt2img  # noqa: E402


def timed(name: str, fn: Callable[[], object], device: str, reps: int = 1, **fields) -> object:
    out = None
    for i in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        emit({"part": name, "call": i + 1, "s": round(time.perf_counter() - t0, 3), **fields})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/stable-diffusion/v1-finetune_everydream.yaml")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--logger", action="store_true", help="only txt2img as the SD configs' ImageLogger runs it")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--profile", action="store_true", help="with --logger: the GPU time by kernel")
    args = p.parse_args()
    dev = args.device
    if dev == "cuda":
        setup_cuda()
        torch.backends.cudnn.benchmark = False  # as the shipped configs train
    model = our_model(args.config, use_checkpoint=True, device=dev)
    model.noise_rng = torch.Generator(device=dev).manual_seed(0)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev == "cuda" else contextlib.nullcontext)
    n, side, f = args.images, args.size, 8
    prompts, seeds = CAPTIONS[:n], list(range(n))
    if args.logger:
        logger_grid(model, dev, side, args.reps, args.profile)
        return

    with sampling_mode(model):
        images = timed("txt2img (as the ImageLogger: DDIM + fp32 decode one at a time)",
                       lambda: txt2img(model, prompts, seeds, height=side, width=side, steps=args.steps,
                                       autocast=autocast()), dev, reps=2)
        with autocast():
            cond = model.get_learned_conditioning(prompts)
            uncond = model.get_learned_conditioning([""])
        shape = (n, model.channels, side // f, side // f)
        with autocast():  # as txt2img runs it (outside autocast the UNet would run in fp32)
            z = timed("DDIM loop alone", lambda: DDIMSampler(model).sample(
                cond, uncond, shape, steps=args.steps, generator=torch.Generator().manual_seed(0)), dev, reps=2)
        with autocast():
            timed("UNet forward, batch 2n (one DDIM step)",
                  lambda: model.apply_model(torch.cat([z, z]).to(cond.dtype), torch.full((2 * n,), 500, device=dev),
                                            torch.cat([cond, cond])), dev, reps=3)
        timed("decode fp32, one image at a time", lambda: [model.decode_first_stage(z_i[None]) for z_i in z], dev,
              reps=2)
        timed("decode fp32, batched", lambda: model.decode_first_stage(z), dev, reps=2)
        with autocast():
            timed("decode bf16 autocast, one at a time", lambda: [model.decode_first_stage(z_i[None]) for z_i in z],
                  dev, reps=2)
            timed("decode bf16 autocast, batched", lambda: model.decode_first_stage(z), dev, reps=2)
        grid = timed("make_grid", lambda: make_grid(images), dev)
        timed("PNG file", lambda: grid.save(io.BytesIO(), format="PNG"), dev, reps=2)

        from torch.utils.tensorboard.summary import image
        timed("TensorBoard image summary (PNG encode)", lambda: image("samples", np.asarray(grid), dataformats="HWC"),
              dev, reps=2)

        batch = {"image": torch.rand(6, 3, side, side, device=dev) * 2 - 1, "caption": CAPTIONS[:6],
                 "path": [f"/data/img_{i}.png" for i in range(6)]}
        with autocast():
            timed("validation loss, batch 6 (fixed_noise_loss)", lambda: model.fixed_noise_loss(batch), dev, reps=4)
    if dev == "cuda":
        emit({"peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)})


def logger_grid(model: torch.nn.Module, dev: str, side: int, reps: int, profile: bool = False) -> None:
    """txt2img as the ImageLogger of the SD fine-tune configs runs it, timed `reps` times warm."""
    for part in (model.model, model.first_stage_model, model.cond_stage_model):  # unet_precision: bf16
        part.to(torch.bfloat16)
    def grid() -> None:
        txt2img(model, CAPTIONS[:6], [1234 + j for j in range(6)], height=side, width=side, steps=20,
                sampler="dpmpp_2m", autocast=torch.autocast(dev, dtype=torch.bfloat16))

    seconds = []
    with sampling_mode(model):
        for i in range(reps + 1):
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            grid()
            if dev == "cuda":
                torch.cuda.synchronize()
            if i:  # the first call warms up
                seconds.append(time.perf_counter() - t0)
    emit({"part": "txt2img as the ImageLogger (dpmpp_2m 20 steps, 6 images, bf16)",
          "s": [round(x, 4) for x in seconds], "median_s": round(sorted(seconds)[len(seconds) // 2], 4)})
    from ldm.modules.diffusionmodules import util
    group_norm_few_rows = getattr(util, "group_norm_few_rows", None)  # absent: an A/B without it
    if dev == "cuda" and group_norm_few_rows is not None:  # against torch's kernel, at a 512 px decode's shapes
        for shape in [(1, 512, 64, 64), (1, 512, 256, 256), (1, 256, 512, 512), (1, 128, 512, 512)]:
            x = torch.randn(shape, device=dev) * 3 + 1
            w, b = torch.randn(shape[1], device=dev), torch.randn(shape[1], device=dev)
            ms = {}
            for name, fn in [("torch", F.group_norm), ("few_rows", group_norm_few_rows)]:
                for _ in range(3):
                    fn(x, 32, w, b, 1e-6)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    fn(x, 32, w, b, 1e-6)
                end.record()
                end.synchronize()
                ms[name] = round(start.elapsed_time(end) / 20, 4)
            diff = (group_norm_few_rows(x, 32, w, b, 1e-6) - F.group_norm(x, 32, w, b, 1e-6)).abs().max().item()
            emit({"part": "group norm, fp32", "shape": list(shape), "ms": ms, "max_abs_diff": diff})
    if profile:  # one more call: the kernels' GPU time
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile
        with sampling_mode(model), torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            grid()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)


if __name__ == "__main__":
    main()
