"""How far from the memory rate do the compiled step's GroupNorms (with their SiLU) run?

    python bench/group_norm_step.py [--batch 32] [--shapes N]

Every GroupNorm of SD 1.x's UNet at 512 px, with the SiLU after it where the UNet has one (the
ResBlocks and the output), by shape and count per step. Forward + backward (the input's, the
weight's and the bias's gradients), GPU ms, on a bf16 NHWC map with bf16 weights, as target 1's
compiled step (`compile`, `channels_last`, `adamw_master`) runs them:

    compiled         GroupNorm32 (+ SiLU) under torch.compile with GroupNorm32.triton_when_compiled
                     off: group_norm_channels_last's decomposition and the kernels inductor makes
                     of it (train_step.py --inductor_norm; the step as shipped until the
                     thirty-fifth session)
    compiled_triton  the same with the switch on (the default): the Triton kernels as the
                     operator ldm::group_norm_nhwc, SiLU fused
    triton           triton_group_norm.group_norm_nhwc, SiLU fused, eager
    floor            the map-sized passes a norm cannot avoid (forward: x read for the statistics,
                     read again and y written; backward: x and dy read for the sums, read again
                     and dx written: 8), at the copy rate measured in the same process

One JSON line per shape (ms per call, and the largest difference of each Triton path's y, dx,
dweight and dbias from the compiled one), then the step's totals. The profile of the compiled
step puts 15.4 ms a step in inductor's kernels whose names say GroupNorm + SiLU
(doc/performance/step.md, thirty-fourth session). Timed alone, a call is bound by the host's
work, not the GPU's: eager Triton took 0.64-1.13 ms forward + backward for every shape, from
the smallest map to one 48 times larger (floors 0.01-0.48 ms; thirty-fifth session, H200).
There compiled_triton, the operator then a plain custom_op, summed to 90.9 ms a step against
compiled's 48.4, yet the step ran 1.044-1.049x faster with it; the step decides
(train_step.py --inductor_norm).
"""
from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from common import emit, gpu_ms, setup_cuda
from ldm.modules.diffusionmodules.triton_group_norm import group_norm_nhwc  # noqa: E402 (common: repo on sys.path)
from ldm.modules.diffusionmodules.util import GroupNorm32  # noqa: E402

NORMS = [  # (channels, side, with SiLU per step, without per step): SD 1.x's UNet at 64x64 latents
    (320, 64, 8, 5), (640, 64, 2, 0), (960, 64, 1, 0),
    (320, 32, 1, 0), (640, 32, 6, 5), (960, 32, 1, 0), (1280, 32, 1, 0), (1920, 32, 1, 0),
    (640, 16, 1, 0), (1280, 16, 6, 5), (1920, 16, 1, 0), (2560, 16, 2, 0),
    (1280, 8, 11, 1), (2560, 8, 3, 0)]
PASSES = 8


def copy_rate(gib: float = 2.0) -> float:
    """Bytes per ms a large device-to-device copy moves (read + write)."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / gpu_ms(lambda: dst.copy_(src), reps=10)


def paths(c: int, silu: bool, w0: torch.Tensor, b0: torch.Tensor) -> dict:
    """name -> (function of x -> y, its (weight, bias)): each path with its own copy of w0, b0."""
    def switched(fn, triton_op: bool):  # GroupNorm32.triton_when_compiled set while fn runs
        def norm(x):
            shipped, GroupNorm32.triton_when_compiled = GroupNorm32.triton_when_compiled, triton_op
            try:
                return fn(x)
            finally:
                GroupNorm32.triton_when_compiled = shipped
        return norm

    out = {}
    for name, triton_op in (("compiled", False), ("compiled_triton", True)):
        module = GroupNorm32(32, c).cuda()
        module.weight, module.bias = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
        fn = torch.compile(lambda x, m=module: m(x, silu=silu), dynamic=False)
        out[name] = (switched(fn, triton_op), (module.weight, module.bias))
    w, b = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    out["triton"] = (lambda x: group_norm_nhwc(x, 32, w, b, 1e-5, silu), (w, b))
    return out


def measure(batch: int, c: int, side: int, silu: bool) -> dict:
    torch._dynamo.reset()  # each shape's graphs from scratch: the paths share one function's code
    torch.manual_seed(0)
    x = (torch.randn(batch, c, side, side, device="cuda") * 2 + 0.5).bfloat16()
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn_like(x)
    w0, b0 = (torch.rand(c, device="cuda") + 0.5).bfloat16(), torch.randn(c, device="cuda").bfloat16()
    row, outs = {}, {}
    for name, (fn, (w, b)) in paths(c, silu, w0, b0).items():
        def fwd_bwd():
            return torch.autograd.grad(fn(x), (x, w, b), dy)
        outs[name] = (fn(x).detach(), *fwd_bwd())
        row[name] = [round(gpu_ms(lambda: fn(x.detach())), 4), round(gpu_ms(fwd_bwd), 4)]
    for name in ("compiled_triton", "triton"):
        row[name + "_max_diff"] = [round((a.float() - t.float()).abs().max().item(), 4)
                                   for a, t in zip(outs["compiled"], outs[name])]  # y, dx, dweight, dbias
    row["map_bytes"] = x.numel() * x.element_size()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--shapes", type=int, default=len(NORMS),
                   help="the first N (channels, side) of NORMS only (a quick check of the paths' values)")
    args = p.parse_args()
    setup_cuda()
    rate = copy_rate()
    names = ("compiled", "compiled_triton", "triton")
    totals = dict.fromkeys((*names, "floor"), 0.0)
    for c, side, with_silu, without in NORMS[:args.shapes]:
        for silu, count in ((True, with_silu), (False, without)):
            if not count:
                continue
            row = measure(args.batch, c, side, silu)
            floor = PASSES * row["map_bytes"] / rate
            for name in names:
                totals[name] += row[name][1] * count
            totals["floor"] += floor * count
            emit({"shape": [args.batch, c, side, side], "silu": silu, "per_step": count,
                  "ms_forward_and_forward_backward": {k: row[k] for k in names}, "floor_ms": round(floor, 4),
                  **{k: v for k, v in row.items() if k.endswith("_max_diff")}})
    print(json.dumps({"step_ms_forward_backward": {k: round(v, 2) for k, v in totals.items()},
                      "copy_rate_GBps": round(rate / 1e6)}), flush=True)


if __name__ == "__main__":
    main()
