"""Host time of the low-memory optimizer's update, per training step, at SD 1.x size.

    python bench/optimizer_host.py                 # adamw_bf16 over the UNet (and --text_encoder)
    python bench/optimizer_host.py --per_weight    # one optimizer per weight: before packs and buckets

The weights, gradients and moments live on the meta device: every operation is dispatched
but computes nothing, so the time is what the host spends issuing the update (Python,
dispatch, allocation), the part that bounds small-batch steps (doc/PERFORMANCE.md). Two
distortions: many operations compute their output shapes in Python on the meta device,
which a GPU does not, and the kernel launches themselves are left out. Compare variants by
the ratio, and by the kernel count printed beside the time."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.optim.low_memory import AdamWBF16  # noqa: E402


def sd15_weights(text_encoder: bool) -> list[torch.nn.Parameter]:
    """The trainable weights of the SD 1.x UNet (bf16) and, optionally, text encoder (fp32), on meta."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs/stable-diffusion/v1-finetune_everydream.yaml")
    with torch.device("meta"):
        unet = instantiate_from_config(cfg.model.params.unet_config).to(torch.bfloat16)
        params = list(unet.parameters())
        if text_encoder:
            params += list(instantiate_from_config(cfg.model.params.cond_stage_config).parameters())
    return [torch.nn.Parameter(p.detach()) for p in params]


def count_kernels(step) -> int:
    """Operations that would launch a kernel on the GPU (meta-device dispatches, views excluded)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {"view", "_unsafe_view", "split", "unbind", "as_strided", "detach", "alias", "set_"}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] not in views:
                Count.n += 1
            return func(*args, **(kwargs or {}))
    with Count():
        step()
    return Count.n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text_encoder", action="store_true", help="the text encoder's weights too (fp32)")
    p.add_argument("--per_weight", action="store_true", help="one optimizer per weight (the earlier fused_backward)")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    params = sd15_weights(args.text_encoder)
    for w in params:
        w.grad = torch.empty_like(w)
    optimizers = [AdamWBF16([w], lr=1e-5) for w in params] if args.per_weight else [AdamWBF16(params, lr=1e-5)]

    def step():
        for opt in optimizers:
            opt.step()
    step()  # state allocated
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    ms = 1000 * (time.perf_counter() - t0) / args.steps
    print({"weights": len(params), "per_weight": args.per_weight, "host_ms_per_step": round(ms, 1),
           "kernels_per_step": count_kernels(step)})


if __name__ == "__main__":
    main()
