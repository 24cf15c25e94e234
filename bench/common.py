"""Shared by the bench scripts: the diffusers SD 1.5 UNet (benchmark-only dependency), our
model from a config, the timed loop, and the measured bf16 matmul rate for MFU."""
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


def profile(step: Callable[[], None], steps: int = 3, rows: int = 25, dump: str | None = None) -> None:
    """Print what takes the GPU's time, then the host's, over `steps` steps (after warm-up)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    print_profile(prof, steps, rows, dump)


def print_profile(prof, steps: int, rows: int = 25, dump: str | None = None) -> None:
    """The operators by GPU time, then by host time, then the kernels by kind and the GPU's idle
    gaps. With `dump`, every kernel's (and memory copy's) GPU ms and count per step by name, as
    JSON to that file: two profiles' files diffed show which kernels one step runs and the other not."""
    table = prof.key_averages().table
    print(table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=90), flush=True)
    print(table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=90), flush=True)  # host side
    print_kernel_kinds(prof, steps)
    if dump is not None:
        from collections import defaultdict

        from torch.autograd import DeviceType
        totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for e in prof.events():
            if e.device_type == DeviceType.CUDA and not e.is_user_annotation:
                totals[e.name][0] += e.device_time_total / 1000 / steps
                totals[e.name][1] += 1 / steps
        Path(dump).write_text(json.dumps(totals, indent=0))


KERNEL_KINDS = [  # (kind, pattern of the GPU kernel's name); the first that matches names it
    ("fused (triton)", r"^triton_"),  # inductor's kernels (names like triton_poi_fused__to_copy_add_...)
    ("attention", r"sdpa|fmha|flash|attention|_fort_native"),
    ("convolution", r"fprop|dgrad|wgrad|conv|implicit_gemm|winograd"),
    ("matmul", r"gemm|nvjet|cutlass|sm90_xmma|cublas"),
    ("layout copy", r"nchwToNhwc|nhwcToNchw|transpose|copy"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("norm", r"norm"),
]


def print_kernel_kinds(prof, steps: int, top: int = 12) -> None:
    """The GPU time per step by kind of kernel (matmul, convolution, attention, fused elementwise,
    layout copies, optimizer, other), then the slowest fused kernels and the kernels counted as
    other: where a faster step has to come from."""
    import re
    from collections import defaultdict

    from torch.autograd import DeviceType

    kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    fused: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    other: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    # kernels only: not the CPU ops, nor the annotated ranges (Optimizer.step#...)
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    for e in kernels:
        kind = next((k for k, pattern in KERNEL_KINDS if re.search(pattern, e.name, re.I)), "other")
        for table, key in ((kinds, kind), (fused, e.name if kind == "fused (triton)" else None),
                           (other, e.name if kind == "other" else None)):
            if key is not None:
                table[key][0] += e.device_time_total
                table[key][1] += 1
    total = sum(us for us, _ in kinds.values())
    for title, table in ((f"kind of kernel (all kernels: {total / 1000 / steps:.1f} ms)", kinds),
                         ("fused kernel, the slowest", fused), ("kernel counted as other", other)):
        print(f"== GPU time per step by {title}", flush=True)
        for name, (us, n) in sorted(table.items(), key=lambda kv: -kv[1][0])[:top]:
            print(f"{us / 1000 / steps:8.2f} ms/step {us / total:6.1%} {n / steps:6.0f} kernels/step  {name}",
                  flush=True)
    print_gaps(kernels, steps, prof=prof)


def print_gaps(kernels: list, steps: int, top: int = 10, prof=None) -> None:
    """The GPU's idle time per step between the first kernel and the last (the time no kernel
    runs), and the longest idle gaps with the kernels on either side: where the host fell behind.
    With the profile (`prof`), the three longest also say when the host launched the kernel after
    the gap and what it ran since it was last ahead of the GPU (HostTimeline.describe): a late
    launch is the host's time, an early one a wait on the GPU's side (a memory copy, an event)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in kernels)
    gaps, end, before = [], spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start > end:
            gaps.append((start - end, before, name, end, start))
        if stop > end:
            end, before = stop, name
    idle = sum(g[0] for g in gaps)
    print(f"== GPU idle per step: {idle / 1000 / steps:.2f} ms of {(end - spans[0][0]) / 1000 / steps:.1f} ms "
          f"({len(gaps) / steps:.0f} gaps per step); the longest:", flush=True)
    host = HostTimeline(prof) if prof is not None else None
    for rank, (gap, after, next_, gap_start, gap_end) in enumerate(sorted(gaps, reverse=True)[:top]):
        print(f"{gap / 1000:8.3f} ms  after {after[:70]}  before {next_[:70]}", flush=True)
        if host is not None and rank < 3:
            print(host.describe(gap_start, gap_end), flush=True)


class HostTimeline:
    """The host's side of a profile, on the kernels' clock (microseconds, as FunctionEvent's
    time_range): each kernel's launch call, and the host's operators with their depth."""

    def __init__(self, prof) -> None:
        results = prof.profiler.kineto_results
        t0 = results.trace_start_ns()
        events = results.events()
        launches = {e.correlation_id(): e for e in events if str(e.device_type()) == "DeviceType.CPU"
                    and e.name().startswith(("cuda", "cu"))}
        self.kernels = []  # (start us, launched at us, name), by start
        for e in events:
            if str(e.device_type()) != "DeviceType.CPU":
                call = launches.get(e.linked_correlation_id()) or launches.get(e.correlation_id())
                if call is not None:
                    self.kernels.append(((e.start_ns() - t0) / 1000, (call.start_ns() - t0) / 1000, e.name()))
        self.kernels.sort()
        self.ops = []  # (start, end, depth, name) of the host's operators and annotations
        for e in prof.events():
            if e.device_type.name == "CPU":  # operators, annotations and runtime calls (cudaMemcpyAsync...)
                depth, parent = 0, e.cpu_parent
                while parent is not None:
                    depth, parent = depth + 1, parent.cpu_parent
                self.ops.append((e.time_range.start, e.time_range.end, depth, e.name))
        self.ops.sort()

    def describe(self, gap_start: float, gap_end: float, lead_ms: float = 1.0, depth: int = 6) -> str:
        """When the host launched the kernel after the gap; since when it had been less than
        `lead_ms` ahead of the GPU (the kernels before, back to the last one launched that far
        ahead); and its operators (down to `depth`) from then to the gap's end."""
        i = next((i for i, k in enumerate(self.kernels) if abs(k[0] - gap_end) < 1.0), None)
        if i is None:
            return "          (no launch call found for the kernel after the gap)"
        lines = [f"          launched {(self.kernels[i][1] - gap_start) / 1000:+.3f} ms from the gap's start"]
        j = i
        while j > 0 and self.kernels[j - 1][0] - self.kernels[j - 1][1] < 1000 * lead_ms:
            j -= 1
        since = self.kernels[j][1]
        lines.append(f"          the host less than {lead_ms} ms ahead for the {i - j} kernels before it, "
                     f"since {(since - gap_start) / 1000:+.3f} ms (first: {self.kernels[j][2][:60]})")
        for s, e, d, name in self.ops:
            if s < gap_end and e > since and d <= depth and min(e, gap_end) - max(s, since) >= 50:
                lines.append(f"          host {(s - gap_start) / 1000:+8.3f} ms {(e - s) / 1000:7.3f} ms "
                             f"{'  ' * d}{name[:80]}")
        return "\n".join(lines[:40])


def profile_ops(step: Callable[[], None], names: list[str], steps: int = 2, rows: int = 15) -> None:
    """Print the GPU time of the operators `names` (e.g. aten::copy_) by input shapes, then by the
    chain of callers (operators and Python lines): which tensors an unexpected copy moves, and why."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile as torch_profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True,
                       with_stack=True) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.name in names]
    for title, key in (("input shapes", lambda e: f"{e.name} {e.input_shapes}"), ("callers", callers)):
        groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for e in events:
            groups[key(e)][0] += e.device_time_total
            groups[key(e)][1] += 1
        print(f"== by {title}: {len(groups)} groups", flush=True)
        for where, (us, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:rows]:
            print(f"{us / 1000 / steps:8.2f} ms/step {n // steps:5d} calls/step  {where}", flush=True)


def callers(event, depth: int = 8) -> str:
    """The names of a profiler event's enclosing events, innermost first."""
    chain, parent = [event.name], event.cpu_parent
    while parent is not None and len(chain) < depth:
        chain.append(parent.name)
        parent = parent.cpu_parent
    return "\n      <- ".join(chain)


def host_profile(step: Callable[[], None], steps: int = 5, rows: int = 40) -> None:
    """Print where the host's time goes over `steps` steps (after warm-up), by Python function:
    cumulative (a function and what it calls) and own time. A host-bound step is as slow as this."""
    import cProfile
    import pstats

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    print(f"host {1000 * host / steps:.1f} ms per step, GPU done {1000 * (time.perf_counter() - t0) / steps:.1f} ms "
          f"per step (profiled)", flush=True)
    stats = pstats.Stats(prof).strip_dirs()
    stats.sort_stats("cumulative").print_stats(rows)
    stats.sort_stats("tottime").print_stats(rows)


def sync_check(step: Callable[[], None]) -> None:
    """Run one step (after warm-up) with CUDA sync debugging on: every operation that makes
    the host wait for the GPU prints a warning with the Python line that called it."""
    import warnings

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    step()
    torch.cuda.set_sync_debug_mode("default")
    print("sync check done", flush=True)


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
