"""GroupNorm (and the SiLU after it) of channels-last (NHWC) feature maps in Triton, forward and backward.

torch's CUDA GroupNorm takes NCHW only: an NHWC map is copied to NCHW first, and the
convolution after it copies the NCHW result back to NHWC (cuDNN's kernels on an H100/H200 are
NHWC), forward and backward. With `model.params.channels_last` eager, those copies cost more
than channels-last saved (doc/PERFORMANCE.md). Here the statistics and the normalisation read
and write the NHWC memory as it is: a map [B, C, H, W] in NHWC is a [B, P, C] array (P = H*W),
each group of C/G neighbouring channels.

Forward, per group g of sample b over its N = P * C/G values (statistics in float32):

    mean, var = mean(x), mean((x - mean)^2)      rstd = 1 / sqrt(var + eps)
    y = (x - mean) * rstd * weight + bias

computed in three launches: `_tile_stats` (per span of `Tiles.span` positions and `Tiles.c`
channels: each channel's mean and sum of squared deviations, from shifted sums), `_group_stats`
(per (b, g): the spans merged as in Chan et al.'s parallel variance, exact), `_normalize` (per
tile of `Tiles.p` positions). Backward, with xhat = (x - mean) * rstd and the sums over the group:

    dx = rstd * (weight * dy - sum(weight * dy) / N - xhat * sum(weight * dy * xhat) / N)
    dweight = sum over (b, p) of dy * xhat,  dbias = sum over (b, p) of dy

in three launches and two sums. With `silu` the forward writes silu(y) and the backward first
takes dy through SiLU's derivative at yhat = xhat * weight + bias (recomputed from x), so a
ResBlock's norm and activation are one pass each way over the map.

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

try:
    import triton
    import triton.language as tl
except ImportError:  # torch builds without Triton: GroupNorm32 keeps torch's kernel
    triton = None

BLOCK_T = 64  # tiles per step of the per-group loops


class Tiles(NamedTuple):
    """How the map-sized kernels split [B, P, C]: tiles of `p` positions by `c` channels, one
    program of `warps` warps each; the two that sum over positions (`_tile_stats`,
    `_tile_grads`) take `span` positions per program (a multiple of `p`), `p` at a time."""
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


if triton is not None:
    @triton.jit
    def _tile(P, C, T, G, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's tile of [B, P, C]: (b * T + t, its channels, their mask, the tile's
        mask, each channel's (b, g) index, the tile's offsets)."""
        bt, cb = tl.program_id(0), tl.program_id(1)
        b, t = bt // T, bt % T
        p = t * BLOCK_P + tl.arange(0, BLOCK_P)
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        mask = (p[:, None] < P) & cmask[None, :]
        return bt, c, cmask, mask, b * G + c // (C // G), (b * P + p[:, None]).to(tl.int64) * C + c[None, :]

    @triton.jit
    def _span(P, C, T, SPAN: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's span of [B, P, C]: (b * T + t, b, its first position and the position
        after its last, its channels, their mask)."""
        bt, cb = tl.program_id(0), tl.program_id(1)
        b, t = bt // T, bt % T
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        return bt, b, t * SPAN, tl.minimum(t * SPAN + SPAN, P), c, c < C

    @triton.jit
    def _tile_stats(x_ptr, mean_ptr, m2_ptr, P, C, T, SPAN: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_C: tl.constexpr):
        """Per span (b, t) of SPAN positions and channel c: the mean and the sum of squared
        deviations of x[b, p, c] over the span's positions. One pass in chunks of BLOCK_P
        positions, summing d = x - k and d^2 elementwise, reduced once at the end (k: the span's
        first row, a shift that keeps the cancellation in sum(d^2) - sum(d)^2 / n small).
        x: [B, P, C]; mean, m2: [B, T, C] float32."""
        bt, b, start, end, c, cmask = _span(P, C, T, SPAN, BLOCK_C)
        row0 = (b * P).to(tl.int64) * C
        k = tl.load(x_ptr + row0 + start * C + c, mask=cmask, other=0.0).to(tl.float32)
        s1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for p0 in range(start, end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = (p[:, None] < end) & cmask[None, :]
            x = tl.load(x_ptr + row0 + p[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x - k[None, :], 0.0)
            s1 += d
            s2 += d * d
        n = (end - start).to(tl.float32)
        d1 = tl.sum(s1, axis=0)
        out = bt * C + c
        tl.store(mean_ptr + out, k + d1 / n, mask=cmask)
        tl.store(m2_ptr + out, tl.maximum(tl.sum(s2, axis=0) - d1 * d1 / n, 0.0), mask=cmask)

    @triton.jit
    def _group(P, C, G, BLOCK_CG: tl.constexpr):
        """This program's group: (b * G + g, b, its channels, their mask, its N = P * C / G values)."""
        bg = tl.program_id(0)
        b, g = bg // G, bg % G
        cg = C // G
        offsets = tl.arange(0, BLOCK_CG)
        return bg, b, g * cg + offsets, offsets < cg, (P * cg).to(tl.float32)

    @triton.jit
    def _group_stats(mean_ptr, m2_ptr, gmean_ptr, rstd_ptr, P, C, T, G, eps,
                     BLOCK_T: tl.constexpr, BLOCK_CG: tl.constexpr, SPAN: tl.constexpr):
        """Per (b, g): the tiles' means and squared deviations of the group's channels merged
        (Chan et al.): mean = sum(n_t mean_tc) / N, M2 = sum(M2_tc) + sum(n_t (mean_tc - mean)^2)."""
        bg, b, c, cmask, count = _group(P, C, G, BLOCK_CG)
        total = tl.zeros([BLOCK_CG], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            mask = (t[:, None] < T) & cmask[None, :]
            n = tl.minimum(P - t * SPAN, SPAN).to(tl.float32)
            m = tl.load(mean_ptr + (b * T + t[:, None]) * C + c[None, :], mask=mask, other=0.0)
            total += tl.sum(m * n[:, None], axis=0)
        mean = tl.sum(total, axis=0) / count
        m2 = tl.zeros([BLOCK_CG], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            mask = (t[:, None] < T) & cmask[None, :]
            n = tl.minimum(P - t * SPAN, SPAN).to(tl.float32)
            offs = (b * T + t[:, None]) * C + c[None, :]
            d = tl.load(mean_ptr + offs, mask=mask, other=0.0) - mean
            m2 += tl.sum(tl.load(m2_ptr + offs, mask=mask, other=0.0) + tl.where(mask, n[:, None] * d * d, 0.0),
                         axis=0)
        tl.store(gmean_ptr + bg, mean)
        tl.store(rstd_ptr + bg, 1.0 / tl.sqrt(tl.sum(m2, axis=0) / count + eps))

    @triton.jit
    def _normalize(x_ptr, y_ptr, w_ptr, b_ptr, gmean_ptr, rstd_ptr, P, C, T, G,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """y = (x - mean) * rstd * weight + bias (then silu(y) with SILU), in x's memory layout
        and y's dtype."""
        bt, c, cmask, mask, group, offs = _tile(P, C, T, G, BLOCK_P, BLOCK_C)
        scale = tl.load(rstd_ptr + group, mask=cmask, other=0.0)
        if HAS_W:
            scale *= tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        shift = -tl.load(gmean_ptr + group, mask=cmask, other=0.0) * scale
        if HAS_B:
            shift += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = x * scale[None, :] + shift[None, :]
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_grad(dy, xhat, w_ptr, b_ptr, c, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   SILU: tl.constexpr):
        """The gradient reaching the norm's output: dy, or with SILU dy * silu'(yhat) where
        yhat = xhat * weight + bias and silu'(u) = s (1 + u (1 - s)), s = sigmoid(u)."""
        if SILU:
            yhat = xhat
            if HAS_W:
                yhat = yhat * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                yhat = yhat + tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
            sig = 1.0 / (1.0 + tl.exp(-yhat))
            dy = dy * sig * (1.0 + yhat * (1.0 - sig))
        return dy

    @triton.jit
    def _tile_grads(x_ptr, dy_ptr, w_ptr, b_ptr, gmean_ptr, rstd_ptr, sdy_ptr, sdyx_ptr, P, C, T, G,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
                    SPAN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Per span (b, t) of SPAN positions and channel c: sum of g and of g * xhat over the
        span's positions (g: `_norm_grad` of dy), in chunks of BLOCK_P positions summed
        elementwise and reduced once at the end."""
        bt, b, start, end, c, cmask = _span(P, C, T, SPAN, BLOCK_C)
        group = b * G + c // (C // G)
        mean = tl.load(gmean_ptr + group, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + group, mask=cmask, other=0.0)
        row0 = (b * P).to(tl.int64) * C
        a1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        a2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for p0 in range(start, end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = (p[:, None] < end) & cmask[None, :]
            offs = row0 + p[:, None] * C + c[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean[None, :]) * rstd[None, :]
            g = tl.where(mask, _norm_grad(dy, xhat, w_ptr, b_ptr, c, cmask, HAS_W, HAS_B, SILU), 0.0)
            a1 += g
            a2 += g * xhat
        out = bt * C + c
        tl.store(sdy_ptr + out, tl.sum(a1, axis=0), mask=cmask)
        tl.store(sdyx_ptr + out, tl.sum(a2, axis=0), mask=cmask)

    @triton.jit
    def _group_grads(sdy_ptr, sdyx_ptr, w_ptr, c1_ptr, c2_ptr, P, C, T, G,
                     HAS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_CG: tl.constexpr):
        """Per (b, g): c1 = sum(weight * dy) / N and c2 = sum(weight * dy * xhat) / N."""
        bg, b, c, cmask, count = _group(P, C, G, BLOCK_CG)
        s1 = tl.zeros([BLOCK_CG], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_CG], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            mask = (t[:, None] < T) & cmask[None, :]
            offs = (b * T + t[:, None]) * C + c[None, :]
            s1 += tl.sum(tl.load(sdy_ptr + offs, mask=mask, other=0.0), axis=0)
            s2 += tl.sum(tl.load(sdyx_ptr + offs, mask=mask, other=0.0), axis=0)
        if HAS_W:
            w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            s1 *= w
            s2 *= w
        tl.store(c1_ptr + bg, tl.sum(s1, axis=0) / count)
        tl.store(c2_ptr + bg, tl.sum(s2, axis=0) / count)

    @triton.jit
    def _input_grad(x_ptr, dy_ptr, dx_ptr, w_ptr, b_ptr, gmean_ptr, rstd_ptr, c1_ptr, c2_ptr, P, C, T, G,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """dx = rstd * (weight * g - c1 - xhat * c2)."""
        bt, c, cmask, mask, group, offs = _tile(P, C, T, G, BLOCK_P, BLOCK_C)
        mean = tl.load(gmean_ptr + group, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + group, mask=cmask, other=0.0)
        c1 = tl.load(c1_ptr + group, mask=cmask, other=0.0)
        c2 = tl.load(c2_ptr + group, mask=cmask, other=0.0)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * rstd[None, :]
        dy = _norm_grad(dy, xhat, w_ptr, b_ptr, c, cmask, HAS_W, HAS_B, SILU)
        if HAS_W:
            dy *= tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
        dx = rstd[None, :] * (dy - c1[None, :] - xhat * c2[None, :])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


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
    launch(_tile_stats)[(b * spans, cblocks)](x, mean, m2, p, c, spans, SPAN=span, **block)
    launch(_group_stats)[(b * groups,)](mean, m2, gmean, rstd, p, c, spans, groups, eps,
                                        BLOCK_T=BLOCK_T, BLOCK_CG=_block_cg(c, groups), SPAN=span)
    y = torch.empty_like(x)  # NHWC, as x
    launch(_normalize)[(b * t, cblocks)](x, y, weight, bias, gmean, rstd, p, c, t, groups, HAS_W=weight is not None,
                             HAS_B=bias is not None, SILU=silu, **block)
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
    launch(_tile_grads)[(b * spans, cblocks)](x, dy, weight, bias, gmean, rstd, sdy, sdyx, p, c, spans, groups,
                                              SPAN=span, **flags)
    dx = None
    if input_grad:
        c1, c2 = (torch.empty(b * groups, dtype=torch.float32, device=x.device) for _ in range(2))
        launch(_group_grads)[(b * groups,)](sdy, sdyx, weight, c1, c2, p, c, spans, groups,
                                            HAS_W=weight is not None, BLOCK_T=BLOCK_T, BLOCK_CG=_block_cg(c, groups))
        dx = torch.empty_like(x)
        launch(_input_grad)[(b * t, cblocks)](x, dy, dx, weight, bias, gmean, rstd, c1, c2, p, c, t, groups,
                                              **flags)
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
