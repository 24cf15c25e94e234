"""Is attention on few keys faster outside cuDNN's fused kernel (issue: performance, target 1)?

    python bench/cross_attention.py [--batch 32]

SD 1.5's cross-attention attends 4096 (64x64), 1024, 256 or 64 image tokens to the text
encoder's 77 tokens. cuDNN's flash-style kernel tiles the keys in blocks of 64-128, so 77 keys
leave most of its second tile empty and each program little work; the bytes that must move
(q, the output, and in the backward q, the output, its gradient and dq) are ~0.5 GB at 64x64
and batch 32: ~0.1 ms at the H200's rate, against the ~0.7 ms measured (fwd + bwd).

Times forward + backward, q/k/v laid out as CrossAttention makes them ([B, N, 8, d] viewed as
[B, 8, N, d]), of: SDPA as PyTorch picks it (cuDNN), SDPA inside torch.compile, plain math
(softmax in fp32) compiled by Inductor, and FlexAttention compiled; each against the fp32
math on the same inputs (largest error of the output and of dq, relative to its largest
value). One JSON line per shape and variant; `--self` adds the 64x64 self-attention.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from common import emit

SHAPES = [  # (cross-attention blocks in the UNet, image tokens, head dim)
    (5, 4096, 40), (5, 1024, 80), (5, 256, 160), (1, 64, 160)]
HEADS, TEXT = 8, 77


def math_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v with the softmax in fp32: [B, h, N, d]."""
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # [B, h, N, M]
    return (s.softmax(-1).to(q.dtype) @ v)


def variants():
    from torch.nn.attention.flex_attention import flex_attention
    return {
        "sdpa": F.scaled_dot_product_attention,
        "sdpa_compiled": torch.compile(F.scaled_dot_product_attention, dynamic=False),
        "math_compiled": torch.compile(math_attention, dynamic=False),
        "flex_compiled": torch.compile(flex_attention, dynamic=False),
    }


def inputs(batch: int, n: int, m: int, d: int, device: str):
    def tokens(length):  # a product's [B, L, 8 d], viewed per head
        return torch.randn(batch, length, HEADS, d, device=device, dtype=torch.bfloat16).transpose(1, 2)
    q, k, v = (t.requires_grad_() for t in (tokens(n), tokens(m), tokens(m)))
    grad = torch.randn(batch, HEADS, n, d, device=device, dtype=torch.bfloat16)
    return q, k, v, grad


def errors(fn, q, k, v, grad) -> tuple[float, float]:
    """Largest |out - ref| / max|ref| and the same for dq; ref: fp32 math."""
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = math_attention(*ref_in)
    ref.backward(grad.float())
    q.grad = None
    out = fn(q, k, v)
    out.backward(grad)
    rel = lambda a, b: ((a.float() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    return rel(out, ref), rel(q.grad, ref_in[0].grad)


def time_ms(fn, q, k, v, grad, reps: int) -> tuple[float, float]:
    """(wall ms, GPU kernel ms) per forward + backward. Small shapes are bound by the host's
    launches when timed alone; inside the compiled UNet the GPU has work queued, so the
    kernels' own time (from the profiler) is what a swap of kernels would change."""
    def once():
        fn(q, k, v).backward(grad)
    for _ in range(3):
        once()
    if not q.is_cuda:
        t0 = time.perf_counter()
        for _ in range(reps):
            once()
        ms = 1000 * (time.perf_counter() - t0) / reps
        return ms, ms
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    torch.cuda.synchronize()
    wall = 1000 * (time.perf_counter() - t0) / reps
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            once()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
    return wall, sum(e.device_time_total for e in kernels) / 1000 / reps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--self", action="store_true", help="also the 64x64 self-attention (4096 keys)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", type=int, default=len(SHAPES), help="only the first N shapes")
    args = p.parse_args()
    cases = [(blocks, n, TEXT, d) for blocks, n, d in SHAPES[:args.shapes]]
    if args.self:
        cases.append((5, 4096, 4096, 40))
    totals: dict[str, float] = {}
    for name, fn in variants().items():
        for blocks, n, m, d in cases:
            record = {"variant": name, "tokens": n, "keys": m, "head_dim": d, "batch": args.batch}
            try:
                q, k, v, grad = inputs(args.batch, n, m, d, args.device)
                record["out_err"], record["dq_err"] = (round(e, 5) for e in errors(fn, q, k, v, grad))
                wall, gpu = time_ms(fn, q, k, v, grad, args.reps)
                record["wall_ms"], record["gpu_ms"] = round(wall, 4), round(gpu, 4)
            except Exception as e:  # a variant that refuses a shape says why
                record["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            else:
                if m == TEXT:
                    totals[name] = totals.get(name, 0.0) + blocks * record["gpu_ms"]
            emit(record)
            del q, k, v, grad
            if args.device == "cuda":
                torch.cuda.empty_cache()
    emit({"cross_attention_unet_total_gpu_ms": {k: round(v, 3) for k, v in totals.items()}})


if __name__ == "__main__":
    main()
