"""Where the host time of adamw8bit_bf16's per-weight update goes (the 6 GiB preset's step is
bound by its host): per call, bitsandbytes' functional wrapper, the op it dispatches to, and
our whole update of one weight (casts, bitsandbytes, stochastic rounding).

    python bench/eight_bit_calls.py [--numel 1000000] [--calls 300]

Each line: microseconds of host time per call (the GPU is synchronised once, after all calls;
the kernels of a 1M-element weight take less than the host's time to launch them).
"""
from __future__ import annotations

import argparse
import time

import torch
from bitsandbytes import functional as F

from common import emit
from ldm.optim.eight_bit import AdamW8bitBF16, _maps


def timed(fn, calls: int) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return round(1e6 * host / calls, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    n, dev = args.numel, torch.device("cuda")
    g, w = torch.randn(n, device=dev) * 1e-3, torch.randn(n, device=dev)
    m, v = torch.zeros(n, dtype=torch.uint8, device=dev), torch.zeros(n, dtype=torch.uint8, device=dev)
    a1, a2 = torch.zeros(-(-n // 256), device=dev), torch.zeros(-(-n // 256), device=dev)
    q1, q2 = _maps(dev)
    step = [0]

    def functional():
        step[0] += 1
        F.optimizer_update_8bit_blockwise("adam", g, w, m, v, 0.9, 0.999, 0.0, 0.0, 1e-8, step[0], 1e-6, q1, q2,
                                          a1, a2, weight_decay=0.01)

    def op():
        step[0] += 1
        torch.ops.bitsandbytes.optimizer_update_8bit_blockwise(
            "adam", g, w, m, v, 0.9, 0.999, 0.0, 0.0, 1e-8, step[0], 1e-6, q1, q2, a1, a2, 0.01, 1.0, False)

    p = torch.nn.Parameter(torch.randn(n, device=dev, dtype=torch.bfloat16))
    p.grad = torch.randn_like(p) * 1e-3
    opt = AdamW8bitBF16([p], lr=1e-6)

    def ours():
        opt.step()

    def launch():
        g.add_(0.0)

    emit({"numel": n, "one elementwise launch_us": timed(launch, args.calls),
          "functional_us": timed(functional, args.calls), "op_us": timed(op, args.calls),
          "ours_per_weight_us": timed(ours, args.calls)})


if __name__ == "__main__":
    main()
