"""Small building blocks shared by the diffusion UNet.

- `timestep_embedding`: the sinusoidal embedding of the diffusion step t.
- `zero_module`: zero a layer's parameters so a residual branch starts as identity.
- `normalization`: GroupNorm with 32 groups, computed in float32 (NHWC maps stay NHWC when compiled).
- `checkpoint`: activation checkpointing that only kicks in while training.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of diffusion steps, laid out as [cos | sin].

    timesteps: [B] (integer or fractional steps) -> [B, dim] float32.
    Frequency i of the dim/2 frequencies is max_period ** (-i / (dim/2)); the first
    half of the output holds the cosines and the second half the sines. Released
    Stable Diffusion weights (time_embed.0) were trained on exactly this layout.
    """
    if dim % 2:
        raise ValueError(f"timestep_embedding: dim must be even, got {dim}")
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)  # [half]
    args = timesteps.float()[:, None] * freqs[None, :]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` to zero and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that normalises in float32 and returns the input's dtype.

    Statistics over large feature maps lose precision in fp16/bf16, so the input,
    weight and bias are all upcast, whatever dtype the module was cast to.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        if torch.compiler.is_compiling() and x.dim() == 4 and not x.is_contiguous() \
                and x.is_contiguous(memory_format=torch.channels_last):
            return group_norm_channels_last(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def group_norm_channels_last(x: torch.Tensor, groups: int, weight: torch.Tensor | None,
                             bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """F.group_norm of an NHWC feature map that stays NHWC (model.params.channels_last).

    The decomposition torch.compile traces for F.group_norm on a GPU copies the input to NCHW
    first, so the compiled step hands each convolution behind a norm an NCHW gradient and
    cuDNN copies it back to NHWC: ~10 ms of a 235 ms SD 1.x step at batch 32 (doc/PERFORMANCE.md).
    Here every operation works on views of the NHWC memory. Used only while compiling: eager,
    these separate operations keep several float32 copies of the map for the backward (11 GiB
    more at batch 32) where torch's own kernel keeps one.

    x: [B, C, H, W] in NHWC memory -> [B, C, H, W] in NHWC memory.
    """
    xg = x.unflatten(1, (groups, x.shape[1] // groups))  # [B, G, C/G, H, W], a view
    var, mean = torch.var_mean(xg, dim=(2, 3, 4), unbiased=False, keepdim=True)  # [B, G, 1, 1, 1]
    x = ((xg - mean) * torch.rsqrt(var + eps)).flatten(1, 2)  # [B, C, H, W], NHWC
    if weight is not None:
        x = x * weight[:, None, None]
    if bias is not None:
        x = x + bias[:, None, None]
    return x


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """The UNet's norm layer: 32-group GroupNorm over `channels` (a multiple of 32)."""
    return GroupNorm32(32, channels, eps=eps)


def checkpoint(fn: Callable[..., Any], *args: Any, enabled: bool) -> Any:
    """Call `fn(*args)`, recomputing its activations in backward when `enabled`.

    Checkpointing only applies while autograd records (training); under
    `torch.no_grad()` it would only cost time, so `fn` is called directly.
    Uses the non-reentrant implementation, which keeps the RNG state (dropout
    masks match between forward and recompute) and the autocast state.
    """
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
