"""GroupNorm of NHWC maps in eager mode: Triton's kernels (group_norm_nhwc) against torch's on
the same map in NCHW, and against torch's on NHWC (copies in and out), at the SD 1.x UNet's
and VAE encoder's shapes; forward and backward in bf16, and each path's largest difference
from a float32 reference (doc/PERFORMANCE.md).

    python bench/group_norm_nhwc.py [--batch 6]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from common import gpu_ms
from ldm.modules.diffusionmodules.triton_group_norm import group_norm_nhwc  # noqa: E402 (common: repo on sys.path)

SHAPES = [  # (channels, side): UNet at 512 px (latents 64x64), its concatenations, the VAE encoder at 512 px
    (320, 64), (640, 32), (1280, 16), (1280, 8), (960, 64), (2560, 16), (128, 512), (256, 256), (512, 64)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=6)
    args = p.parse_args()
    torch.manual_seed(0)
    for c, side in SHAPES:
        x32 = torch.randn(args.batch, c, side, side, device="cuda") * 2 + 0.5
        w32, b32 = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
        dy32 = torch.randn_like(x32)
        w, b = w32.bfloat16(), b32.bfloat16()
        x_nchw = x32.bfloat16().requires_grad_()
        x_nhwc = x32.bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()
        dy_nchw, dy_nhwc = dy32.bfloat16(), dy32.bfloat16().contiguous(memory_format=torch.channels_last)

        ref_x = x32.bfloat16().float().requires_grad_()  # the bf16 values, normalised in float32
        ref = F.group_norm(ref_x, 32, w.float(), b.float(), 1e-5)
        ref_dx, = torch.autograd.grad(ref, ref_x, dy_nchw.float())
        row = {"shape": [args.batch, c, side, side]}
        paths = {"torch_nchw": (x_nchw, dy_nchw, lambda x: F.group_norm(x, 32, w, b, 1e-5)),
                 "torch_nhwc": (x_nhwc, dy_nhwc, lambda x: F.group_norm(x, 32, w, b, 1e-5)),
                 "triton_nhwc": (x_nhwc, dy_nhwc, lambda x: group_norm_nhwc(x, 32, w, b, 1e-5))}
        for name, (x, dy, norm) in paths.items():
            y = norm(x)
            dx, = torch.autograd.grad(y, x, dy)
            row[name + "_max_diff"] = [round((y.float() - ref).abs().max().item(), 4),
                                       round((dx.float() - ref_dx).abs().max().item(), 4)]
            row[name + "_ms"] = [round(gpu_ms(lambda: norm(x.detach())), 3),  # forward, then forward + backward
                                 round(gpu_ms(lambda: torch.autograd.grad(norm(x), x, dy)), 3)]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
