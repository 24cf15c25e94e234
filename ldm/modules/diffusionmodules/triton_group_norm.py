"""GroupNorm of channels-last (NHWC) feature maps in Triton, forward and backward, for eager mode.

torch's CUDA GroupNorm takes NCHW only: an NHWC map is copied to NCHW first, and the
convolution after it copies the NCHW result back to NHWC (cuDNN's kernels on an H100/H200 are
NHWC), forward and backward. With `model.params.channels_last` eager, those copies cost more
than channels-last saved (doc/PERFORMANCE.md). Here the statistics and the normalisation read
and write the NHWC memory as it is: a map [B, C, H, W] in NHWC is a [B, P, C] array (P = H*W),
each group of C/G neighbouring channels.

Forward, per group g of sample b over its N = P * C/G values (statistics in float32):

    mean, var = mean(x), mean((x - mean)^2)      rstd = 1 / sqrt(var + eps)
    y = (x - mean) * rstd * weight + bias

computed in three launches: `_tile_stats` (per tile of BLOCK_P positions and BLOCK_C
channels: each channel's mean and sum of squared deviations), `_group_stats` (per (b, g):
the tiles merged as in Chan et al.'s parallel variance, exact), `_normalize`. Backward, with
xhat = (x - mean) * rstd and the sums over the group:

    dx = rstd * (weight * dy - sum(weight * dy) / N - xhat * sum(weight * dy * xhat) / N)
    dweight = sum over (b, p) of dy * xhat,  dbias = sum over (b, p) of dy

in three launches and two sums. Tests run the kernels on the CPU in Triton's interpreter
(TRITON_INTERPRET=1) against F.group_norm.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch builds without Triton: GroupNorm32 keeps torch's kernel
    triton = None

BLOCK_P = 64  # positions per tile
BLOCK_C = 64  # channels per tile
BLOCK_T = 64  # tiles per step of the per-group loops


def qualifies(x: torch.Tensor) -> bool:
    """Whether group_norm_nhwc takes x: Triton, a CUDA tensor, a 4-D map in NHWC memory that
    is not also NCHW-contiguous (then torch's kernel needs no copy)."""
    return (triton is not None and x.is_cuda and x.dim() == 4 and not x.is_contiguous()
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
    def _tile_stats(x_ptr, mean_ptr, m2_ptr, P, C, T, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Per tile (b, t) and channel c: the mean and sum of squared deviations of x[b, p, c]
        over the tile's positions p. x: [B, P, C]; mean, m2: [B, T, C] float32."""
        bt, cb = tl.program_id(0), tl.program_id(1)
        b, t = bt // T, bt % T
        p = t * BLOCK_P + tl.arange(0, BLOCK_P)
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (p[:, None] < P) & (c[None, :] < C)
        x = tl.load(x_ptr + (b * P + p[:, None]).to(tl.int64) * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        n = tl.minimum(P - t * BLOCK_P, BLOCK_P).to(tl.float32)
        mean = tl.sum(x, axis=0) / n
        d = tl.where(mask, x - mean[None, :], 0.0)
        out = bt * C + c
        tl.store(mean_ptr + out, mean, mask=c < C)
        tl.store(m2_ptr + out, tl.sum(d * d, axis=0), mask=c < C)

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
                     BLOCK_T: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_P: tl.constexpr):
        """Per (b, g): the tiles' means and squared deviations of the group's channels merged
        (Chan et al.): mean = sum(n_t mean_tc) / N, M2 = sum(M2_tc) + sum(n_t (mean_tc - mean)^2)."""
        bg, b, c, cmask, count = _group(P, C, G, BLOCK_CG)
        total = tl.zeros([BLOCK_CG], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            mask = (t[:, None] < T) & cmask[None, :]
            n = tl.minimum(P - t * BLOCK_P, BLOCK_P).to(tl.float32)
            m = tl.load(mean_ptr + (b * T + t[:, None]) * C + c[None, :], mask=mask, other=0.0)
            total += tl.sum(m * n[:, None], axis=0)
        mean = tl.sum(total, axis=0) / count
        m2 = tl.zeros([BLOCK_CG], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            mask = (t[:, None] < T) & cmask[None, :]
            n = tl.minimum(P - t * BLOCK_P, BLOCK_P).to(tl.float32)
            offs = (b * T + t[:, None]) * C + c[None, :]
            d = tl.load(mean_ptr + offs, mask=mask, other=0.0) - mean
            m2 += tl.sum(tl.load(m2_ptr + offs, mask=mask, other=0.0) + tl.where(mask, n[:, None] * d * d, 0.0),
                         axis=0)
        tl.store(gmean_ptr + bg, mean)
        tl.store(rstd_ptr + bg, 1.0 / tl.sqrt(tl.sum(m2, axis=0) / count + eps))

    @triton.jit
    def _normalize(x_ptr, y_ptr, w_ptr, b_ptr, gmean_ptr, rstd_ptr, P, C, T, G,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """y = (x - mean) * rstd * weight + bias, in x's memory layout and y's dtype."""
        bt, c, cmask, mask, group, offs = _tile(P, C, T, G, BLOCK_P, BLOCK_C)
        scale = tl.load(rstd_ptr + group, mask=cmask, other=0.0)
        if HAS_W:
            scale *= tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        shift = -tl.load(gmean_ptr + group, mask=cmask, other=0.0) * scale
        if HAS_B:
            shift += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, (x * scale[None, :] + shift[None, :]).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _tile_grads(x_ptr, dy_ptr, gmean_ptr, rstd_ptr, sdy_ptr, sdyx_ptr, P, C, T, G,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Per tile (b, t) and channel c: sum of dy and of dy * xhat over the tile's positions."""
        bt, c, cmask, mask, group, offs = _tile(P, C, T, G, BLOCK_P, BLOCK_C)
        mean = tl.load(gmean_ptr + group, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + group, mask=cmask, other=0.0)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * rstd[None, :]
        out = bt * C + c
        tl.store(sdy_ptr + out, tl.sum(dy, axis=0), mask=cmask)
        tl.store(sdyx_ptr + out, tl.sum(tl.where(mask, dy * xhat, 0.0), axis=0), mask=cmask)

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
    def _input_grad(x_ptr, dy_ptr, dx_ptr, w_ptr, gmean_ptr, rstd_ptr, c1_ptr, c2_ptr, P, C, T, G,
                    HAS_W: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """dx = rstd * (weight * dy - c1 - xhat * c2)."""
        bt, c, cmask, mask, group, offs = _tile(P, C, T, G, BLOCK_P, BLOCK_C)
        mean = tl.load(gmean_ptr + group, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + group, mask=cmask, other=0.0)
        c1 = tl.load(c1_ptr + group, mask=cmask, other=0.0)
        c2 = tl.load(c2_ptr + group, mask=cmask, other=0.0)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            dy *= tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
        xhat = (x - mean[None, :]) * rstd[None, :]
        dx = rstd[None, :] * (dy - c1[None, :] - xhat * c2[None, :])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _tiles(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(B, P, C, T) of an NHWC map: T tiles of BLOCK_P positions per sample."""
    b, c, h, w = x.shape
    return b, h * w, c, triton.cdiv(h * w, BLOCK_P)


def _block_cg(c: int, groups: int) -> int:
    return max(triton.next_power_of_2(c // groups), 2)


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps):
        b, p, c, t = _tiles(x)
        stats = torch.empty((2, b, t, c), dtype=torch.float32, device=x.device)  # tile means, squared deviations
        gstats = torch.empty((2, b * groups), dtype=torch.float32, device=x.device)  # group mean, rstd
        grid = (b * t, triton.cdiv(c, BLOCK_C))
        _tile_stats[grid](x, stats[0], stats[1], p, c, t, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
        _group_stats[(b * groups,)](stats[0], stats[1], gstats[0], gstats[1], p, c, t, groups, eps,
                                    BLOCK_T=BLOCK_T, BLOCK_CG=_block_cg(c, groups), BLOCK_P=BLOCK_P)
        y = torch.empty_like(x)  # NHWC, as x
        _normalize[grid](x, y, weight, bias, gstats[0], gstats[1], p, c, t, groups,
                         HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
        ctx.save_for_backward(x, weight, bias, gstats)
        ctx.groups = groups
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, gstats = ctx.saved_tensors
        groups = ctx.groups
        dy = dy.contiguous(memory_format=torch.channels_last)
        b, p, c, t = _tiles(x)
        sums = torch.empty((2, b, t, c), dtype=torch.float32, device=x.device)  # sum(dy), sum(dy * xhat) per tile
        grid = (b * t, triton.cdiv(c, BLOCK_C))
        _tile_grads[grid](x, dy, gstats[0], gstats[1], sums[0], sums[1], p, c, t, groups,
                          BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
        dx = None
        if ctx.needs_input_grad[0]:
            cs = torch.empty((2, b * groups), dtype=torch.float32, device=x.device)
            _group_grads[(b * groups,)](sums[0], sums[1], weight, cs[0], cs[1], p, c, t, groups,
                                        HAS_W=weight is not None, BLOCK_T=BLOCK_T, BLOCK_CG=_block_cg(c, groups))
            dx = torch.empty_like(x)
            _input_grad[grid](x, dy, dx, weight, gstats[0], gstats[1], cs[0], cs[1], p, c, t, groups,
                              HAS_W=weight is not None, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
        dweight = sums[1].sum((0, 1)).to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        dbias = sums[0].sum((0, 1)).to(bias.dtype) if bias is not None and ctx.needs_input_grad[3] else None
        return dx, None, dweight, dbias, None


def group_norm_nhwc(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float) -> torch.Tensor:
    """F.group_norm of an NHWC map [B, C, H, W] (`qualifies`), statistics in float32, the result
    in x's dtype and NHWC memory. weight and bias [C] of any float dtype (their gradients in it)."""
    if x.shape[1] % groups:
        raise ValueError(f"group_norm_nhwc: {x.shape[1]} channels do not split into {groups} groups")
    return _GroupNormNHWC.apply(x, groups, weight, bias, eps)
