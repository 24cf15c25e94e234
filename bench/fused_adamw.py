"""adamw_bf16's fused Triton update (ldm/optim/triton_adamw.py) on the GPU: is it right, and how
fast is one optimizer step over the SD 1.x UNet's 686 weights, against the other update paths?

    python bench/fused_adamw.py [--skip_old] [--blocks 1024 4096] [--chunks 1 4 16]   # a JSON line per check and path

Checks: on fp32 weights the kernel is AdamW (against torch's fused AdamW, 3 steps); on bf16
weights each weight, m and v lands on one of the two bf16 neighbours of the fp32 result, up as
often as the fraction cut off says. Timings: GPU ms per update (CUDA events, 10 updates after
3) and host ms per call (the time to issue it), with the bytes each path must move per
parameter and the rate that makes. Paths: torch's fused AdamW on fp32 weights (the shipped
full fine-tune's update) and on bf16 weights (round-to-nearest, the `--unet_bf16` probe);
adamw_bf16 eager (packs and chunks), compiled (compile_updates: a call per weight or pack)
and with the kernel (one launch), on bf16 weights, the kernel on fp32 weights, and
adamw_master's use of it (bf16 weights with fp32 masters).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optimizer_host import sd15_weights  # noqa: E402

from ldm.optim import triton_adamw  # noqa: E402
from ldm.optim.low_memory import AdamWBF16  # noqa: E402
from ldm.optim.master_weights import AdamWMaster, MasterWeights  # noqa: E402


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def weights(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    """The UNet's weights on the GPU, random, with random gradients."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    params = []
    for p in sd15_weights(text_encoder=False):
        w = torch.nn.Parameter(0.02 * torch.randn(p.shape, device="cuda", generator=g).to(dtype))
        w.grad = (1e-3 * torch.randn(p.shape, device="cuda", generator=g)).to(dtype)
        params.append(w)
    return params


def check_fp32() -> None:
    a, b = weights(torch.float32), weights(torch.float32)
    opt_a = AdamWBF16(a, lr=1e-4, weight_decay=0.01)
    opt_b = torch.optim.AdamW(b, lr=1e-4, weight_decay=0.01, fused=True)
    for _ in range(3):
        opt_a.step()
        opt_b.step()
    diff = max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))
    emit(check="fp32 weights: kernel against torch's fused AdamW, 3 steps", max_rel_diff=diff, ok=diff < 1e-5)


def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 numbers at or below x and above it, as fp32."""
    down = x.bfloat16()
    down = torch.where(down.float() > x, torch.nextafter(down, torch.full_like(down, -1e30)), down)
    return down.float(), torch.nextafter(down, torch.full_like(down, 1e30)).float()


def check_bf16(n: int = 1 << 22) -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    w = (1 + torch.rand(n, device="cuda", generator=g)).bfloat16()
    grad = torch.randn(n, device="cuda", generator=g).bfloat16()
    m = (0.1 * torch.randn(n, device="cuda", generator=g)).bfloat16()
    v = (0.01 * torch.rand(n, device="cuda", generator=g)).bfloat16()
    lr, b1, b2, eps, wd, t = 3e-3, 0.9, 0.999, 1e-8, 0.01, 3
    m32 = m.float() + (1 - b1) * (grad.float() - m.float())
    v32 = b2 * v.float() + (1 - b2) * grad.float() ** 2
    w32 = w.float() * (1 - lr * wd) - lr / (1 - b1**t) * m32 / ((v32 / (1 - b2**t)).sqrt() + eps)
    # the kernel's fp32 arithmetic (fused multiply-adds, fast division) may round differently
    # from torch's by a few fp32 steps of the terms, which matter where m's terms cancel
    tols = (1e-6 * w.float().abs(), 1e-6 * (m.float().abs() + grad.float().abs()), 1e-6 * v32)
    triton_adamw.adamw_([(w, grad, m, v)], lr=lr, b1=b1, b2=b2, eps=eps, wd=wd, step=t, seed=7)
    for name, got, exact, tol in zip(("weight", "m", "v"), (w, m, v), (w32, m32, v32), tols):
        got = got.float()
        lowest, highest = neighbours(exact - tol)[0], neighbours(exact + tol)[1]  # tol 0: the two neighbours
        off = int((~((got >= lowest) & (got <= highest))).sum())
        down, up = neighbours(exact)
        expected_up = ((exact - down) / (up - down)).mean().item()
        rounded_up = ((got == up) & (up != down)).float().mean().item()
        emit(check=f"bf16 {name}: stochastic rounding", elements=n, off_the_neighbours=off,
             expected_up=round(expected_up, 4), rounded_up=round(rounded_up, 4),
             ok=off == 0 and abs(expected_up - rounded_up) < 0.005)


def time_path(name: str, make, dtype: torch.dtype, bytes_per_param: int, reps: int = 10) -> None:
    params = weights(dtype)
    opt = make(params)
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    host = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        t0 = time.perf_counter()
        opt.step()
        host.append(time.perf_counter() - t0)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / reps
    n = sum(p.numel() for p in params)
    emit(path=name, weights=len(params), params=n, gpu_ms=round(ms, 3), host_ms=round(1000 * min(host), 3),
         bytes_per_param=bytes_per_param, TB_per_s=round(n * bytes_per_param / ms / 1e9, 2))
    del opt, params
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip_old", action="store_true", help="leave out adamw_bf16's eager and compiled paths")
    p.add_argument("--blocks", type=int, nargs="*", default=[], help="time bf16 updates with these blocks too")
    p.add_argument("--chunks", type=int, nargs="*", default=[],
                   help="time bf16 updates with programs of these many blocks too (the shipped block)")
    args = p.parse_args()
    check_fp32()
    check_bf16()
    qualifies = triton_adamw.qualifies

    def old(compiled: bool):
        def make(params):
            triton_adamw.qualifies = lambda tensors: False
            opt = AdamWBF16(params, lr=1e-5)
            opt.compiled = compiled
            return opt
        return make

    def kernel(params):
        triton_adamw.qualifies = qualifies
        return AdamWBF16(params, lr=1e-5)

    time_path("torch fused AdamW, fp32 weights (shipped)", lambda p: torch.optim.AdamW(p, lr=1e-5, fused=True),
              torch.float32, 28)
    time_path("torch fused AdamW, bf16 weights (round-to-nearest)", lambda p: torch.optim.AdamW(p, lr=1e-5, fused=True),
              torch.bfloat16, 14)
    if not args.skip_old:
        time_path("adamw_bf16 eager: packs and chunks", old(False), torch.bfloat16, 14)
        time_path("adamw_bf16 compiled: a call per weight or pack", old(True), torch.bfloat16, 14)
    shipped = triton_adamw.BLOCK, triton_adamw.CHUNK
    sizes = {shipped} | {(b, shipped[1] // shipped[0] * b) for b in args.blocks} | {(shipped[0], c * shipped[0])
                                                                                  for c in args.chunks}
    for block, chunk in sorted(sizes):
        triton_adamw.BLOCK, triton_adamw.CHUNK = block, chunk
        time_path(f"adamw_bf16, the kernel, bf16 weights, blocks of {block}, programs of {chunk}", kernel,
                  torch.bfloat16, 14)
    triton_adamw.BLOCK, triton_adamw.CHUNK = shipped
    time_path(f"adamw_bf16, the kernel, fp32 weights, blocks of {shipped[0]}, programs of {shipped[1]}", kernel,
              torch.float32, 28)

    def master(params):  # bf16 weights and gradients, fp32 masters and moments (adamw_master)
        triton_adamw.qualifies = qualifies
        masters = MasterWeights(torch.nn.ParameterList(params))
        for p in params:
            p.grad = p.grad.bfloat16()
        opt = AdamWMaster(params, lr=1e-5)
        opt.use(masters)
        return opt
    time_path("adamw_master, the kernel (bf16 gradient in, fp32 master and moments, bf16 weight out)", master,
              torch.float32, 28)


if __name__ == "__main__":
    main()
