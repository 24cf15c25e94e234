"""Shared by the bench scripts that profile a step: where the GPU's and the host's time goes
(torch.profiler tables, kernels by kind, the GPU's idle gaps, the host's timeline and Python
callers), and a check for host syncs. The timed loop and the models: common.py."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch


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
