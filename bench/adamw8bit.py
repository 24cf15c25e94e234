"""8-bit AdamW, bitsandbytes' or torchao's, against ours (adamw_bf16, adamw8bit_bf16) (issue:
performance, levers: "an 8-bit AdamW (bitsandbytes or torchao: choose by measurement)").

    python bench/adamw8bit.py [--steps 200] [--lr 1e-6]

On the SD 1.x UNet's 686 weights (random init, on the GPU), each optimizer takes the same
`--steps` synthetic gradients (per weight: a fixed direction plus noise, seeded by step, so the
moments carry signal as in training) from the same bf16-representable start. Per optimizer,
one JSON line:
    state_GiB        optimizer state (the memory its first step allocates)
    step_ms          one step of all weights, median of 10 after the others
    rel_err          ||W - W_ref|| / ||W_ref - W_0||: distance to torch's fp32 AdamW after the
                     steps, relative to how far that moved; bf16 weights round each step
    cos              cosine between its total update and the reference's
The numbers per parameter: fp32 AdamW 8 bytes of state; bf16 moments (adamw_bf16) 4; 8-bit
moments ~2 (plus a scale per block of 256 or 2048). Weights 4 bytes (fp32) or 2 (bf16).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import our_model, emit

CONFIG = "configs/stable-diffusion/v1-finetune_everydream.yaml"


def gradients(params: list[torch.Tensor], step: int, directions: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same gradients for every optimizer: 0.3 x a fixed direction + noise, scaled 1e-3."""
    gen = torch.Generator(device="cuda").manual_seed(step)
    return [(0.3 * d + torch.randn(p.shape, device="cuda", generator=gen)).mul_(1e-3).to(p.dtype)
            for p, d in zip(params, directions)]


def build(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "torch AdamW, fp32 weights (reference)":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)
    if name == "ours adamw_bf16 (bf16 moments, stochastic rounding)":
        from ldm.optim.optimizers import OptimizerConfig, build_optimizer
        return build_optimizer({"unet": params}, OptimizerConfig.from_mapping(
            {"name": "adamw_bf16", "lr": lr, "weight_decay": 0.01}), "cuda")
    if name.startswith("ours adamw8bit_bf16"):
        from ldm.optim.optimizers import OptimizerConfig, build_optimizer
        return build_optimizer({"unet": params}, OptimizerConfig.from_mapping(
            {"name": "adamw8bit_bf16", "lr": lr, "weight_decay": 0.01}), "cuda")
    if name.startswith("bitsandbytes AdamW8bit"):
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.01)
    if name.startswith("torchao AdamW8bit"):
        from torchao.optim import AdamW8bit
        return AdamW8bit(params, lr=lr, weight_decay=0.01, bf16_stochastic_round="stochastic" in name)
    raise ValueError(name)


VARIANTS = [  # (name, weight dtype)
    ("torch AdamW, fp32 weights (reference)", torch.float32),
    ("ours adamw_bf16 (bf16 moments, stochastic rounding)", torch.bfloat16),
    ("ours adamw8bit_bf16 (bitsandbytes' 8-bit moments, stochastic rounding)", torch.bfloat16),
    ("bitsandbytes AdamW8bit, fp32 weights", torch.float32),
    ("bitsandbytes AdamW8bit, bf16 weights (rounds to nearest)", torch.bfloat16),
    ("torchao AdamW8bit, fp32 weights", torch.float32),
    ("torchao AdamW8bit, bf16 weights, stochastic rounding", torch.bfloat16),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-6, help="the fine-tune configs' base_learning_rate")
    parser.add_argument("--skip", default="", help="skip the variants whose name contains this (e.g. torchao: its "
                        "first step compiles for ~200 s)")
    args = parser.parse_args()
    torch.manual_seed(0)
    unet = our_model(CONFIG, use_checkpoint=False).model.to(torch.bfloat16)
    start = [p.detach().float() for p in unet.parameters()]  # bf16-representable
    del unet
    gen = torch.Generator(device="cuda").manual_seed(1234)
    directions = [torch.randn(w.shape, device="cuda", generator=gen) for w in start]
    emit({"weights": len(start), "parameters_M": round(sum(w.numel() for w in start) / 1e6, 1),
          "steps": args.steps, "lr": args.lr})
    reference = None
    for name, dtype in VARIANTS:
        if args.skip and args.skip in name:
            continue
        params = [torch.nn.Parameter(w.to(dtype, copy=True)) for w in start]  # start stays as it was
        try:
            opt = build(name, params, args.lr)
        except ImportError as e:
            emit({"optimizer": name, "error": str(e)})
            continue
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        times = []
        for step in range(args.steps):
            for p, g in zip(params, gradients(params, step, directions)):
                p.grad = g
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if step == 0:
                state = torch.cuda.memory_allocated() - before - sum(p.grad.nbytes for p in params)
            for p in params:
                p.grad = None
        final = [p.detach().float() for p in params]
        record = {"optimizer": name, "state_GiB": round(state / 2**30, 3),
                  "weights_GiB": round(sum(p.nbytes for p in params) / 2**30, 3),
                  "step_ms": round(1000 * statistics.median(times[-10:]), 2),
                  "first_step_s": round(times[0], 2)}
        if reference is None:
            reference = final
        else:
            moved = sum(((r - w) ** 2).sum() for r, w in zip(reference, start)).sqrt()
            err = sum(((f - r) ** 2).sum() for f, r in zip(final, reference)).sqrt()
            dot = sum(((f - w) * (r - w)).sum() for f, r, w in zip(final, reference, start))
            norm = sum(((f - w) ** 2).sum() for f, w in zip(final, start)).sqrt()
            record.update(rel_err=round(float(err / moved), 4), cos=round(float(dot / (norm * moved + 1e-30)), 4),
                          moved_over_reference=round(float(norm / moved), 4))
        emit(record)
        del opt, params, final
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
