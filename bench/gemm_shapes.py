"""Which of the compiled step's products run below the matmul rate, and does another kernel do better?

    python bench/gemm_shapes.py                      # the compiled batch-32 step's products by shape
    python bench/gemm_shapes.py --alternatives 12    # then the 12 costliest shapes alone, four ways

The step is target 1's compiled row (`full32clms`: compile, channels_last, fp32 masters). Under
torch's profiler with shapes and strides recorded, every aten::mm / addmm / bmm / baddbmm call
of two steps is grouped by (operator, shapes, strides); each group's GPU ms per step, its FLOPs
(2 M N K per product) and its rate, and the ms it loses against the bf16 matmul rate measured
in the same process (what the convolutions and the 8192^3 product reach). The convolutions are
listed the same way (forward FLOPs from the shapes and stride; a backward as both gradients).

`--alternatives N` times the N groups that lose the most ms alone, on tensors of the same
shapes and strides: torch's call as the step makes it (cuBLAS), with cuBLASLt preferred
(`torch.backends.cuda.preferred_blas_library`), with TunableOp (`torch.cuda.tunable`: every
cuBLAS / cuBLASLt algorithm the heuristics offer, the fastest kept), and inductor's Triton
templates (`max-autotune` of the product alone). One JSON line per group.
"""
from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict

import torch

from common import emit, gpu_ms, matmul_tflops, setup_cuda, tunableop
from train_step import ours, step_args

PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
CONVOLUTIONS = ("aten::convolution", "aten::convolution_backward")


def product_flops(name: str, shapes: list, concrete: list | None = None) -> float:
    """2 M N K (times the batch of a bmm) from the profiler's input shapes."""
    a, b = (shapes[1], shapes[2]) if name in ("aten::addmm", "aten::baddbmm") else (shapes[0], shapes[1])
    return 2 * math.prod(a) * b[-1]  # a [(B,) M, K], b [(B,) K, N]


def convolution_flops(name: str, shapes: list, concrete: list) -> float:
    """2 x output elements x Cin x kh x kw (groups 1) for the forward; twice that for a backward
    (input and weight gradients)."""
    if name == "aten::convolution":
        (n, _, h, w), weight = shapes[0], shapes[1]
        stride = concrete[3] if concrete and len(concrete) > 3 and concrete[3] else [1, 1]
        return 2 * n * weight[0] * (h // stride[0]) * (w // stride[1]) * math.prod(weight[1:])
    dy, weight = shapes[0], shapes[2]
    return 2 * 2 * math.prod(dy) * math.prod(weight[1:])


def trace_strides(prof) -> dict:
    """{correlation id: input strides} of every CPU operator, from the profile's Chrome trace
    (torch before 2.12 keeps the strides there only)."""
    import json
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    return {e["args"]["External id"]: e["args"].get("Input Strides") for e in events
            if e.get("cat") == "cpu_op" and "External id" in e.get("args", {})}


def strides_of(event, strides: dict) -> list:
    found = getattr(event, "structured_input_strides", None)  # torch >= 2.12's FunctionEvent
    if found is None:
        found = strides.get(event.id)
    return [list(s) if isinstance(s, (list, tuple)) else s for s in (found or [])]


def profile_groups(step, steps: int = 2) -> tuple[dict, dict]:
    """{(op, shapes, strides, dtypes): [GPU us, calls, FLOPs, kernel names]} for products and convolutions."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    strides = {} if hasattr(prof.events()[0], "structured_input_strides") else trace_strides(prof)
    groups = {kind: defaultdict(lambda: [0.0, 0, 0.0, set()]) for kind in ("product", "convolution")}
    for e in prof.events():
        for kind, names, flops in (("product", PRODUCTS, product_flops), ("convolution", CONVOLUTIONS,
                                                                            convolution_flops)):
            if e.name not in names or (e.cpu_parent is not None and e.cpu_parent.name in names):
                continue
            key = (e.name, str(e.input_shapes), str(strides_of(e, strides)), str(getattr(e, "input_dtypes", "")))
            g = groups[kind][key]
            g[0] += e.device_time_total / steps
            g[1] += 1 / steps
            g[2] += flops(e.name, e.input_shapes, e.concrete_inputs) / steps
            g[3].update(k.name[:60] for k in e.kernels)
    return groups["product"], groups["convolution"]


def report(title: str, groups: dict, rate: float, rows: int = 40) -> list:
    """Print each group's ms per step, calls, TFLOP/s and ms lost against `rate`; the groups by loss."""
    def lost(g):
        return g[0] / 1000 - g[2] / (rate * 1e12) * 1000
    total_ms = sum(g[0] for g in groups.values()) / 1000
    total_lost = sum(lost(g) for g in groups.values())
    print(f"== {title}: {total_ms:.2f} ms/step, {total_lost:.2f} ms of it above {rate:.0f} TFLOP/s", flush=True)
    order = sorted(groups.items(), key=lambda kv: -lost(kv[1]))
    for (name, shapes, strides, dtypes), g in order[:rows]:
        ms = g[0] / 1000
        print(f"{ms:7.2f} ms {g[1]:4.0f} calls {g[2] / max(ms, 1e-9) / 1e9:6.0f} TFLOP/s lost {lost(g):6.2f} ms  "
              f"{name} {shapes} strides {strides} {dtypes} {sorted(g[3])}", flush=True)
    return order


def as_tensor(shape: list, stride: list, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of this shape and these strides (random values), as the step's own input was laid out."""
    if not shape:
        return torch.tensor(1.0)
    size = 1 + sum((n - 1) * s for n, s in zip(shape, stride))
    return torch.randn(size, device="cuda", dtype=dtype).as_strided(shape, stride)


def alternatives(key: tuple, group: list, rate: float) -> dict:
    """Time one group's product alone: as the step calls it, cuBLASLt preferred, TunableOp, Triton."""
    import ast

    name, shapes, strides, _ = key
    shapes, strides = ast.literal_eval(shapes), ast.literal_eval(strides)
    if len(strides) != len(shapes):
        return {"op": name, "shapes": shapes, "skipped": "strides not recorded"}
    n = 3 if name in ("aten::addmm", "aten::baddbmm") else 2  # the inputs (inductor's calls pass out= too)
    args = [as_tensor(s, st, torch.bfloat16) for s, st in zip(shapes[:n], strides[:n])]
    op = getattr(torch.ops.aten, name.split("::")[1])

    def call():
        return op(*args)
    flops = product_flops(name, shapes)
    times = {"cublas": gpu_ms(call)}
    torch.backends.cuda.preferred_blas_library("cublaslt")
    times["cublaslt"] = gpu_ms(call)
    torch.backends.cuda.preferred_blas_library("default")
    tunableop("/tmp/gemm_shapes_tunableop.csv", max_tuning_ms=200)
    try:
        call()  # tunes this shape
        torch.cuda.tunable.tuning_enable(False)
        times["tunableop"] = gpu_ms(call)
    except RuntimeError as e:
        times["tunableop"] = f"failed: {e}"[:120]
    torch.cuda.tunable.enable(False)
    import torch._inductor.config as inductor_config
    with inductor_config.patch(max_autotune_gemm_backends="TRITON"):
        torch._dynamo.reset()
        compiled = torch.compile(lambda *a: op(*a), mode="max-autotune-no-cudagraphs", dynamic=False)
        t0 = time.perf_counter()
        try:
            compiled(*args)
            times["triton"] = gpu_ms(lambda: compiled(*args))
        except Exception as e:  # no template for the shape: say so, keep the other rows
            times["triton"] = f"failed: {type(e).__name__}"
        compile_s = time.perf_counter() - t0
    best = min(v for v in times.values() if isinstance(v, float))
    return {"op": name, "shapes": shapes, "strides": strides, "calls_per_step": round(group[1]),
            "step_ms": round(group[0] / 1000, 3), **{f"{k}_ms": round(v, 4) if isinstance(v, float) else v
                                                   for k, v in times.items()},
            "cublas_tflops": round(flops / times["cublas"] / 1e9), "best_tflops": round(flops / best / 1e9),
            "step_ms_saved": round((times["cublas"] - best) * group[1], 3), "triton_compile_s": round(compile_s, 1),
            "rate_tflops": round(rate)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--alternatives", type=int, default=0, help="time the N groups that lose the most alone")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    setup_cuda()
    rate = matmul_tflops()
    step, compile_all = ours(step_args(batch=args.batch, compile=True, channels_last=True, master=True))
    step()
    compile_all()
    products, convolutions = profile_groups(step)
    order = report("products", products, rate)
    report("convolutions", convolutions, rate, rows=25)
    del step, compile_all
    torch.cuda.empty_cache()
    for key, group in order[: args.alternatives]:
        emit(alternatives(key, group, rate))


if __name__ == "__main__":
    main()
