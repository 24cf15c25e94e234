"""The UNet's skip concatenation and 2x upsampling, kept in NHWC memory while compiling.

With `model.params.channels_last` the convolutions read and write NHWC (channels-last) maps,
and cuDNN's convolution backward copies any gradient that arrives in another layout to NHWC
first. Two of the UNet's operations hand their convolutions such gradients in the compiled
step:

- the skip concatenation: its backward slices the channels of the NHWC gradient, a view that
  is neither NHWC- nor NCHW-contiguous (in SD 1.x, 8 convolutions behind the output blocks'
  inputs);
- nearest 2x upsampling: the decomposition torch.compile traces scatters the gradient into a
  new NCHW map (6 convolutions: the two behind each Upsample's input).

Here the concatenation's backward returns NHWC slices and the upsampling is a broadcast of
the NHWC memory, whose backward is a sum over each 2x2 block; inductor fuses both into the
kernels around them (the SD 1.x step at batch 32 ran 1.016x faster, doc/performance/step.md,
thirty-third session). Eager mode (where the concatenation's copy would only move, and torch's
upsampling kernels keep NHWC) and NCHW maps take torch's own operations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def compiling_nhwc(x: torch.Tensor) -> bool:
    """Whether `x` is a 4-d map in NHWC memory inside torch.compile (not one that is both NHWC-
    and NCHW-contiguous, as a map with one channel or one pixel is)."""
    return (torch.compiler.is_compiling() and x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))


class _CatChannels(torch.autograd.Function):
    """torch.cat([a, b], dim=1) whose gradients are NHWC-contiguous, not channel slices."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.split = a.shape[1]
        return torch.cat([a, b], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nhwc = torch.channels_last
        return (grad[:, :ctx.split].contiguous(memory_format=nhwc),
                grad[:, ctx.split:].contiguous(memory_format=nhwc))


def cat_channels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, Ca, H, W], [B, Cb, H, W] -> [B, Ca + Cb, H, W]: the output blocks' skip concatenation."""
    if compiling_nhwc(a) and compiling_nhwc(b):
        return _CatChannels.apply(a, b)
    return torch.cat([a, b], dim=1)


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, 2H, 2W], each value repeated over a 2x2 block (nearest neighbour)."""
    if not compiling_nhwc(x):
        return F.interpolate(x, scale_factor=2, mode="nearest")
    b, c, h, w = x.shape
    x = x.permute(0, 2, 3, 1)[:, :, None, :, None, :]  # [B, H, 1, W, 1, C], the NHWC memory
    x = x.expand(b, h, 2, w, 2, c).reshape(b, 2 * h, 2 * w, c)  # [B, 2H, 2W, C]
    return x.permute(0, 3, 1, 2)  # [B, C, 2H, 2W] in NHWC memory
