"""Which SDPA kernel is fastest for SD 1.x's attention shapes (issue: performance, lever 1)?

    python bench/attention.py [--batch 32]
    python bench/attention.py --batch 32 --pad    # head dim 40 padded with zeros to 48 or 64

SD 1.5's UNet has 16 transformer blocks, each with a self-attention over the latent pixels and
a cross-attention to 77 text tokens, 8 heads whose width grows with depth: 5 blocks at 64x64
(4096 tokens, head dim 40), 5 at 32x32 (1024, 80), 5 at 16x16 (256, 160), 1 at 8x8 (64, 160).
Times forward + backward of each shape (bf16) with each backend PyTorch offers, and the sum over
the UNet's blocks: one JSON line per backend, plus the one PyTorch picks by itself ("default").

`--pad` asks whether head dim 40 (the 64x64 blocks, most of the attention time) is slow because
of its width: q, k and v laid out as the model makes them ([B, N, heads, d] viewed as
[B, heads, N, d]), then padded with zero columns to 48 or 64 (the scale stays 1/sqrt(40), so the
result is the same), with and without the padding and slicing in the timed region.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import emit

SHAPES = [  # (blocks in the UNet, tokens, head dim)
    (5, 4096, 40), (5, 1024, 80), (5, 256, 160), (1, 64, 160)]
BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def time_attention(batch: int, n: int, m: int, d: int, backend, reps: int = 10) -> float:
    """ms for forward + backward of softmax(q k^T / sqrt(d)) v, q [B,8,n,d], k/v [B,8,m,d]."""
    q = torch.randn(batch, 8, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, 8, m, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    grad = torch.randn(batch, 8, n, d, device="cuda", dtype=torch.bfloat16)

    def once():
        with sdpa_kernel(backend) if backend is not None else torch.enable_grad():
            F.scaled_dot_product_attention(q, k, v).backward(grad)
    return time_ms(once, reps)


def time_ms(once, reps: int) -> float:
    """ms per call of `once` after 3 calls of warm-up."""
    for _ in range(3):
        once()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / reps


def time_padded(batch: int, n: int, m: int, d: int, width: int, with_pad: bool, reps: int = 10) -> float:
    """ms for forward + backward of the attention at head dim `d`, its q, k, v zero-padded to `width`."""
    def tokens(length):  # as CrossAttention makes them: a product's [B, N, 8 d], viewed per head
        return torch.randn(batch, length, 8, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    q, k, v = (t.requires_grad_() for t in (tokens(n), tokens(m), tokens(m)))
    padded = [F.pad(t, (0, width - d)).detach().requires_grad_() for t in (q, k, v)]
    grad = torch.randn(batch, 8, n, d, device="cuda", dtype=torch.bfloat16)

    def once():
        if width == d:
            args = (q, k, v)
        else:
            args = [F.pad(t, (0, width - d)) for t in (q, k, v)] if with_pad else padded
        out = F.scaled_dot_product_attention(*args, scale=d ** -0.5)[..., :d]
        out.backward(grad)
    return time_ms(once, reps)


def pad_rows(batch: int) -> None:
    """Head dim 40 as it is, and padded to 48 and 64: does a wider head run faster?"""
    for width in (40, 48, 64):
        for with_pad in (False, True) if width != 40 else (False,):
            record = {"head_dim": 40, "padded_to": width, "pad_in_timing": with_pad, "batch": batch}
            for kind, m in (("self", 4096), ("cross", 77)):
                record[f"{kind}_4096x40_ms"] = round(time_padded(batch, 4096, m, 40, width, with_pad), 3)
            emit(record)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pad", action="store_true", help="head dim 40 padded to 48 and 64 instead")
    args = p.parse_args()
    if args.pad:
        return pad_rows(args.batch)
    for name, backend in BACKENDS.items():
        record, total = {"backend": name, "batch": args.batch}, 0.0
        for blocks, n, d in SHAPES:
            for kind, m in (("self", n), ("cross", 77)):
                if name == "math" and n * m > 1024 * 1024:  # [B,8,n,m] scores: too large to be of interest
                    continue
                try:
                    ms = time_attention(args.batch, n, m, d, backend)
                except RuntimeError as e:  # this backend refuses the shape
                    record[f"{kind}_{n}x{d}"] = f"unsupported: {str(e).splitlines()[0][:80]}"
                    continue
                record[f"{kind}_{n}x{d}_ms"] = round(ms, 3)
                total += blocks * ms
        record["unet_total_ms"] = round(total, 2)
        emit(record)


if __name__ == "__main__":
    main()
