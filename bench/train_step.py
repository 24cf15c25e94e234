"""Full fine-tune training step at SD 1.x size: ours beside the diffusers baseline, with MFU.

    python bench/train_step.py --impl ours --batch 32                 # latents given (cached)
    python bench/train_step.py --impl ours --batch 32 --encode        # VAE encode (bf16) in the step
    python bench/train_step.py --impl ours --batch 32 --compile       # model.params.compile: regional
    python bench/train_step.py --impl ours --batch 1 --ckpt           # gradient checkpointing
    python bench/train_step.py --impl ours --batch 1 --ckpt --low_memory   # the 6 GiB configuration
    python bench/train_step.py --impl ours --batch 6 --low_memory --text_encoder [--compile]  # 12 GiB, 24 img/s
    python bench/train_step.py --impl diffusers --batch 32 [--compile] [--ckpt]
    python bench/train_step.py ... --profile    # where the GPU's and the host's time goes instead
    python bench/train_step.py ... --host_profile    # the host's time by Python function (cProfile)
    python bench/train_step.py --impl ours ... --phases     # host and GPU ms per phase (bench/phase_probe.py)
    python bench/train_step.py ... --profile_ops aten::copy_    # an operator's GPU time by shapes and callers
    python bench/train_step.py ... --sync_check     # every host-GPU sync of one step
    python bench/train_step.py --impl ours ... --compile --cudagraphs   # the UNet blocks as CUDA graphs
    python bench/train_step.py --impl ours|diffusers --batch 32 [--compile] --channels_last   # NHWC convolutions
    python bench/train_step.py --impl ours --batch 32 --compile --compile_blocks   # blocks, not the whole UNet
    python bench/train_step.py --impl ours --batch 32 --compile --cudagraphs --whole_unet   # the UNet as one CUDA graph
    python bench/train_step.py ... --compile --inductor conv_1x1_as_mm=1   # torch._inductor.config settings
    python bench/train_step.py ... --blas cublaslt|tunableop     # the products' library (bench/gemm_shapes.py)
    python bench/train_step.py ... --compile --channels_last --inductor_norm   # GroupNorms in inductor's kernels
    python bench/train_step.py ... --channels_last --norm_tiles 64,64,4,64   # the Triton norms' tiles
    python bench/train_step.py --impl ours --batch 32 --no_text_cache   # the text encoder run every step
    python bench/train_step.py --impl ours --batch 32 ... --frozen_on_cpu   # peak: the UNet step alone
    python bench/train_step.py --impl ours --batch 32 --compile --channels_last --unet_bf16   # probe: no weight casts
    python bench/train_step.py --impl ours --batch 32 --compile --channels_last --bf16_sr    # bf16 weights, adamw_bf16
    python bench/train_step.py --impl ours --batch 6 --low_memory --text_encoder --compile --old_update   # unfused
    python bench/train_step.py --impl ours --batch 32 --compile --channels_last --bf16_sr --host_delay_ms 2   # host
    python bench/train_step.py --impl ours --batch 32 [--compile --channels_last] --master   # fp32 master weights
    python bench/train_step.py --impl ours --batch 6 --encode --master --channels_last [--torch_norm]  # NHWC norms
    python bench/train_step.py --impl ours --batch 6 --ckpt --encode --plan RUN/dataset_plan.json  # a run's buckets
    python bench/train_step.py --impl ours --config configs/stable-diffusion/v2-finetune_everydream-v.yaml \
        --size 768 --batch 2 --encode --master                           # another model and image size

Random weights of the real architectures, 512 px, bf16 autocast, fp32 master weights, fused
AdamW. Ours is LatentDiffusion.shared_step of configs/stable-diffusion/v1-finetune_everydream.yaml
(the frozen CLIP text encoder's outputs kept after the first step, as main.py keeps them per
caption; `--no_text_cache` runs it every step); the diffusers baseline gets random
text embeddings, as in the research anchors. One JSON line per call: img/s, ms/step, peak GiB,
FLOPs per image (FlopCounterMode on one step) and MFU against the bf16 matmul rate measured
on this GPU in the same process. Run each configuration in its own process
(bench/train_step.sh runs the first table of doc/performance/step.md).
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (CAPTIONS, diffusers_sd15_unet, emit, matmul_tflops, our_model, our_step, setup_cuda, step_flops,
                    time_steps, tunableop)
from profiling import host_profile, profile, profile_ops, sync_check
from ldm.modules.regional_compile import compile_model, whole_unet_pays  # noqa: E402 (common puts the repo on sys.path)
from ldm.modules.diffusionmodules import triton_group_norm  # noqa: E402
from ldm.modules.diffusionmodules.util import GroupNorm32  # noqa: E402
from ldm.optim import low_memory  # noqa: E402
from ldm.optim.low_memory import compile_updates  # noqa: E402
from ldm.optim.master_weights import MasterWeights  # noqa: E402


def ours(args: argparse.Namespace, with_model: bool = False):
    model = our_model(args.config, args.ckpt,
                      train_text_encoder=args.text_encoder)
    model.cuda_graphs = False  # the configs' `auto` would record the step's graphs (compiled: refused); --graphs
    optimizer = None
    if args.low_memory:  # unet_precision: bf16 (frozen VAE and text encoder too), adamw_bf16, fused_backward
        frozen = [model.first_stage_model] + ([] if args.text_encoder else [model.cond_stage_model])
        for part in (model.model, *frozen):
            part.to(torch.bfloat16)
        optimizer = {"name": "adamw_bf16", "fused_backward": True}
    params = [p for p in model.model.parameters() if p.requires_grad]
    if args.text_encoder:  # cond_stage_trainable: true (fp32 weights, plain AdamW arithmetic)
        params += [p for p in model.cond_stage_model.parameters() if p.requires_grad]
    batch = {"tokens": model.cond_stage_model.tokenize(CAPTIONS[: args.batch]).cuda(),
             "caption": CAPTIONS[: args.batch]}
    if args.encode:
        model.first_stage_model.to(torch.bfloat16)
        batch["image"] = torch.rand(args.batch, 3, args.size, args.size, device="cuda") * 2 - 1
    else:
        batch["latent"] = torch.randn(args.batch, 4, args.size // 8, args.size // 8, device="cuda")
    if args.unet_bf16:  # a probe: the UNet's weights, gradients and AdamW moments in bf16, no casts in the step
        model.model.to(torch.bfloat16)
    if args.bf16_sr:  # unet_precision: bf16 (frozen VAE and text encoder too), adamw_bf16 stepped after the backward
        for part in (model.model, model.first_stage_model, model.cond_stage_model):
            part.to(torch.bfloat16)
        optimizer = {"name": "adamw_bf16"}
    if args.old_update:  # adamw_bf16 without its fused kernel: packs and chunks, or compiled packs
        from ldm.optim import triton_adamw
        triton_adamw.qualifies = lambda tensors: False
    masters = None
    if args.master:  # unet_precision: bf16 + optimizer.name: adamw_master, as LatentDiffusion.setup does it
        masters = MasterWeights(model.model)
        for part in (model.model, model.first_stage_model, model.cond_stage_model):
            part.to(torch.bfloat16)
        optimizer = {"name": "adamw_master"}
    if args.channels_last:  # 4-D weights NHWC: the convolutions' outputs follow, no layout transposes in cuDNN
        for part in (model.model, model.first_stage_model):
            part.to(memory_format=torch.channels_last)
    if args.torch_norm:  # eager NHWC maps through torch's GroupNorm (copies to NCHW), not Triton's
        triton_group_norm.qualifies = lambda x: False
    if args.no_text_cache:  # the frozen text encoder runs every step (cache_text_encoder_outputs: false)
        model.text_cache = None
    step = our_step(model, batch, params, lr=1e-5, optimizer=optimizer)
    if masters is not None:
        step.optimizer.use(masters)
    if args.plan:
        step = bucket_steps(step, batch, args.plan, args.batch)

    def compile_all():  # what model.params.compile: true (or reduce-overhead, --cudagraphs) does
        if args.graphs:  # model.params.cuda_graphs (eager kernels): a shape's second step on records its graphs
            model.cuda_graphs = True
            if not args.compile:
                return
        if args.pack_mib:
            low_memory.PACK_BYTES = int(args.pack_mib * 2**20)
        whole = args.whole_unet or (whole_unet_pays(args.cudagraphs, args.low_memory, args.ckpt)
                                    and not args.compile_blocks)
        budget = 1.0 if args.memory_budget is None else args.memory_budget  # compile_model sets torch's to it
        compile_model(model, cudagraphs=args.cudagraphs, whole_unet=whole, activation_memory_budget=budget)
        compile_updates(step.optimizer)
    if args.host_delay_ms:  # a probe: is the host's time between two steps on the GPU's critical path?
        plain = step

        def step():
            time.sleep(args.host_delay_ms / 1000)
            return plain()
        step.optimizer = plain.optimizer
    if args.frozen_on_cpu:  # the UNet step alone, as the diffusers baseline measures it (its context is random)
        with_frozen, moved = step, []

        def step():
            with_frozen()  # the first step fills the text encoder's output cache; later steps read it
            if not moved:
                moved.extend(part.cpu() for part in (model.first_stage_model, model.cond_stage_model))
        step.optimizer = with_frozen.optimizer
    if args.cudagraphs:  # as LatentDiffusion.training_step: each step starts a new replay
        graphed = step

        def step():
            torch.compiler.cudagraph_mark_step_begin()
            return graphed()
        step.optimizer = graphed.optimizer
    return (step, compile_all, model) if with_model else (step, compile_all)


def phase_report(step, warmup: int, steps: int = 30) -> None:
    """bench/phase_probe.py's line for `steps` steps after `warmup`, as main.py's PhaseProbe prints it."""
    from phase_probe import Phases, report

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    inner = step.__wrapped__ if hasattr(step, "__wrapped__") else step
    if not hasattr(inner, "phases"):
        raise SystemExit("--phases: the eager step of --impl ours only")
    inner.phases = Phases()
    for _ in range(steps + 1):
        step()
    report(f"bare step, {steps} steps", inner.phases)
    inner.phases = None


def bucket_steps(step, batch: dict, plan: str, batch_size: int):
    """`step` on images of a main.py run's aspect buckets (its dataset_plan.json) instead of
    512 x 512: each bucket three times first (its new shapes meet cuDNN in the warm-up; with
    --graphs a later step records its graphs), then a seeded shuffle of the epoch's batches,
    each bucket as often as the plan has batches of it."""
    buckets = json.loads(Path(plan).read_text())["buckets"]
    device = batch["tokens"].device
    images = [torch.rand(batch_size, 3, b["height"], b["width"], device=device) * 2 - 1 for b in buckets]
    epoch = [i for i, b in enumerate(buckets) for _ in range(b["batches"])]
    random.Random(0).shuffle(epoch)
    order = itertools.chain(*[range(len(buckets))] * 3, itertools.cycle(epoch))

    def bucket_step():
        batch["image"] = images[next(order)]
        return step()
    bucket_step.optimizer = step.optimizer
    bucket_step.buckets = len(buckets)
    bucket_step.__wrapped__ = step  # where --phases sets its marks
    return bucket_step


def baseline(args: argparse.Namespace):
    if args.encode:
        raise SystemExit("--encode: the diffusers baseline is measured with latents given")
    unet = diffusers_sd15_unet()
    if args.ckpt:
        unet.enable_gradient_checkpointing()
    unet.train()
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    latents = torch.randn(args.batch, 4, 64, 64, device="cuda")
    context = torch.randn(args.batch, 77, 768, device="cuda")
    abar = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, device="cuda") ** 2, 0)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True)

    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (args.batch,), device="cuda")
        a = abar[t].view(-1, 1, 1, 1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = unet(a.sqrt() * latents + (1 - a).sqrt() * noise, t, context).sample
        F.mse_loss(pred.float(), noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, unet.compile  # the whole UNet, in place


def set_inductor(settings: str) -> None:
    """Set torch._inductor.config from "key=value,..." (dotted keys for its sub-configs,
    e.g. triton.cudagraphs=1); an unknown key stops the run."""
    import torch._inductor.config as inductor_config

    for setting in filter(None, settings.split(",")):
        key, value = setting.split("=")
        *path, name = key.split(".")
        target = inductor_config
        for part in path:
            target = getattr(target, part)
        if not hasattr(target, name):
            raise SystemExit(f"--inductor: torch._inductor.config has no {key}")
        setattr(target, name, type(getattr(target, name))(int(value) if value.isdigit() else value))


def set_blas(blas: str) -> None:
    if blas == "cublaslt":
        torch.backends.cuda.preferred_blas_library("cublaslt")
    elif blas == "tunableop":
        tunableop("/tmp/train_step_tunableop.csv", max_tuning_ms=100)


def peak_since_reset() -> int:
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return peak


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=["ours", "diffusers"], default="ours")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--config", default="configs/stable-diffusion/v1-finetune_everydream.yaml",
                   help="ours: the model section of this config (e.g. a v2 fine-tune config)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (latents: size / 8)")
    p.add_argument("--ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--encode", action="store_true", help="encode 512 px images with the VAE in the step")
    p.add_argument("--low_memory", action="store_true",
                   help="ours: bf16 UNet weights, adamw_bf16, steps in the backward pass")
    p.add_argument("--text_encoder", action="store_true", help="ours: train the text encoder too")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--plan", help="with --encode: images of the buckets of this dataset_plan.json (a main.py run's), "
                                  "as often as the plan has batches of each, instead of 512 x 512")
    p.add_argument("--no_cudnn_benchmark", action="store_true", help="cuDNN's default algorithms, no trials")
    p.add_argument("--profile", action="store_true", help="print the kernels and host ops that take the time instead")
    p.add_argument("--profile_dump", help="with --profile: each kernel's GPU ms and calls a step, as JSON to this file")
    p.add_argument("--profile_ops", help="comma-separated operators (aten::copy_): their GPU time by input shapes "
                                         "and by calling Python lines, instead")
    p.add_argument("--host_profile", action="store_true", help="print the host's time by Python function instead")
    p.add_argument("--sync_check", action="store_true",
                   help="print every host-GPU sync of one step instead (after --profile, if given)")
    p.add_argument("--phases", action="store_true", help="ours: print the host's and the GPU's milliseconds per "
                                                         "phase of the step (bench/phase_probe.py) instead")
    p.add_argument("--pack_mib", type=float, help="ours, --low_memory --compile: compiled update packs of this many "
                                                   "MiB per tensor instead of low_memory.PACK_BYTES")
    p.add_argument("--cudagraphs", action="store_true", help="ours, with --compile: the UNet blocks as CUDA graphs")
    p.add_argument("--graphs", action="store_true", help="ours: model.params.cuda_graphs (the UNet's eager "
                   "forward and backward replayed from CUDA graphs, one pair per shape)")
    p.add_argument("--channels_last", action="store_true", help="the UNet's (and VAE's) 4-D weights in NHWC layout")
    p.add_argument("--whole_unet", action="store_true",
                   help="ours, with --compile: the UNet as one graph even where the trainer compiles its blocks "
                        "(with --cudagraphs: one CUDA graph each way)")
    p.add_argument("--compile_blocks", action="store_true",
                   help="ours, with --compile: the UNet's blocks as separate graphs where main.py compiles it whole")
    p.add_argument("--inductor", default="", help="comma-separated torch._inductor.config settings for --compile, "
                                                  "e.g. conv_1x1_as_mm=1,force_layout_optimization=1")
    p.add_argument("--memory_budget", type=float, help="with --compile: torch._functorch.config."
                                                          "activation_memory_budget (recompute to save memory)")
    p.add_argument("--bf16_sr", action="store_true", help="ours: unet_precision bf16 with adamw_bf16 (stochastic "
                                                          "rounding), without fused_backward")
    p.add_argument("--old_update", action="store_true", help="ours: adamw_bf16 without the fused Triton kernel")
    p.add_argument("--unet_bf16", action="store_true",
                   help="ours: the UNet stored in bf16 under plain fused AdamW (rounds away small updates: a probe "
                        "of what the step's weight casts and fp32 gradients cost, not a training setting)")
    p.add_argument("--host_delay_ms", type=float, default=0.0,
                   help="ours: sleep this long at each step's start (a probe: does the host's time between the "
                        "optimizer's launch and the next forward pass cost GPU time?)")
    p.add_argument("--master", action="store_true",
                   help="ours: bf16 UNet weights with fp32 masters (unet_precision: bf16, "
                        "optimizer.name: adamw_master)")
    p.add_argument("--torch_norm", action="store_true",
                   help="ours, --channels_last eager: torch's GroupNorm (NCHW copies) instead of group_norm_nhwc")
    p.add_argument("--no_text_cache", action="store_true",
                   help="ours: run the frozen text encoder every step (cache_text_encoder_outputs: false)")
    p.add_argument("--frozen_on_cpu", action="store_true",
                   help="ours, latents and text outputs cached: the frozen VAE and text encoder moved to the CPU "
                        "after the first step, so the peak is the UNet step's alone, as diffusers' row measures it")
    p.add_argument("--inductor_norm", action="store_true",
                   help="with --compile --channels_last: the GroupNorms (+ SiLU) through inductor's kernels "
                        "(GroupNorm32.triton_when_compiled = False), not the Triton operator "
                        "(bench/group_norm_step.py)")
    p.add_argument("--norm_tiles", default=None, metavar="P,C,WARPS,SPAN",
                   help="with --channels_last: the Triton GroupNorm kernels' tiles (triton_group_norm.Tiles) "
                        "instead of the shipped TILES (bench/group_norm_tiles.py)")
    p.add_argument("--blas", choices=["default", "cublaslt", "tunableop"], default="default",
                   help="the products' library: torch's choice, cuBLASLt preferred, or TunableOp (each shape's "
                        "fastest cuBLAS/cuBLASLt algorithm, tuned at its first call; bench/gemm_shapes.py)")
    return p


def step_args(**settings) -> argparse.Namespace:
    """This script's arguments at their defaults, with `settings` (for the other benches)."""
    args = parser().parse_args([])
    unknown = set(settings) - set(vars(args))
    if unknown:
        raise TypeError(f"step_args: no such argument {sorted(unknown)}")
    return argparse.Namespace(**{**vars(args), **settings})


def main() -> None:
    args = parser().parse_args()
    if args.memory_budget is not None:  # the diffusers baseline (ours passes it to compile_model)
        torch._functorch.config.activation_memory_budget = args.memory_budget
    set_inductor(args.inductor)
    if args.frozen_on_cpu and (args.impl != "ours" or args.encode or args.no_text_cache or args.text_encoder):
        raise SystemExit("--frozen_on_cpu: ours only, with the latents and the text encoder's outputs cached")
    setup_cuda()
    set_blas(args.blas)
    GroupNorm32.triton_when_compiled = not args.inductor_norm
    if args.norm_tiles:
        triton_group_norm.TILES = triton_group_norm.Tiles(*map(int, args.norm_tiles.split(",")))
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    rate = matmul_tflops()
    step, compile_fn = (ours if args.impl == "ours" else baseline)(args)
    args.warmup = max(args.warmup, 3 * getattr(step, "buckets", 0))  # every bucket's shapes (and graphs) first
    step()  # build kernels (cuDNN trials when benchmark is on) before counting
    first = peak_since_reset()  # model build and the first step
    flops = step_flops(step, args.batch)  # eager: the counter cannot see inside compiled graphs
    counting = peak_since_reset()  # the counter's dispatch mode holds more than a plain step
    if args.compile or args.graphs:
        compile_fn()  # compiled on the first warm-up step (graphs: recorded on the second)
    if args.profile:
        profile(step, rows=30, dump=args.profile_dump)
    if args.profile_ops:
        profile_ops(step, args.profile_ops.split(","))
    if args.host_profile:
        host_profile(step)
    if args.phases:
        phase_report(step, args.warmup)
    if args.sync_check:
        sync_check(step)
    if args.profile or args.profile_ops or args.host_profile or args.phases or args.sync_check:
        return
    if args.plan and not args.encode:
        raise SystemExit("--plan needs --encode (bucket shapes are image sizes)")
    record = time_steps(step, args.batch, args.steps, args.warmup, impl=args.impl, ckpt=args.ckpt,
                        compile=args.compile, encode=args.encode, low_memory=args.low_memory,
                        text_encoder=args.text_encoder, channels_last=args.channels_last,
                        **({"compile_blocks": True} if args.compile_blocks else {}),
                        **({"text_cache": False} if args.no_text_cache else {}),
                        **({"unet_bf16": True} if args.unet_bf16 else {}),
                        **({"bf16_sr": True} if args.bf16_sr else {}),
                        **({"old_update": True} if args.old_update else {}),
                        **({"host_delay_ms": args.host_delay_ms} if args.host_delay_ms else {}),
                        **({"cudagraphs": True, "whole_unet": args.whole_unet} if args.cudagraphs else {}),
                        **({"master": True} if args.master else {}),
                        **({"frozen_on_cpu": True} if args.frozen_on_cpu else {}),
                        **({"graphs": True} if args.graphs else {}),
                        **({"torch_norm": True} if args.torch_norm else {}),
                        **({"inductor": args.inductor} if args.inductor else {}),
                        **({"blas": args.blas} if args.blas != "default" else {}),
                        **({"inductor_norm": True} if args.inductor_norm else {}),
                        **({"norm_tiles": args.norm_tiles} if args.norm_tiles else {}),
                        **({"memory_budget": args.memory_budget} if args.memory_budget is not None else {}),
                        **({"plan": args.plan} if args.plan else {}))
    record.update(tflop_per_img=round(flops / 1e12, 3), matmul_tflops=round(rate, 1),
                  mfu=round(flops * record["img_per_s"] / (rate * 1e12), 3),
                  peak_first_step_GiB=round(first / 2**30, 3), peak_flop_count_GiB=round(counting / 2**30, 3))
    emit(record)


if __name__ == "__main__":
    main()
