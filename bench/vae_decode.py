"""The sample grid's VAE decodes (issue: performance, target 2): one 512 px image at a time in
bf16, as txt2img decodes, against the decoder's FLOPs, and the layouts and settings that might
make it faster.

    python bench/vae_decode.py [--profile]

The SD decoder at 512 x 512 is ~2.4 TFLOP (3x3 convolutions at 64..512 px, 512..128 channels):
~5 ms at 500 TFLOP/s. The grid probe measured ~23-26 ms per decode (twentieth session).
Prints one JSON line per variant: ms per decode (median of 10 after 3 warm-up calls), and for
the two norm variants the peak of allocated memory above the weights.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from common import ROOT, emit
from profiling import profile
from torch.utils.flop_counter import FlopCounterMode

DEVICE = "cuda"
CONFIG = "configs/stable-diffusion/v1-finetune_everydream.yaml"


def decoder() -> torch.nn.Module:
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    cfg = OmegaConf.load(ROOT / CONFIG).model.params.first_stage_config
    with torch.device(DEVICE):
        vae = instantiate_from_config(cfg)
    return vae.to(torch.bfloat16).eval().requires_grad_(False)


def timed(call, reps: int = 10) -> float:
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    timed.base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", action="store_true", help="the kernels of one decode, as txt2img runs it")
    parser.add_argument("--profile_rows", type=int, default=25)
    args = parser.parse_args()
    vae = decoder()
    z = torch.randn(1, 4, 64, 64, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        with FlopCounterMode(display=False) as flops:
            vae.decode(z)
        tflop = flops.get_total_flops() / 1e12
        emit({"decoder_tflop_512px": round(tflop, 3)})
        for benchmark in (False, True):  # sampling turns cuDNN's benchmark off
            torch.backends.cudnn.benchmark = benchmark
            ms = timed(lambda: vae.decode(z))
            emit({"variant": "NCHW, one image", "cudnn_benchmark": benchmark, "ms": round(ms, 2),
                  "tflops": round(tflop / ms * 1000, 1)})
            six = z.expand(6, -1, -1, -1).contiguous()
            ms = timed(lambda: vae.decode(six)) / 6
            emit({"variant": "NCHW, six at once", "cudnn_benchmark": benchmark, "ms_per_image": round(ms, 2)})
        torch.backends.cudnn.benchmark = False
        for name, context in (("NCHW, one image, norms on float32 copies (as txt2img decodes)", nullcontext),
                              ("NCHW, one image, under bf16 autocast: norms in bf16 (a probe)",
                               lambda: torch.autocast("cuda", dtype=torch.bfloat16))):
            def decode(context=context):
                with context():
                    return vae.decode(z)
            ms = timed(decode)
            emit({"variant": name, "ms": round(ms, 2), "peak_above_weights_MiB":
                  round((torch.cuda.max_memory_allocated() - timed.base) / 2**20)})
        vae_cl = vae.to(memory_format=torch.channels_last)
        z_cl = z.contiguous(memory_format=torch.channels_last)
        ms = timed(lambda: vae_cl.decode(z_cl))
        emit({"variant": "channels-last weights and input, one image", "cudnn_benchmark": False, "ms": round(ms, 2)})
        vae.to(memory_format=torch.contiguous_format)
        if args.profile:
            profile(lambda: vae.decode(z), steps=3, rows=args.profile_rows)


if __name__ == "__main__":
    main()
