"""GPU correctness check of the SD 1.x-size model (random weights).

Builds configs/stable-diffusion/v1-inference.yaml on the GPU, runs bf16-autocast
training steps (VAE encode, text encoder, UNet with SDPA attention, backward,
AdamW) and checks the loss is finite and every trainable tensor got a non-zero,
finite gradient. Prints peak memory and step time.

    python bench/gpu_check_sd1.py [--batch 2] [--size 512] [--checkpointing 0|1]
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.util import instantiate_from_config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--checkpointing", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = OmegaConf.load(args.config).model
    cfg.params.unet_config.params.use_checkpoint = bool(args.checkpointing)
    with torch.device("cuda"):
        model = instantiate_from_config({"target": cfg.target, "params": cfg.params}, path="model")
    # random weights everywhere, including the zero-initialised output layers, so every gradient is non-zero
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    model.train()
    model.learning_rate = 1e-5
    opt = model.configure_optimizers()["optimizer"]
    n_params = sum(p.numel() for p in model.model.parameters())
    print(f"UNet parameters: {n_params:,}; device {torch.cuda.get_device_name()}")
    batch = {"image": torch.rand(args.batch, 3, args.size, args.size, device="cuda") * 2 - 1,
             "caption": ["a photo of an astronaut riding a horse"] * args.batch}
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.shared_step(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            bad = [n for n, p in model.named_parameters() if p.requires_grad and
                   (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
            n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
            print(f"loss {loss.item():.5f} finite={torch.isfinite(loss).item()}; "
                  f"trainable tensors {n_trainable}, with zero/non-finite/missing grad: {len(bad)} {bad[:5]}")
            if bad or not torch.isfinite(loss):
                return 1
        opt.step()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"step {step}: loss {loss.item():.5f}, {dt * 1000:.0f} ms, {args.batch / dt:.1f} img/s")
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB "
          f"(batch {args.batch}, {args.size}px, bf16 autocast, checkpointing={bool(args.checkpointing)})")
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
