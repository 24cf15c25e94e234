"""The Triton kernels of triton_group_norm.py: GroupNorm (and the SiLU after it) of a
channels-last map, seen as a [B, P, C] array (P = H*W positions, each group of C/G neighbouring
channels), forward and backward.

Forward, per group g of sample b over its N = P * C/G values (statistics in float32):

    mean, var = mean(x), mean((x - mean)^2)      rstd = 1 / sqrt(var + eps)
    y = (x - mean) * rstd * weight + bias

in three launches: `tile_stats` (per span of SPAN positions and BLOCK_C channels: each
channel's mean and sum of squared deviations, from shifted sums), `group_stats` (per (b, g): the
spans merged as in Chan et al.'s parallel variance, exact), `normalize` (per tile of BLOCK_P
positions). Backward, with xhat = (x - mean) * rstd and the sums over the group:

    dx = rstd * (weight * dy - sum(weight * dy) / N - xhat * sum(weight * dy * xhat) / N)
    dweight = sum over (b, p) of dy * xhat,  dbias = sum over (b, p) of dy

in three launches (`tile_grads` per span, `group_grads` per (b, g), `input_grad` per tile) and
two sums. With SILU the forward writes silu(y) and the backward first takes dy through SiLU's
derivative at yhat = xhat * weight + bias (recomputed from x), so a ResBlock's norm and
activation are one pass each way over the map. The grids and tile sizes: triton_group_norm.py.
"""
try:
    import triton
    import triton.language as tl
except ImportError:  # torch builds without Triton: no kernels; GroupNorm32 keeps torch's
    triton = None

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
    def tile_stats(x_ptr, mean_ptr, m2_ptr, P, C, T, SPAN: tl.constexpr, BLOCK_P: tl.constexpr,
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
    def group_stats(mean_ptr, m2_ptr, gmean_ptr, rstd_ptr, P, C, T, G, eps,
                     BLOCK_T: tl.constexpr, BLOCK_CG: tl.constexpr, SPAN: tl.constexpr):
        """Per (b, g): the spans' means and squared deviations of the group's channels merged
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
    def normalize(x_ptr, y_ptr, w_ptr, b_ptr, gmean_ptr, rstd_ptr, P, C, T, G,
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
    def tile_grads(x_ptr, dy_ptr, w_ptr, b_ptr, gmean_ptr, rstd_ptr, sdy_ptr, sdyx_ptr, P, C, T, G,
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
    def group_grads(sdy_ptr, sdyx_ptr, w_ptr, c1_ptr, c2_ptr, P, C, T, G,
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
    def input_grad(x_ptr, dy_ptr, dx_ptr, w_ptr, b_ptr, gmean_ptr, rstd_ptr, c1_ptr, c2_ptr, P, C, T, G,
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
