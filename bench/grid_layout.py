"""Does channels-last pay for the sample grid's UNet forward? (issue: performance, target 2)

    python bench/grid_layout.py                  # SD 1.x size, random weights, one GPU
    python bench/grid_layout.py --batch 12 --latent 64 --reps 20

A sample grid is 40 guided DDIM steps, each one no-grad UNet forward at twice the grid's
images (batch 12 for a batch-6 run), bound by the GPU. In NCHW, cuDNN transposes each
convolution's input to NHWC and its output back; in NHWC (channels-last), PyTorch's CUDA
GroupNorm copies its input to NCHW instead. The variants, each timed and profiled (GPU time by
kind of kernel), with the largest difference of the output from the NCHW one:
    nchw        the model as it trains (weights NCHW unless the config says channels_last)
    cl_native   the input channels-last (cuDNN then takes the weights NHWC), torch's GroupNorm
    cl_torch    the same, GroupNorm as two float32 reductions and one multiply-add over the
                NHWC memory (no copies)
    cl_triton   the same, the multiply-add in one Triton kernel writing bf16
    *_graph     a variant recorded as one CUDA graph and replayed (no launches from the host)
"""
from __future__ import annotations

import argparse
import time

import torch

from common import CAPTIONS, emit, our_model, setup_cuda
from profiling import print_kernel_kinds
from ldm.modules.diffusionmodules import util  # noqa: E402 (common puts the repo on sys.path)
from ldm.optim.master_weights import MasterWeights  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _scale_shift(x_ptr, y_ptr, scale_ptr, shift_ptr, HW, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """y[b, p, c] = x[b, p, c] * scale[b, c] + shift[b, c], in float32, over NHWC memory [B, HW, C]."""
        b = tl.program_id(2).to(tl.int64)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (p[:, None] < HW) & (c[None, :] < C)
        offs = b * HW * C + p[:, None] * C + c[None, :]
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        s = tl.load(scale_ptr + b * C + c, mask=c < C)
        t = tl.load(shift_ptr + b * C + c, mask=c < C)
        tl.store(y_ptr + offs, (x * s[None, :] + t[None, :]).to(y_ptr.dtype.element_ty), mask=mask)


def scale_shift(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm as a per-(sample, channel) affine map: y = x * scale + shift, [B, C] float32 each."""
    B, C, H, W = x.shape
    xg = x.unflatten(1, (groups, C // groups))  # [B, G, C/G, H, W], a view of the NHWC memory
    n = xg[0, 0].numel()
    mean = xg.sum(dim=(2, 3, 4), dtype=torch.float32) / n  # [B, G]
    var = (torch.linalg.vector_norm(xg, dim=(2, 3, 4), dtype=torch.float32).square() / n - mean.square()).clamp_(min=0)
    rstd = torch.rsqrt(var + eps)
    scale = (rstd[:, :, None] * weight.float().view(groups, -1)).flatten(1)  # [B, C]
    shift = bias.float() - (mean[:, :, None] * rstd[:, :, None] * weight.float().view(groups, -1)).flatten(1)
    return scale, shift


def gn_torch(x, groups, weight, bias, eps):
    scale, shift = scale_shift(x, groups, weight, bias, eps)
    return torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None]).to(x.dtype)


def gn_triton(x, groups, weight, bias, eps):
    scale, shift = scale_shift(x, groups, weight, bias, eps)
    B, C, H, W = x.shape
    y = torch.empty_like(x)  # NHWC like x
    grid = (triton.cdiv(H * W, 64), triton.cdiv(C, 64), B)
    _scale_shift[grid](x, y, scale, shift, H * W, C, BLOCK_P=64, BLOCK_C=64, num_warps=4)
    return y


def patched_forward(impl):
    native = util.GroupNorm32.forward

    def forward(self, x):
        if (impl is not None and not torch.is_grad_enabled() and x.dim() == 4 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)):
            return impl(x, self.num_groups, self.weight, self.bias, self.eps)
        return native(self, x)
    return forward


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/stable-diffusion/v1-finetune_everydream.yaml")
    p.add_argument("--batch", type=int, default=12, help="UNet batch: twice the grid's images (guidance)")
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--fp32_weights", action="store_true",
                   help="fp32 UNet weights (optimizer adamw): autocast casts them")
    p.add_argument("--variants", default="nchw,nchw_graph,cl_native,cl_triton,cl_triton_graph")
    args = p.parse_args()
    setup_cuda()
    torch.backends.cudnn.benchmark = False  # as sampling runs (ImageLogger.sampling_mode)
    model = our_model(args.config, use_checkpoint=False).eval()
    with torch.no_grad():  # zero-initialised layers (the output convolution, proj_out) made random: a non-zero output
        for w in model.model.parameters():
            if not w.any():
                w.normal_(0, 0.02, generator=torch.Generator(device="cuda").manual_seed(w.numel()))
    if not args.fp32_weights:  # the UNet computes with bf16 weights, as main.py's default adamw_master sets it up
        MasterWeights(model.model)
    native = util.GroupNorm32.forward
    impls = {"nchw": None, "cl_native": None, "cl_torch": gn_torch, "cl_triton": gn_triton}
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(args.batch, 4, args.latent, args.latent, device="cuda", generator=g)
    t = torch.full((args.batch,), 500, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        context = model.get_learned_conditioning(CAPTIONS[:args.batch])
    reference = None
    for name in args.variants.split(","):
        base = name.removesuffix("_graph")
        util.GroupNorm32.forward = patched_forward(impls[base])
        x = z.to(torch.bfloat16)
        if base != "nchw":
            x = x.contiguous(memory_format=torch.channels_last)

        def forward():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return model.apply_model(x, t, context)
        for _ in range(3):
            out = forward()
        if name.endswith("_graph"):  # the forward recorded once as a CUDA graph, replayed
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = forward()
            forward = graph.replay
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.reps):
            forward()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / args.reps * 1000
        out = out.float()
        reference = out if reference is None else reference
        emit({"variant": name, "batch": args.batch, "latent": args.latent, "ms_per_forward": round(ms, 2),
              "max_abs_diff_vs_first": round((out - reference).abs().max().item(), 4),
              "out_std": round(out.std().item(), 4)})
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                forward()
            torch.cuda.synchronize()
        print(f"-- {name}", flush=True)
        print_kernel_kinds(prof, 2, top=8)
    util.GroupNorm32.forward = native


if __name__ == "__main__":
    main()
