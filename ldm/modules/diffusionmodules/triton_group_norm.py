"""GroupNorm (and the SiLU after it) of channels-last (NHWC) feature maps in Triton, forward and backward.

torch's CUDA GroupNorm takes NCHW only: an NHWC map is copied to NCHW first, and the
convolution after it copies the NCHW result back to NHWC (cuDNN's kernels on an H100/H200 are
NHWC), forward and backward. With `model.params.channels_last` eager, those copies cost more
than channels-last saved (doc/PERFORMANCE.md). Here the statistics and the normalisation read
and write the NHWC memory as it is: a map [B, C, H, W] in NHWC is a [B, P, C] array (P = H*W),
each group of C/G neighbouring channels.

The kernels and their math: triton_group_norm_kernels.py. Here: how they split a map
(`Tiles`), their launches, and the two ways torch calls them.

`group_norm_nhwc` is eager mode's (an autograd.Function); `group_norm_nhwc_op` is the same
kernels as the torch operator ldm::group_norm_nhwc (a triton_op: inductor traces the launches
into its code), which GroupNorm32 takes inside torch.compile (doc/performance/step.md,
thirty-fifth session). Tests run the kernels on the CPU in Triton's interpreter
(TRITON_INTERPRET=1) against F.group_norm.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from ldm.modules.diffusionmodules import triton_group_norm_kernels as kernels
from ldm.modules.diffusionmodules.triton_group_norm_kernels import triton  # None without Triton

BLOCK_T = 64  # spans per step of the per-group loops (`group_stats`, `group_grads`)


class Tiles(NamedTuple):
    """How the map-sized kernels split [B, P, C]: tiles of `p` positions by `c` channels, one
    program of `warps` warps each; the two that sum over positions (`tile_stats`,
    `tile_grads`) take `span` positions per program (a multiple of `p`), `p` at a time."""
    p: int = 32
    c: int = 128
    warps: int = 4
    span: int = 1024


TILES = Tiles()  # on an H200: SD 1.x UNet norms fastest at batch 32, 0.21 ms off the best at 6 (group_norm_tiles.py)
MIN_PROGRAMS = 256  # ~2 per multiprocessor of an H100/H200: spans shrink below this (`_tiles`)


def qualifies(x: torch.Tensor) -> bool:
    """Whether group_norm_nhwc takes x: Triton, a CUDA tensor, a 4-D map in NHWC memory that
    is not also NCHW-contiguous (then torch's kernel needs no copy)."""
    return (triton is not None and x.is_cuda and x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))


def qualifies_compiled(x: torch.Tensor) -> bool:
    """Whether `group_norm_nhwc_op` takes x inside torch.compile (traced as a fake tensor):
    Triton, a CUDA tensor, 4-D NHWC memory."""
    return (triton is not None and x.is_cuda and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last))


def _tiles(x: torch.Tensor, tiles: Tiles) -> tuple[int, int, int, int, int, int]:
    """(B, P, C, T, span, S) of an NHWC map: T tiles of tiles.p positions and S spans of `span`
    positions per sample. `span` is tiles.span, halved (down to tiles.p) while the summing
    kernels would run fewer than MIN_PROGRAMS programs: at batch 6 spans of 1024 left most of an
    H200's 132 multiprocessors idle on the UNet's smaller maps (doc/performance/step.md)."""
    b, c, h, w = x.shape
    if tiles.span % tiles.p:
        raise ValueError(f"group_norm_nhwc: span {tiles.span} is not a multiple of {tiles.p} positions")
    span, cblocks = tiles.span, triton.cdiv(c, tiles.c)
    while span > tiles.p and span % (2 * tiles.p) == 0 and b * triton.cdiv(h * w, span) * cblocks < MIN_PROGRAMS:
        span //= 2
    return b, h * w, c, triton.cdiv(h * w, tiles.p), span, triton.cdiv(h * w, span)


def _block_cg(c: int, groups: int) -> int:
    return max(triton.next_power_of_2(c // groups), 2)


def _direct(kernel):
    return kernel


def _traced(x: torch.Tensor):
    """How the operators launch: through wrap_triton, so inductor traces the launches. Triton's
    interpreter (the CPU tests) runs a kernel on tensors as they are and cannot take the fake
    tensors torch.compile traces with; there the operators' allocations alone give the outputs'
    shapes and layouts, and the kernels run on real tensors only."""
    if os.environ.get("TRITON_INTERPRET") == "1" and is_fake(x):
        return _Unlaunched()
    return torch.library.wrap_triton


class _Unlaunched:
    """`launch(kernel)[grid](*args)` that launches nothing."""

    def __call__(self, kernel):
        return self

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _forward(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
             silu: bool, launch=_direct, tiles: Tiles | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, group mean [B * groups], group rstd [B * groups]) of an NHWC map; `launch` wraps
    each kernel (wrap_triton inside the operator, so inductor can trace the launches); `tiles`:
    TILES unless given."""
    tiles = tiles or TILES
    b, p, c, t, span, spans = _tiles(x, tiles)
    mean, m2 = (torch.empty((b, spans, c), dtype=torch.float32, device=x.device) for _ in range(2))  # per span
    gmean, rstd = (torch.empty(b * groups, dtype=torch.float32, device=x.device) for _ in range(2))
    cblocks = triton.cdiv(c, tiles.c)
    block = dict(BLOCK_P=tiles.p, BLOCK_C=tiles.c, num_warps=tiles.warps)
    launch(kernels.tile_stats)[(b * spans, cblocks)](x, mean, m2, p, c, spans, SPAN=span, **block)
    launch(kernels.group_stats)[(b * groups,)](mean, m2, gmean, rstd, p, c, spans, groups, eps,
                                               BLOCK_T=BLOCK_T, BLOCK_CG=_block_cg(c, groups), SPAN=span)
    y = torch.empty_like(x)  # NHWC, as x
    launch(kernels.normalize)[(b * t, cblocks)](x, y, weight, bias, gmean, rstd, p, c, t, groups,
                                                HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, **block)
    return y, gmean, rstd


def _backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
              gmean: torch.Tensor, rstd: torch.Tensor, groups: int, silu: bool, input_grad: bool,
              launch=_direct, tiles: Tiles | None = None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(dx or None, and [C] float32 each: the sums over (b, p) of g and of g * xhat, the bias's
    and the weight's gradients)."""
    tiles = tiles or TILES
    dy = dy.contiguous(memory_format=torch.channels_last)
    b, p, c, t, span, spans = _tiles(x, tiles)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, BLOCK_P=tiles.p, BLOCK_C=tiles.c,
                 num_warps=tiles.warps)
    sdy, sdyx = (torch.empty((b, spans, c), dtype=torch.float32, device=x.device) for _ in range(2))  # per span
    cblocks = triton.cdiv(c, tiles.c)
    launch(kernels.tile_grads)[(b * spans, cblocks)](x, dy, weight, bias, gmean, rstd, sdy, sdyx, p, c, spans,
                                                     groups, SPAN=span, **flags)
    dx = None
    if input_grad:
        c1, c2 = (torch.empty(b * groups, dtype=torch.float32, device=x.device) for _ in range(2))
        launch(kernels.group_grads)[(b * groups,)](sdy, sdyx, weight, c1, c2, p, c, spans, groups,
                                                   HAS_W=weight is not None, BLOCK_T=BLOCK_T,
                                                   BLOCK_CG=_block_cg(c, groups))
        dx = torch.empty_like(x)
        launch(kernels.input_grad)[(b * t, cblocks)](x, dy, dx, weight, bias, gmean, rstd, c1, c2, p, c, t,
                                                     groups, **flags)
    return dx, sdy.sum((0, 1)), sdyx.sum((0, 1))


def _param_grads(sdy: torch.Tensor, sdyx: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 needs: tuple[bool, bool]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    dweight = sdyx.to(weight.dtype) if weight is not None and needs[0] else None
    dbias = sdy.to(bias.dtype) if bias is not None and needs[1] else None
    return dweight, dbias


def _check_groups(x: torch.Tensor, groups: int) -> None:
    if x.shape[1] % groups:
        raise ValueError(f"group_norm_nhwc: {x.shape[1]} channels do not split into {groups} groups")


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps, silu):
        y, gmean, rstd = _forward(x, groups, weight, bias, eps, silu)
        ctx.save_for_backward(x, weight, bias, gmean, rstd)
        ctx.groups, ctx.silu = groups, silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, gmean, rstd = ctx.saved_tensors
        dx, sdy, sdyx = _backward(dy, x, weight, bias, gmean, rstd, ctx.groups, ctx.silu, ctx.needs_input_grad[0])
        return dx, None, *_param_grads(sdy, sdyx, weight, bias, ctx.needs_input_grad[2:4]), None, None


def group_norm_nhwc(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float, silu: bool = False) -> torch.Tensor:
    """F.group_norm of an NHWC map [B, C, H, W] (`qualifies`), followed by F.silu with `silu`,
    statistics in float32, the result in x's dtype and NHWC memory. weight and bias [C] of any
    float dtype (their gradients in it)."""
    _check_groups(x, groups)
    return _GroupNormNHWC.apply(x, groups, weight, bias, eps, silu)


if triton is not None:
    # The same kernels as torch operators for compiled graphs. As triton_ops, inductor traces
    # them into its own code: it launches the kernels (no Python operator dispatched per call)
    # and plans their buffers. As plain custom_ops they cost the host ~45 ms a step at batch 6
    # with the VAE in the step (0.66x inductor's kernels); as triton_ops 1.07x there and 1.043x at
    # batch 32 (doc/performance/step.md, thirty-fifth and thirty-sixth sessions).
    @torch.library.triton_op("ldm::group_norm_nhwc", mutates_args=())
    def _group_norm_op(x: torch.Tensor, groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       eps: float, silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _forward(x, groups, weight, bias, eps, silu, _traced(x))

    @torch.library.triton_op("ldm::group_norm_nhwc_backward", mutates_args=())
    def _group_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                                bias: Optional[torch.Tensor], gmean: torch.Tensor, rstd: torch.Tensor, groups: int,
                                silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _backward(dy, x, weight, bias, gmean, rstd, groups, silu, True, _traced(x))

    def _setup_context(ctx, inputs, output):
        x, groups, weight, bias, _, silu = inputs
        ctx.save_for_backward(x, weight, bias, output[1], output[2])
        ctx.groups, ctx.silu = groups, silu

    def _op_backward(ctx, dy, *_):
        x, weight, bias, gmean, rstd = ctx.saved_tensors
        dx, sdy, sdyx = torch.ops.ldm.group_norm_nhwc_backward(dy, x, weight, bias, gmean, rstd, ctx.groups, ctx.silu)
        return dx, None, *_param_grads(sdy, sdyx, weight, bias, ctx.needs_input_grad[2:4]), None, None

    _group_norm_op.register_autograd(_op_backward, setup_context=_setup_context)


def group_norm_nhwc_op(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       eps: float, silu: bool = False) -> torch.Tensor:
    """`group_norm_nhwc` as the torch operator ldm::group_norm_nhwc, for torch.compile."""
    _check_groups(x, groups)
    return torch.ops.ldm.group_norm_nhwc(x, groups, weight, bias, eps, silu)[0]
