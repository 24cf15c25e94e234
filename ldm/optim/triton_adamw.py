"""AdamWBF16's update of many weights in one GPU kernel (Triton).

Without it, `adamw_bf16` updates each weight, or each pack of small weights concatenated,
with ~25 eager kernels per chunk or one compiled call, and the host's cost of issuing those
bounded the small-batch steps (doc/performance/memory.md, the 6 GiB and 12 GiB targets). Here one
launch updates every weight of a call: the weights' addresses go in a table, the GPU runs
one program per chunk of up to CHUNK elements of a weight, which it finds in a block map, and
each program loops over its chunk BLOCK elements at a time.

The arithmetic is `low_memory.adamw_update_`'s, in fp32:

    m = m + (1 - b1) (g - m)
    v = b2 v + (1 - b2) g²
    w = w (1 - lr wd) - lr / bc1 * m / (sqrt(v / bc2) + eps)        bc = 1 - b^t

and bf16 weights and moments are written back with stochastic rounding (random bits from
Philox, keyed by a seed the caller draws per launch and the chunk's index); fp32 ones plainly.
An fp32 weight may have a bf16 copy (adamw_master: the fp32 weight is the master of a bf16
weight the model computes with, and its gradient is bf16): the kernel then reads the bf16
gradient and writes the copy too, rounded to nearest as autocast's cast would.

A weight qualifies when its four tensors (weight, gradient, m, v) are on a CUDA device, all
bf16 or all fp32 (with a copy: weight, m, v fp32, gradient and copy bf16), with the same
strides, and dense (contiguous, or channels-last): then each is the same flat run of memory,
element for element. Tests run the kernel on the CPU in Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch builds without Triton (CPU-only wheels): the other update paths run
    triton = None

BLOCK = 512  # elements per loop step, 8 warps: on an H200 (bf16, a block per program) 1.09x faster than 1024,
#               1.26x than 256, 1.56x than 2048
CHUNK = 16 * BLOCK  # elements per program (a weight's last chunk is shorter): 1.08x faster than one block
Tensors = tuple[torch.Tensor, ...]  # weight, gradient, m, v [, bf16 copy of the weight]
DTYPES = (torch.bfloat16, torch.float32)
BF16, FP32 = torch.bfloat16, torch.float32


def same_layout(tensors: Tensors) -> bool:
    """The four tensors are all bf16 or all fp32 (with a fifth, the copy: weight, m and v fp32,
    gradient and copy bf16), on one device, with the same strides, and dense (contiguous, or
    channels-last): the same flat run of memory, element for element.
    (Runs for every weight at every step: plain comparisons, no generators.)"""
    w, g, m, v, *copy = tensors
    strides, dtype, device = w.stride(), w.dtype, w.get_device()
    if copy:
        c = copy[0]
        dtypes = dtype is FP32 and m.dtype is FP32 and v.dtype is FP32 and g.dtype is BF16 and c.dtype is BF16
        dtypes = dtypes and c.stride() == strides and c.get_device() == device
    else:
        dtypes = dtype in DTYPES and g.dtype is dtype and m.dtype is dtype and v.dtype is dtype
    return (dtypes and g.stride() == strides and m.stride() == strides and v.stride() == strides
            and g.get_device() == device and m.get_device() == device and v.get_device() == device
            and (w.is_contiguous() or (w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last))))


def qualifies(tensors: Tensors) -> bool:
    """Whether the kernel can update this weight: Triton, a CUDA device and `same_layout`."""
    return triton is not None and tensors[0].is_cuda and same_layout(tensors)


if triton is not None:
    @triton.jit
    def _round_bf16(x, r):
        """x (fp32) to bf16, up with the probability of the 16 bits cut off: add 16 random bits
        (the low ones of r), truncate."""
        bits = x.to(tl.uint32, bitcast=True) + (r & 0xFFFF)
        return (bits & 0xFFFF0000).to(tl.float32, bitcast=True).to(tl.bfloat16)

    @triton.jit
    def _round_nearest_bf16(x):
        """x (fp32) to the nearest bf16, ties to even, as torch rounds (spelled out: Triton's
        interpreter, which the tests run, truncates in `.to(tl.bfloat16)`)."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits & 0xFFFF0000).to(tl.float32, bitcast=True).to(tl.bfloat16)

    @triton.jit
    def _bits16(r):
        """BLOCK // 2 random uint32 -> BLOCK values whose low 16 bits are random (both halves of each)."""
        return tl.interleave(r, r >> 16)

    @triton.jit(do_not_specialize=["seed"])
    def _adamw_kernel(table, numels, block_weight, block_start, step_size, decay, one_minus_b1, b2, one_minus_b2,
                      eps, bc2, seed, DTYPE: tl.constexpr, GRAD: tl.constexpr, COLUMNS: tl.constexpr,
                      BLOCK: tl.constexpr, CHUNK: tl.constexpr):
        pid = tl.program_id(0)
        i = tl.load(block_weight + pid)                    # the weight this chunk belongs to
        start = tl.load(block_start + pid)                 # its first element
        n = tl.minimum(tl.load(numels + i) - start, CHUNK)  # and how many it has
        row = table + COLUMNS * i  # the weight's addresses: w, g, m, v [, copy]
        w_ptr = tl.load(row).to(tl.pointer_type(DTYPE)) + start
        g_ptr = tl.load(row + 1).to(tl.pointer_type(GRAD)) + start
        m_ptr = tl.load(row + 2).to(tl.pointer_type(DTYPE)) + start
        v_ptr = tl.load(row + 3).to(tl.pointer_type(DTYPE)) + start
        # the chain of loads above (map, table, tensors) is paid once per chunk, not per BLOCK
        for j in range(0, n, BLOCK):
            offs = j + tl.arange(0, BLOCK)
            mask = offs < n
            g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
            m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
            v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
            w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
            m = m + one_minus_b1 * (g - m)
            v = b2 * v + one_minus_b2 * g * g
            if DTYPE == tl.bfloat16:
                # fast division and square root: their ~2 ulp of fp32 vanish in the rounding
                w = w * decay - step_size * (m / (tl.sqrt(v / bc2) + eps))
                # 48 random bits per element: one Philox call (128 bits) per two elements, 7 rounds,
                # the fewest that pass TestU01's BigCrush (Salmon et al., SC 2011). Triton's default of
                # 10 adds a margin a rounding's coin flip does not need; with it, one call per element,
                # the update was bound by the arithmetic (doc/PERFORMANCE.md). Key: the chunk;
                # counter: the pair's place in it.
                r0, r1, r2, _ = tl.randint4x(seed + pid, j // 2 + tl.arange(0, BLOCK // 2), n_rounds=7)
                tl.store(w_ptr + offs, _round_bf16(w, _bits16(r0)), mask=mask)
                tl.store(m_ptr + offs, _round_bf16(m, _bits16(r1)), mask=mask)
                tl.store(v_ptr + offs, _round_bf16(v, _bits16(r2)), mask=mask)
            else:  # correctly rounded division and square root, as torch's AdamW
                w = w * decay - step_size * tl.div_rn(m, tl.sqrt_rn(tl.div_rn(v, bc2)) + eps)
                tl.store(w_ptr + offs, w, mask=mask)
                tl.store(m_ptr + offs, m, mask=mask)
                tl.store(v_ptr + offs, v, mask=mask)
                if COLUMNS == 5:  # the bf16 copy, rounded to nearest
                    c_ptr = tl.load(row + 4).to(tl.pointer_type(tl.bfloat16)) + start
                    tl.store(c_ptr + offs, _round_nearest_bf16(w), mask=mask)


@functools.lru_cache(maxsize=1024)
def _block_map(device: torch.device, numels: tuple[int, ...], chunk: int) -> tuple[torch.Tensor, ...]:
    """numels on the device, and for each chunk of `chunk` elements its weight and first element.
    The same weights come to every step, so each call's map is built once."""
    weight, start = [], []
    for i, n in enumerate(numels):
        first = range(0, n, chunk)
        weight += [i] * len(first)
        start += first
    return tuple(torch.tensor(x, dtype=dtype).to(device) for x, dtype in
                 ((numels, torch.int64), (weight, torch.int32), (start, torch.int32)))


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor on device, copied from pinned memory without waiting for the GPU."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def adamw_(weights: list[Tensors], *, lr: float, b1: float, b2: float, eps: float, wd: float, step: int,
           seed: int) -> None:
    """One AdamW step of every (weight, gradient, m, v) or (weight, gradient, m, v, copy) in
    `weights`, in one launch. All must qualify, be alike (dtypes, copy or not) and on one
    device, at optimizer step `step` (1 on the first). `seed` keys the stochastic rounding of
    bf16 values: draw a new one per launch."""
    seed = (1 << 32) + seed % (1 << 61)  # always an int64 argument: a seed that fit int32 would compile anew
    w0 = weights[0][0]
    numels, block_weight, block_start = _block_map(w0.device, tuple(t[0].numel() for t in weights), CHUNK)
    table = _to_device([x.data_ptr() for t in weights for x in t], w0.device)
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    dtype = {BF16: tl.bfloat16, FP32: tl.float32}
    _adamw_kernel[(len(block_weight),)](
        table, numels, block_weight, block_start, lr / bc1, 1 - lr * wd, 1 - b1, b2, 1 - b2, eps, bc2, seed,
        DTYPE=dtype[w0.dtype], GRAD=dtype[weights[0][1].dtype], COLUMNS=len(weights[0]), BLOCK=BLOCK, CHUNK=CHUNK,
        num_warps=8)
    written = [x for t in weights for i, x in enumerate(t) if i != 1]
    torch.autograd.graph.increment_version(written)  # written behind torch's back
