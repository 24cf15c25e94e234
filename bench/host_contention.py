"""Does other work on the host slow a host-bound training step that it does not touch?

    python bench/host_contention.py                      # the fine-tune configs' step: batch 6, VAE in the step
    python bench/host_contention.py --loads idle burn4 idle --steps 30
    python bench/host_contention.py --loads $(printf 'idle %.0s' {1..16})   # the host's own drift

Builds the bare step once (bench/train_step.py's, `--master --encode --no_cudnn_benchmark`), then
times `--steps` steps under each load in turn, with `idle` between them to follow the host's
drift. Loads: `idle`; `burnN`: N processes spinning in Python (other cores busy, no shared
memory, no GIL); `dd`: a process writing 12 GiB to disk (page cache, the kernel's writeback);
`thread_save`: a thread of this process torch.save-ing 12 GiB of page-locked host tensors to a
file, as the checkpoint writer does after each epoch, but in 48 tensors of 256 MiB; `ckpt_save`: the
same thread writing a state of the fine-tune checkpoint's tensors (the model's state dict, and per
UNet weight its fp32 master, two moments and a step: ~4,000 tensors, ~12 GB, in a page-locked
HostArena) with the writer's own `atomic_torch_save`: one GIL hand-over per tensor; `ckpt_save_gated`:
the same, its writes held while the step is not inside `loss.backward()` (a probe of a writer that
takes the GIL only while the training thread waits on autograd's thread). Each of these runs from 1 s before the
timed steps to their end. The arena loads start with the steps: a thread reserving 12 GiB of
host memory for the checkpoint's copy, as the writer thread does after the run's first step
(ldm/callbacks/host_arena.py: map, write every page, then with `_pin` cudaHostRegister), its
phases timed. `arena`: HostArena as it is without `pin` (a private map, 4 KiB pages);
`arena_pin`: as it is with `pin` (transparent huge pages, then registered); `arena_pin_4k`:
registered without asking for huge pages; `arena_pin_shared`: the shared anonymous map HostArena
used before (shmem: no huge pages).

One JSON line per load: ms per step and its ratio to the mean of the `idle` measurements beside
it; the CPU ms per step of the training thread and of the whole process (the autograd thread
launches the backward's kernels; a load's thread counts there too); the share of the machine's
CPU time the hypervisor stole in the window (/proc/stat); the GPU's SM clock 2 s into it
(nvidia-smi); the longest step and the seconds the steps took over the window's median step (a
stall of one step shows there, not in the mean). Read with doc/performance/end-to-end.md:
a slowdown under `burnN` with cores to spare is the host's clock or shared resources, not our
code.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch

from common import setup_cuda
from thread_probe import _host as host_jiffies  # (busy, steal, total) from /proc/stat
from train_step import ours, step_args

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ldm.callbacks.checkpointing import atomic_torch_save  # noqa: E402
from ldm.callbacks.host_arena import HostArena, _anonymous_map, _register  # noqa: E402


def sm_clock() -> int | None:
    """The GPU's SM clock in MHz now, or None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10).stdout
        return int(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


SAVE_GIB = 12  # ~ an SD 1.x checkpoint with bf16 weights, fp32 masters and AdamW moments
ARENA_LOADS = ["arena", "arena_pin", "arena_pin_4k", "arena_pin_shared"]
CKPT_STATE: dict[str, torch.Tensor] = {}  # ckpt_save's state, made once (checkpoint_state)
IN_BACKWARD = threading.Event()  # ckpt_save_gated: set while the step is inside loss.backward()


def checkpoint_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Host tensors shaped as a fine-tune checkpoint's (adamw_master): the state dict, and per UNet
    weight an fp32 master, two fp32 moments and a step, in one page-locked HostArena."""
    layouts = [(tuple(v.shape), v.dtype) for v in model.state_dict().values()]
    for p in model.model.parameters():
        layouts += [(tuple(p.shape), torch.float32)] * 3 + [((), torch.float32)]
    arena = HostArena(layouts, pin=True)
    tensors = [t for ts in arena.tensors.values() for t in ts]
    return {f"t{i}": t for i, t in enumerate(tensors)}


def _gated_backward(backward):
    def wrapped(*args, **kwargs):
        IN_BACKWARD.set()
        try:
            return backward(*args, **kwargs)
        finally:
            IN_BACKWARD.clear()
    return wrapped


class _GatedFile:
    """A file whose writes wait until the training thread is inside the backward (at most 1 s)."""
    def __init__(self, f):
        self.f = f

    def write(self, data) -> int:
        IN_BACKWARD.wait(1.0)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


class Load:
    def __init__(self, name: str, folder: str):
        self.name, self.folder = name, folder
        self.procs: list[subprocess.Popen] = []
        self.thread: threading.Thread | None = None
        self.phases: dict[str, float] = {}  # the arena loads': seconds of each phase

    def start(self) -> None:
        if self.name.startswith("burn"):
            self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                          for _ in range(int(self.name[4:]))]
        elif self.name == "dd":
            self.procs = [subprocess.Popen(["dd", "if=/dev/zero", f"of={self.folder}/dd.bin", "bs=64M",
                                            f"count={SAVE_GIB * 16}", "conv=fsync"], stderr=subprocess.DEVNULL)]
        elif self.name == "thread_save":
            state = {f"t{i}": torch.zeros(2**28 // 4, dtype=torch.float32).pin_memory()
                     for i in range(SAVE_GIB * 4)}  # 256 MiB each

            def save() -> None:
                with open(f"{self.folder}/save.pt", "wb") as f:
                    torch.save(state, f)
                    f.flush()
                    os.fsync(f.fileno())
            self.thread = threading.Thread(target=save)
            self.thread.start()
        elif self.name in ("ckpt_save", "ckpt_save_gated"):
            gated = self.name.endswith("_gated")

            def save_ckpt() -> None:
                t0 = time.perf_counter()
                path = f"{self.folder}/save.pt"
                if gated:
                    with open(path, "wb") as f:
                        IN_BACKWARD.wait(1.0)
                        torch.save(CKPT_STATE, _GatedFile(f))
                        f.flush()
                        os.fsync(f.fileno())
                else:
                    atomic_torch_save(CKPT_STATE, path)
                self.phases.update(save_s=round(time.perf_counter() - t0, 2), tensors=len(CKPT_STATE))
            self.thread = threading.Thread(target=save_ckpt)
            self.thread.start()
        elif self.name in ARENA_LOADS:
            self.thread = threading.Thread(target=self._reserve)
            self.thread.start()
            return
        elif self.name != "idle":
            raise SystemExit(f"unknown load {self.name!r}")
        time.sleep(1.0)

    def _reserve(self) -> None:
        """HostArena's steps for one 12 GiB buffer, each timed: map and write every page, register."""
        t0 = time.perf_counter()
        if self.name == "arena":
            buffer = HostArena([((SAVE_GIB << 30,), torch.uint8)]).buffer
        else:  # HostArena(pin=True)'s steps, with the register timed on its own
            if self.name.endswith("_shared"):  # HostArena's map before it was private
                buffer_map = mmap.mmap(-1, SAVE_GIB << 30)
            else:
                buffer_map = _anonymous_map(SAVE_GIB << 30, huge_pages=not self.name.endswith("_4k"))
            buffer = torch.frombuffer(buffer_map, dtype=torch.uint8)  # keeps the map alive
            buffer.fill_(0)
        t1 = time.perf_counter()
        self.phases["fill_s"] = round(t1 - t0, 3)
        self.phases["huge_pages_gib"] = round(_anon_huge_kib() / 2**20, 2)
        if self.name != "arena":
            registered = _register(buffer)
            t2 = time.perf_counter()
            self.phases.update(registered=registered, register_start_s=round(t1 - t0, 3), register_s=round(t2 - t1, 3))
            if registered:
                torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
                self.phases["unregister_s"] = round(time.perf_counter() - t2, 3)

    def stop(self) -> dict:
        running = any(p.poll() is None for p in self.procs) or (self.thread is not None and self.thread.is_alive())
        for p in self.procs:
            p.kill()
            p.wait()
        if self.thread is not None:
            self.thread.join()
        for name in ("dd.bin", "save.pt"):
            if os.path.exists(f"{self.folder}/{name}"):
                os.remove(f"{self.folder}/{name}")
        return {"load_outlasted_steps": running, **self.phases}


def _anon_huge_kib() -> int:
    """This process's anonymous memory in transparent huge pages, KiB (/proc/self/smaps_rollup)."""
    try:
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--loads", nargs="+", default=["idle", "burn1", "idle", "burn4", "idle", "burn8", "idle",
                                                  "burn14", "idle", "dd", "idle", "thread_save", "idle"])
    p.add_argument("--folder", default=tempfile.gettempdir(), help="where dd and thread_save write")
    cli = p.parse_args()
    args = step_args(batch=cli.batch, encode=True, master=True)
    setup_cuda()
    torch.backends.cudnn.benchmark = False
    step, _, model = ours(args, with_model=True)
    if any(name.startswith("ckpt_save") for name in cli.loads):
        CKPT_STATE.update(checkpoint_state(model))
        print(json.dumps({"ckpt_state_tensors": len(CKPT_STATE),
                          "ckpt_state_gb": round(sum(t.nbytes for t in CKPT_STATE.values()) / 1e9, 2)}), flush=True)
    torch.autograd.backward = _gated_backward(torch.autograd.backward)  # IN_BACKWARD for ckpt_save_gated
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    rows = []
    for name in cli.loads:
        load = Load(name, cli.folder)
        load.start()
        _, steal0, total0 = host_jiffies()
        thread0, process0 = time.thread_time(), time.process_time()
        t0 = time.perf_counter()
        clock: list[int | None] = []
        sampler = threading.Timer(2.0, lambda: clock.append(sm_clock()))  # off the training thread
        sampler.start()
        ends = [t0]
        for _ in range(cli.steps):
            step()
            ends.append(time.perf_counter())
        torch.cuda.synchronize()
        IN_BACKWARD.set()  # no training after the window: a gated save runs free to its end
        ms = 1000 * (time.perf_counter() - t0) / cli.steps
        thread_ms = 1000 * (time.thread_time() - thread0) / cli.steps
        process_ms = 1000 * (time.process_time() - process0) / cli.steps
        _, steal1, total1 = host_jiffies()
        sampler.join()
        steps_s = sorted(b - a for a, b in zip(ends, ends[1:]))
        median_s = steps_s[len(steps_s) // 2]
        row_load = load.stop()
        IN_BACKWARD.clear()
        rows.append({"load": name, "ms_per_step": round(ms, 1), "cpus": os.cpu_count(),
                     "main_thread_cpu_ms": round(thread_ms, 1), "process_cpu_ms": round(process_ms, 1),
                     "steal_pct": round(100 * (steal1 - steal0) / max(total1 - total0, 1), 2),
                     "sm_mhz": clock[0] if clock else None, "max_step_ms": round(1000 * steps_s[-1], 1),
                     "over_median_s": round(sum(max(s - median_s, 0.0) for s in steps_s), 3),
                     **row_load})
    for i, row in enumerate(rows):
        idle = [rows[j]["ms_per_step"] for j in (i - 1, i + 1)
                if 0 <= j < len(rows) and rows[j]["load"] == "idle"]
        if row["load"] != "idle" and idle:
            row["over_idle_beside"] = round(row["ms_per_step"] / (sum(idle) / len(idle)), 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
