"""Adapter training step at SD 1.x size: speed and peak memory, ours beside the diffusers + peft peer.

    python bench/lora_step.py --impl ours --mode lora --batch 8            # LoRA r16, UNet + text encoder
    python bench/lora_step.py --impl ours --mode lora --batch 1 --ckpt     # with gradient checkpointing
    python bench/lora_step.py --impl ours --mode full --batch 8            # full UNet fine-tune, same loop
    python bench/lora_step.py --impl peer --batch 8                        # diffusers UNet + peft LoRA r16
    python bench/lora_step.py --impl ours --batch 8 --compile              # model.params.compile: true
    python bench/lora_step.py --impl ours --batch 8 --compile --cudagraphs # compile: reduce-overhead
    python bench/lora_step.py --impl ours --batch 8 --profile              # where the GPU time goes
    python bench/lora_step.py --impl ours --batch 8 --sync_check           # every host-GPU sync in a step

Random weights of the real architectures, 512 px (64x64 latents given, as in the research
anchors: no VAE encode in the step), 77-token captions, bf16 autocast, fused AdamW. Each
call prints one JSON line: img/s over --steps timed steps after --warmup, and the peak
allocated memory. Run each configuration in its own process so peaks do not mix
(bench/lora_step.sh runs them all).

Ours is the training step main.py runs: LatentDiffusion.shared_step with the adapter
network of configs/lora/lora.yaml (rank 16, alpha 16 here), the frozen base in bf16.
The peer mirrors diffusers' train_text_to_image_lora.py: frozen bf16 UNet, VAE-free,
frozen CLIP text encoder run under no_grad, peft LoRA r16 on to_q/to_k/to_v/to_out.0.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import CAPTIONS, diffusers_sd15_unet, emit, our_model, our_step, setup_cuda, time_steps
from profiling import profile, sync_check
from ldm.modules.regional_compile import compile_model, whole_unet_pays  # noqa: E402 (common puts the repo on sys.path)


def ours(args: argparse.Namespace):
    network = {"dim": args.rank, "alpha": args.rank, "targets": args.targets}  # the peer's rank, scale 1
    model = our_model("configs/lora/lora.yaml", args.ckpt, drop_network=args.mode == "full", network=network)
    if args.mode == "lora":  # what LatentDiffusion.setup does under bf16-mixed
        for part in (model.model, model.first_stage_model, model.cond_stage_model):
            part.to(torch.bfloat16)
        params = list(model.network.parameters())
    else:
        params = [p for p in model.model.parameters() if p.requires_grad]
    tokens = model.cond_stage_model.tokenize(CAPTIONS[: args.batch]).cuda()
    batch = {"latent": torch.randn(args.batch, 4, 64, 64, device="cuda"), "tokens": tokens,
             "caption": CAPTIONS[: args.batch]}
    step = our_step(model, batch, params, lr=1e-4)
    if args.compile:  # model.params.compile: true (the UNet whole, in place), or reduce-overhead with --cudagraphs
        whole = whole_unet_pays(args.cudagraphs, fused_backward=False, use_checkpoint=False)
        compile_model(model, cudagraphs=args.cudagraphs, whole_unet=whole)
    if args.cudagraphs:  # what LatentDiffusion.training_step does: each step starts a new replay
        graphed = step

        def step():
            torch.compiler.cudagraph_mark_step_begin()
            graphed()
    return step, sum(p.numel() for p in params)


def peer(args: argparse.Namespace):
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = diffusers_sd15_unet()
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                      num_hidden_layers=12, max_position_embeddings=77, projection_dim=768,
                                      hidden_act="quick_gelu")).cuda()
    unet.requires_grad_(False)
    te.requires_grad_(False)
    unet.to(dtype=torch.bfloat16)
    te.to(dtype=torch.bfloat16)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # diffusers' cast_training_params: fp32 trainable weights
    if args.ckpt:
        unet.enable_gradient_checkpointing()
    if args.compile:
        unet.compile()
    unet.train()
    ids = torch.randint(0, 49408, (args.batch, 77), device="cuda")
    latents = torch.randn(args.batch, 4, 64, 64, device="cuda")
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, device="cuda") ** 2
    abar = torch.cumprod(1 - betas, 0)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step():
        with torch.no_grad():
            enc = te(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (args.batch,), device="cuda")
        a = abar[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = unet(noisy, t, enc).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in params)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=["ours", "peer"], default="ours")
    p.add_argument("--mode", choices=["lora", "full"], default="lora")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--compile", action="store_true", help="torch.compile (ours: regional, as the config switch)")
    p.add_argument("--cudagraphs", action="store_true", help="ours, with --compile: the UNet blocks as CUDA "
                   "graphs (model.params.compile: reduce-overhead)")
    p.add_argument("--targets", nargs="+", default=["unet", "text_encoder"], help="ours: what the adapters wrap")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="print the kernels that take the time instead")
    p.add_argument("--sync_check", action="store_true", help="print every host-GPU sync of one step instead")
    args = p.parse_args()
    setup_cuda()
    step, trainable = (ours if args.impl == "ours" else peer)(args)
    if args.profile:
        return profile(step)
    if args.sync_check:
        return sync_check(step)
    emit(time_steps(step, args.batch, args.steps, args.warmup, impl=args.impl, mode=args.mode, ckpt=args.ckpt,
                    compile=args.compile, cudagraphs=args.cudagraphs,
                    rank=args.rank, trainable_M=round(trainable / 1e6, 2)))


if __name__ == "__main__":
    main()
