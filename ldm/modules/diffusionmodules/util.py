"""Small building blocks shared by the diffusion UNet.

- `timestep_embedding`: the sinusoidal embedding of the diffusion step t.
- `zero_module`: zero a layer's parameters so a residual branch starts as identity.
- `normalization`: GroupNorm with 32 groups, statistics in float32 (NHWC maps stay NHWC when compiled).
- `autocast_dtype`: the dtype a norm runs in under autocast.
- `checkpoint`: activation checkpointing that only kicks in while training.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ldm.modules.diffusionmodules import triton_group_norm
from ldm.modules.diffusionmodules.nhwc import compiling_nhwc


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


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a norm of `x` runs in: autocast's dtype (bf16, fp16) when autocast is on for
    x's device and `x` already has it, else float32.

    Autocast runs group_norm and layer_norm in float32 on a GPU: the bf16 input is copied to
    float32 and the float32 output cast back by every product that reads it. torch's norm
    kernels accumulate the statistics in float32 whatever the input's dtype, so the round trip
    buys no precision; for SD 1.x's UNet at batch 32 it cost 32 ms of a 332 ms eager step and
    7.7 GiB of float32 copies kept for the backward (doc/PERFORMANCE.md). The weight and
    bias are cast as autocast casts every product's weights (torch's GPU kernels take no
    float32 weight with a bf16 input).
    """
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype == torch.get_autocast_dtype(device):
        return x.dtype
    return torch.float32


def _cast(p: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if p is None else p.to(dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with its statistics in float32, returning the input's dtype; `forward(x,
    silu=True)` is F.silu of it (a ResBlock's norm and activation, fused where the kernels allow).

    Statistics over large feature maps lose precision in fp16/bf16 arithmetic. Outside
    autocast the input, weight and bias are upcast, whatever dtype the module was cast to;
    under autocast a bf16/fp16 input is normalised in its dtype by torch's kernel, which
    accumulates in float32 (`autocast_dtype`). Float32 statistics of few large groups with
    nothing to differentiate (a one-image VAE decode) take `group_norm_few_rows`; NHWC maps on
    a GPU (`model.params.channels_last`) take Triton's `group_norm_nhwc`, SiLU included: in eager
    mode as an autograd Function, inside torch.compile as the operator `ldm::group_norm_nhwc`
    (1.044-1.049x inductor's kernels for the batch-32 step: doc/performance/step.md,
    thirty-fifth session). `triton_when_compiled = False` (a class switch for the benches) gives
    compiled maps inductor's kernels for `group_norm_channels_last`, as on builds without Triton.
    """

    triton_when_compiled = True

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        if compiling_nhwc(x):
            if self.triton_when_compiled and triton_group_norm.qualifies_compiled(x):
                return triton_group_norm.group_norm_nhwc_op(x, self.num_groups, self.weight, self.bias, self.eps, silu)
            # inductor fuses the float32 round trip into the norm's kernels
            y = group_norm_channels_last(x.float(), self.num_groups, _cast(self.weight, torch.float32),
                                         _cast(self.bias, torch.float32), self.eps).to(x.dtype)
        elif triton_group_norm.qualifies(x) and not torch.compiler.is_compiling():
            # NHWC in eager mode: torch's kernel would copy x to NCHW (and the next convolution back)
            return triton_group_norm.group_norm_nhwc(x, self.num_groups, self.weight, self.bias, self.eps, silu)
        else:
            y = self._group_norm(x)
        return F.silu(y) if silu else y

    def _group_norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = autocast_dtype(x)
        if dtype == torch.float32 and few_rows(x, self.num_groups, self.weight):
            return group_norm_few_rows(x.float(), self.num_groups, _cast(self.weight, dtype), _cast(self.bias, dtype),
                                       self.eps).to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x.to(dtype), self.num_groups, _cast(self.weight, dtype), _cast(self.bias, dtype),
                                self.eps).to(x.dtype)


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


GROUP_NORM_FEW_ROWS = 128  # batch x groups below this, on maps of at least
GROUP_NORM_LARGE_MAP = 1 << 23  # values per sample (128 x 256 x 256): group_norm_few_rows


def few_rows(x: torch.Tensor, groups: int, weight: torch.Tensor | None) -> bool:
    """Whether GroupNorm32 takes group_norm_few_rows: on the GPU, fewer than GROUP_NORM_FEW_ROWS
    (sample, group) rows of a map of at least GROUP_NORM_LARGE_MAP values per sample (on
    smaller ones its several small kernels cost more than torch's one), contiguous NCHW, and
    nothing to differentiate."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
    return (x.is_cuda and x.shape[0] * groups < GROUP_NORM_FEW_ROWS and math.prod(x.shape[1:]) >= GROUP_NORM_LARGE_MAP
            and x.is_contiguous() and not needs_grad)


def group_norm_few_rows(x: torch.Tensor, groups: int, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """F.group_norm for few, large groups, without gradients (a VAE decode of one image: 32
    groups of up to 1M values each).

    torch's CUDA kernel reduces each (sample, group) in one thread block, so 32 of them keep 32
    of an H200's 132 multiprocessors busy: 0.94 ms for a 512 px decode's 128 x 512 x 512 map in
    float32, against 0.19 ms here (doc/PERFORMANCE.md). torch.var_mean spreads a long row over
    many blocks, and the weight and bias fold into one scale and shift per channel: one pass
    over x.

    x: [B, C, *] contiguous -> [B, C, *].
    """
    b, c = x.shape[:2]
    var, mean = torch.var_mean(x.reshape(b, groups, -1), dim=-1, unbiased=False)  # [B, G]
    scale = torch.rsqrt(var + eps).repeat_interleave(c // groups, dim=1)  # [B, C]
    if weight is not None:
        scale = scale * weight
    shift = -mean.repeat_interleave(c // groups, dim=1) * scale
    if bias is not None:
        shift = shift + bias
    per_channel = (b, c) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(per_channel), x, scale.view(per_channel))


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
