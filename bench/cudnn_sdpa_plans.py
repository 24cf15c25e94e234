"""Does cuDNN have a faster plan for the UNet's attention than the one PyTorch runs?

    python bench/cudnn_sdpa_plans.py [--batch 32] [--shapes 4096x40 1024x80 256x160]

PyTorch builds cuDNN's fused attention graph with heuristic mode A and runs the first plan that
builds. This script asks cuDNN's own frontend (the `nvidia-cudnn-frontend` package: a
bench-only dependency, installed beside torch on the GPU machine) for every plan of heuristic
modes A, B and FALLBACK: for the forward (with the softmax statistics a backward needs) in each
implementation the frontend names (AUTO, COMPOSITE, UNIFIED), and for the backward (which takes
no implementation). Each plan that builds is timed (GPU time, CUDA events) and checked against torch's
F.scaled_dot_product_attention on the same tensors, laid out as the model lays them out
([B, N, heads * d] viewed as [B, heads, N, d]). One JSON line per plan, plus torch's own times.
On the GPU machine: `pip install nvidia-cudnn-frontend` (1.32.0 measured) beside torch; the
frontend drives the cuDNN library torch already loaded.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import emit

HEADS = 8


def tokens(batch: int, n: int, d: int) -> torch.Tensor:
    """[B, heads, N, d] view of a [B, N, heads * d] product's output, as CrossAttention makes it."""
    t = torch.randn(batch, n, HEADS * d, device="cuda", dtype=torch.bfloat16)
    return t.view(batch, n, HEADS, d).transpose(1, 2)


def gpu_ms(fn, reps: int = 20) -> float:
    """Median GPU ms of `fn` over `reps` calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def torch_reference(q, k, v, d_o):
    """torch's cuDNN attention: (forward ms, backward ms, O, dQ, dK, dV). The gradients are
    returned, not accumulated into .grad, as they flow on inside the model."""
    inputs = tuple(t.detach().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        fwd = gpu_ms(lambda: F.scaled_dot_product_attention(*inputs))
        both = gpu_ms(lambda: torch.autograd.grad(F.scaled_dot_product_attention(*inputs), inputs, d_o))
        out = F.scaled_dot_product_attention(*inputs)
        grads = torch.autograd.grad(out, inputs, d_o)
    return fwd, both - fwd, out.detach(), *grads


def new_graph(cudnn, handle):
    return cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=cudnn.data_type.FLOAT,
                         compute_data_type=cudnn.data_type.FLOAT, handle=handle)


def forward_graph(cudnn, handle, q, k, v, impl):
    """cuDNN's training forward: O (laid out as q) and the softmax statistics."""
    g = new_graph(cudnn, handle)
    tq, tk, tv = (g.tensor_like(t) for t in (q, k, v))
    extra = {} if impl is None else {"implementation": impl}
    o, stats = g.sdpa(name="sdpa", q=tq, k=tk, v=tv, generate_stats=True,
                      attn_scale=1 / math.sqrt(q.shape[-1]), **extra)
    o.set_output(True).set_dim(list(q.shape)).set_stride(list(q.stride()))
    stats.set_output(True).set_data_type(cudnn.data_type.FLOAT)
    out, lse = torch.empty_like(q), torch.empty(*q.shape[:-1], 1, device="cuda", dtype=torch.float32)
    return g, {tq: q, tk: k, tv: v, o: out, stats: lse}, (out, lse)


def backward_graph(cudnn, handle, q, k, v, out, lse, d_o):
    g = new_graph(cudnn, handle)
    tq, tk, tv, to, tdo = (g.tensor_like(t) for t in (q, k, v, out, d_o))
    tstats = g.tensor_like(lse)
    dq, dk, dv = g.sdpa_backward(name="sdpa_backward", q=tq, k=tk, v=tv, o=to, dO=tdo, stats=tstats,
                                 attn_scale=1 / math.sqrt(q.shape[-1]))
    grads = []
    for t, like in ((dq, q), (dk, k), (dv, v)):
        t.set_output(True).set_dim(list(like.shape)).set_stride(list(like.stride()))
        grads.append(torch.empty_like(like))
    pack = {tq: q, tk: k, tv: v, to: out, tdo: d_o, tstats: lse, dq: grads[0], dk: grads[1], dv: grads[2]}
    return g, pack, grads


def run_plans(cudnn, handle, make, mode, ref, label: str, shape: str, impl_name: str):
    """Build every plan of heuristic `mode` for the graph `make()` returns; time and check each."""
    try:
        g, pack, outputs = make()
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([mode])
        g.check_support()
        count = g.get_execution_plan_count()
    except Exception as e:  # a mode or implementation the backend refuses for this graph
        emit({"shape": shape, "pass": label, "impl": impl_name, "mode": str(mode), "error": repr(e)[:300]})
        return
    for i in range(count):
        row = {"shape": shape, "pass": label, "impl": impl_name, "mode": str(mode), "index": i}
        try:
            row["plan"] = g.get_plan_name_at_index(i)
            g.build_plan_at_index(i)
            workspace = torch.empty(max(1, g.get_workspace_size_plan_at_index(i)), device="cuda", dtype=torch.uint8)
            row["gpu_ms"] = round(gpu_ms(lambda: g.execute_plan_at_index(pack, workspace, index=i, handle=handle)), 3)
            row["max_abs_err"] = [round((a.float() - b.float()).abs().max().item(), 4) for a, b in zip(outputs, ref)]
        except Exception as e:
            row["error"] = repr(e)[:300]
        emit(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shapes", nargs="+", default=["4096x40", "1024x80", "256x160"],
                        help="self-attention shapes as TOKENSxHEAD_DIM")
    args = parser.parse_args()
    import cudnn  # after torch, so the frontend finds the cuDNN torch loaded
    handle = cudnn.create_handle()
    cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
    emit({"torch": torch.__version__, "cudnn_backend": torch.backends.cudnn.version(),
          "frontend": cudnn.__version__, "frontend_backend": cudnn.backend_version()})
    impls = {"default": None, **{n: getattr(cudnn.attention_implementation, n)
                                 for n in ("AUTO", "COMPOSITE", "UNIFIED")}}
    modes = [cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK]
    for shape in args.shapes:
        n, d = (int(x) for x in shape.split("x"))
        q, k, v, d_o = (tokens(args.batch, n, d) for _ in range(4))
        fwd, bwd, out, *grads = torch_reference(q, k, v, d_o)
        emit({"shape": shape, "torch_forward_ms": round(fwd, 3), "torch_backward_ms": round(bwd, 3)})
        for impl_name, impl in impls.items():
            for mode in modes:
                run_plans(cudnn, handle, lambda: forward_graph(cudnn, handle, q, k, v, impl), mode, (out,),
                          "forward", shape, impl_name)
        # statistics for the backward, from the default plan (the log-sum-exp of each query row)
        g, pack, (o2, lse) = forward_graph(cudnn, handle, q, k, v, None)
        g.build([cudnn.heur_mode.A])
        g.execute(pack, torch.empty(max(1, g.get_workspace_size()), device="cuda", dtype=torch.uint8), handle=handle)
        for mode in modes:  # the backward takes no `implementation`
            run_plans(cudnn, handle, lambda: backward_graph(cudnn, handle, q, k, v, o2, lse, d_o), mode,
                      tuple(grads), "backward", shape, "default")


if __name__ == "__main__":
    main()
