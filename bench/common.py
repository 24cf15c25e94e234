"""Shared by the bench scripts: the diffusers SD 1.5 UNet (benchmark-only dependency), our
model from a config, the timed loop, and the measured bf16 matmul rate for MFU. Profiling reports:
profiling.py."""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CAPTIONS = ["a photo of a meeb person standing on a beach at sunset, highly detailed"] * 256


def use_compile_cache() -> None:
    """BENCH_COMPILE_CACHE=<dir>: load torch.compile's portable caches (generated kernels,
    AOTAutograd graphs) from every <dir>/*.bin, and at a normal exit write this process's to
    <BENCH_COMPILE_CACHE_OUT or dir>/<script>-<hash of the arguments>.bin. A GPU machine
    started afresh then loads the kernels an earlier start compiled (same torch and GPU kind)
    instead of spending minutes compiling them again. A row killed by its time limit writes nothing."""
    load = os.environ.get("BENCH_COMPILE_CACHE")
    if not load:
        return
    for f in sorted(Path(load).glob("*.bin")):
        torch.compiler.load_cache_artifacts(f.read_bytes())
    out = Path(os.environ.get("BENCH_COMPILE_CACHE_OUT", load))
    name = f"{Path(sys.argv[0]).stem}-{hashlib.sha1(' '.join(sys.argv[1:]).encode()).hexdigest()[:8]}.bin"

    def save() -> None:
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(artifacts[0])
    atexit.register(save)


use_compile_cache()


def diffusers_sd15_unet() -> torch.nn.Module:
    """diffusers' UNet2DConditionModel with SD 1.5's configuration, random weights, on the GPU."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).cuda()


def our_model(config: str, use_checkpoint: bool, drop_network: bool = False,
              network: dict | None = None, train_text_encoder: bool = False,
              device: str = "cuda") -> torch.nn.Module:
    """LatentDiffusion from a config's model section, built directly on `device` (the GPU, or
    meta for shapes only); `network` overrides keys of its adapter section, `drop_network`
    removes it (a full fine-tune)."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    cfg = OmegaConf.load(ROOT / config).model
    cfg.params.unet_config.params.use_checkpoint = use_checkpoint
    cfg.params.cond_stage_trainable = train_text_encoder
    if drop_network and "network" in cfg.params:
        del cfg.params["network"]
    for key, value in (network or {}).items() if "network" in cfg.params else ():
        cfg.params.network[key] = value
    with torch.device(device):
        model = instantiate_from_config({"target": cfg.target, "params": cfg.params})
    model.learning_rate = 1e-4
    return model


def our_step(model: torch.nn.Module, batch: dict, params: list[torch.nn.Parameter], lr: float,
             optimizer: dict | None = None, opt: torch.optim.Optimizer | None = None) -> Callable[[], None]:
    """One training step as main.py runs it: shared_step under bf16 autocast, then the optimizer
    of an `optimizer` config section (default: fused AdamW), or `opt` (one already built, e.g. a
    trainer's), stepped with a closure as Lightning does."""
    from ldm.optim.optimizers import OptimizerConfig, build_optimizer

    if opt is None:
        opt = build_optimizer({"unet": params}, OptimizerConfig.from_mapping({**(optimizer or {}), "lr": lr}), "cuda")

    def mark(name: str) -> None:  # bench/phase_probe.py's marks, when step.phases is set
        if step.phases is not None:
            step.phases.mark(name)

    def closure() -> torch.Tensor:
        mark("batch_start")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.shared_step(batch)
        mark("backward")
        loss.backward()
        mark("after_backward")
        return loss

    def step() -> torch.Tensor:
        loss = opt.step(closure)
        mark("zero_grad")
        opt.zero_grad(set_to_none=True)
        mark("batch_end")
        if step.phases is not None:
            step.phases.end_step()
        return loss
    step.optimizer = opt  # for compile_updates
    step.phases = None
    return step


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    """The bf16 dense matmul rate this GPU reaches (the MFU denominator)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def step_flops(step: Callable[[], None], batch: int) -> float:
    """FLOPs per image of one step, as torch's FlopCounterMode counts them (SDPA included)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() / batch


def time_steps(step: Callable[[], None], batch: int, steps: int, warmup: int, **fields) -> dict:
    """Run warm-up steps, then time `steps`; returns img/s, ms/step and peaks as a dict."""
    t_start = time.perf_counter()
    for i in range(warmup):
        step()
        torch.cuda.synchronize()  # progress on stderr: a run cut off while compiling says how far it got
        print(f"warm-up step {i + 1}/{warmup} done at {time.perf_counter() - t_start:.0f} s",
              file=sys.stderr, flush=True)
    peak_all = torch.cuda.max_memory_allocated()  # the warm-up steps (and whatever ran since the last reset)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    return {**fields, "batch": batch, "img_per_s": round(batch * steps / dt, 2),
            "ms_per_step": round(1000 * dt / steps, 1), "peak_GiB": round(peak / 2**30, 3),
            "peak_incl_warmup_GiB": round(max(peak_all, peak) / 2**30, 3),
            "max_reserved_GiB": round(torch.cuda.max_memory_reserved() / 2**30, 3)}  # what the allocator held


def gpu_ms(fn: Callable[[], object], reps: int = 20) -> float:
    """GPU ms of one call of `fn`: CUDA events around `reps` calls, after three."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def tunableop(filename: str, max_tuning_ms: int) -> None:
    """Turn on torch's TunableOp: each product shape's first call times the cuBLAS / cuBLASLt
    algorithms the heuristics offer (up to `max_tuning_ms`) and later calls use the fastest.
    Results kept in memory (`filename` only where torch would write them)."""
    tunable = torch.cuda.tunable
    tunable.set_filename(filename)
    if hasattr(tunable, "write_file_on_exit"):  # torch >= 2.12
        tunable.write_file_on_exit(False)
    tunable.enable(True)
    tunable.tuning_enable(True)
    tunable.set_max_tuning_duration(max_tuning_ms)


def setup_cuda() -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)
