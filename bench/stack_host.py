"""The host's time of the text-encoder cache's lookup (torch.stack of a batch's kept rows) on
the GPU, alone and right after a long kernel: does it wait for the GPU?

    python bench/stack_host.py
"""
from __future__ import annotations

import time

import torch


def host_ms(fn, reps: int = 50) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return 1000 * (time.perf_counter() - t0) / reps


def main() -> None:
    rows = {f"caption {i}": torch.randn(77, 768, device="cuda").bfloat16() for i in range(32)}
    captions = list(rows)
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def stack():
        return torch.stack([rows[c] for c in captions])

    def cat():
        return torch.cat([rows[c][None] for c in captions])

    def busy_then(fn):
        def run():
            for _ in range(20):  # ~20 x 1.4 ms of matmuls queued ahead of the lookup
                big @ big
            t0 = time.perf_counter()
            fn()
            run.times.append(time.perf_counter() - t0)
        run.times = []
        return run

    for name, fn in (("stack", stack), ("cat", cat)):
        fn(); torch.cuda.synchronize()
        idle = host_ms(fn)
        torch.cuda.synchronize()
        behind = busy_then(fn)
        for _ in range(10):
            behind()
        torch.cuda.synchronize()
        print(f"{name}: host {idle:.3f} ms with an idle GPU, {1000 * sum(behind.times) / len(behind.times):.3f} ms "
              f"behind ~28 ms of queued matmuls", flush=True)


if __name__ == "__main__":
    main()
