"""Does the eager step pay for its norms' float32 round trips (issue: performance, target 1 eager)?

    python bench/norm_dtype.py [--batch 32]

Under bf16 autocast on a GPU, torch runs group_norm and layer_norm in float32: the bf16 input is
copied to float32, normalised, and the float32 output is cast back to bf16 by the next product
(once per product: the self-attention's to_q, to_k and to_v each cast the same norm output).
torch's norm kernels accumulate their statistics in float32 whatever the input's dtype, so the
round trip buys no precision. For the norm shapes of SD 1.x's UNet, times forward + backward of

- `fp32`: the round trip, as autocast runs it;
- `mixed`: autocast off, bf16 input with the float32 weight and bias (if torch accepts the mix);
- `bf16w`: autocast off, the weight and bias cast to bf16 too;

each followed by what follows the norm in the UNet (SiLU for a ResBlock's GroupNorm, the
transformer's GroupNorm -> proj_in, LayerNorm -> to_q/to_k/to_v). Prints per shape the ms, the
memory the backward keeps, and the largest errors of the output and of the input's, weight's and
bias's gradients against float64.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from common import emit

# (what, shape per image, about how many of its size in SD 1.5's UNet at 64x64 latents)
GROUP = [("gn_320x64", (320, 64, 64), 13), ("gn_640x64", (640, 64, 64), 2), ("gn_960x64", (960, 64, 64), 1),
         ("gn_640x32", (640, 32, 32), 11), ("gn_1280x16", (1280, 16, 16), 11)]
LAYER = [("ln_4096x320", (4096, 320), 15), ("ln_1024x640", (1024, 640), 15), ("ln_256x1280", (256, 1280), 15)]


def run_norm(kind: str, variant: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, heads: list):
    """The norm and what follows it; returns the value to back-propagate from."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        if variant == "fp32":
            if kind == "gn":
                h = F.group_norm(x.float(), 32, w, b, 1e-5).to(x.dtype)
            else:
                h = F.layer_norm(x, (x.shape[-1],), w, b)  # autocast runs it in float32
        else:
            ww, bb = (w, b) if variant == "mixed" else (w.to(x.dtype), b.to(x.dtype))
            with torch.autocast("cuda", enabled=False):
                h = (F.group_norm(x, 32, ww, bb, 1e-5) if kind == "gn"
                     else F.layer_norm(x, (x.shape[-1],), ww, bb))
        if kind == "gn":
            return F.silu(h)
        return sum(F.linear(h, head) for head in heads)


def measure(kind: str, variant: str, shape: tuple, batch: int, reps: int = 10) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    c = shape[0] if kind == "gn" else shape[-1]
    x = (torch.randn(batch, *shape, device="cuda", generator=g) * 3 + 1).to(torch.bfloat16).requires_grad_()
    w = (1 + 0.1 * torch.randn(c, device="cuda", generator=g)).requires_grad_()
    b = (0.1 * torch.randn(c, device="cuda", generator=g)).requires_grad_()
    heads = [torch.randn(c, c, device="cuda", generator=g) / c ** 0.5 for _ in range(3)]
    grad = torch.randn(batch, *shape, device="cuda", generator=g).to(torch.bfloat16)
    try:
        out = run_norm(kind, variant, x, w, b, heads)
    except RuntimeError as e:
        return {"error": str(e).splitlines()[0][:100]}
    out.backward(grad)
    # errors against float64 over the whole batch, each relative to the largest reference entry
    x64 = x.detach().double().requires_grad_()
    w64, b64 = (t.detach().double().requires_grad_() for t in (w, b))
    if kind == "gn":
        ref = F.silu(F.group_norm(x64, 32, w64, b64, 1e-5))
    else:
        ref = sum(F.linear(F.layer_norm(x64, (c,), w64, b64), h.double()) for h in heads)
    ref.backward(grad.double())
    record = {f"{name}_err": (got.double() - want).abs().max().item() / want.abs().max().item()
              for name, got, want in (("out", out.detach(), ref.detach()), ("dx", x.grad, x64.grad),
                                      ("dweight", w.grad, w64.grad), ("dbias", b.grad, b64.grad))}
    del ref, x64
    x.grad = w.grad = b.grad = None
    del out
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = run_norm(kind, variant, x, w, b, heads)
    record["kept_gib"] = round((torch.cuda.memory_allocated() - base) / 2 ** 30, 3)
    out.backward(grad)
    del out
    for _ in range(3):
        run_norm(kind, variant, x, w, b, heads).backward(grad)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        run_norm(kind, variant, x, w, b, heads).backward(grad)
    torch.cuda.synchronize()
    record["ms"] = round(1000 * (time.perf_counter() - t0) / reps, 3)
    return record


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    totals: dict[str, float] = {}
    for kind, table in (("gn", GROUP), ("ln", LAYER)):
        for name, shape, count in table:
            for variant in ("fp32", "mixed", "bf16w"):
                record = measure(kind, variant, shape, args.batch)
                emit({"shape": name, "variant": variant, "in_unet": count, "batch": args.batch, **record})
                if "ms" in record:
                    totals[f"{kind}_{variant}"] = totals.get(f"{kind}_{variant}", 0.0) + count * record["ms"]
    emit({"unet_ms_per_step": {k: round(v, 1) for k, v in totals.items()},
          "note": "ms summed over the UNet's norms of that kind, each with what follows it"})


if __name__ == "__main__":
    main()
