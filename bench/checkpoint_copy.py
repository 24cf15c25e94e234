"""How fast can a training checkpoint's state leave the GPU? (issue: performance, target 2)

    python bench/checkpoint_copy.py            # an SD 1.x full fine-tune's state, ~11 GB
    python bench/checkpoint_copy.py --scale 0.01 --device cpu   # a smoke run of the script

The end-to-end run pauses ~8.5 s per epoch end in the training thread, mostly in
BackgroundCheckpointIO's host copy (doc/PERFORMANCE.md). This times that copy and the
alternatives, each twice (the second save of a run may reuse what the first allocated):

  pageable   what BackgroundCheckpointIO does: tensor.to("cpu") per tensor, fresh memory
  reused     copy_ into the pageable tensors of the previous save (no page faults)
  pinned     a page-locked tensor per tensor (torch's caching host allocator), non_blocking
             copies, one synchronize; the second round gets the cached blocks back
  flat       one page-locked buffer (the whole state is fp32 here), the tensors as views,
             kept between saves

    python bench/checkpoint_copy.py --io /tmp    # BackgroundCheckpointIO itself (through_io)

The state: the UNet's fp32 weights and AdamW's two moments (3 x 0.86 B elements) plus the
frozen VAE and text encoder, as tensors of the real shapes. Prints one JSON line per variant
and round: seconds and GB/s. Every variant holds a full host copy (~11 GB; pinned and flat
page-locked), so the machine needs ~25 GB of free host memory.
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from common import emit, our_model
from ldm.callbacks.checkpointing import _host_copy  # noqa: E402 (common puts the repo on sys.path)


def sd1_state(scale: float, device: str) -> list[torch.Tensor]:
    """Tensors shaped like an SD 1.x full fine-tune checkpoint's (weights, two moments, frozen parts)."""
    model = our_model("configs/stable-diffusion/v1-finetune_everydream.yaml", False, device="meta")
    shapes = [p.shape for p in model.model.parameters()] * 3 + [p.shape for n, p in model.named_parameters()
                                                                if not n.startswith("model.")]
    numel = [max(1, int(torch.Size(s).numel() * scale)) for s in shapes]
    return [torch.randn(n, device=device) for n in numel]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def pageable(state, keep, device):
    return [_host_copy(t, {}, {}) for t in state]


def reused(state, keep, device):
    if keep is None:
        return pageable(state, None, device)
    for dst, t in zip(keep, state):
        dst.copy_(t)
    return keep


def pinned(state, keep, device):
    pin = device == "cuda"
    out = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t, non_blocking=pin) for t in state]
    sync(device)
    return out


def flat(state, keep, device):
    pin = device == "cuda"
    if keep is None:
        keep = torch.empty(sum(t.numel() for t in state), dtype=state[0].dtype, pin_memory=pin)
    offset = 0
    for t in state:
        keep[offset: offset + t.numel()].view(t.shape).copy_(t, non_blocking=pin)
        offset += t.numel()
    sync(device)
    return keep


def through_io(state: list[torch.Tensor], device: str, folder: str) -> None:
    """What the run does: BackgroundCheckpointIO's reserve (the writer thread allocates, touches and,
    with the free memory for it, page-locks the host memory), then two saves. Each prints the
    seconds the save call held the training thread, the seconds until the file was written, and
    whether the file holds the values at save time although every tensor was changed in place right
    after the call (the next optimizer step, queued behind the copies)."""
    from pathlib import Path

    from ldm.callbacks.checkpointing import BackgroundCheckpointIO

    io = BackgroundCheckpointIO()
    t0 = time.perf_counter()
    assert io.reserve(state), "not enough free host memory to reserve the copy"
    io._reserved.result()
    emit({"variant": "io", "reserve_s": round(time.perf_counter() - t0, 3)})
    probes = [0, len(state) // 2, max(range(len(state)), key=lambda i: state[i].numel())]
    for round_ in (1, 2):
        before = {i: state[i].clone() for i in probes}
        path = Path(folder) / f"checkpoint_copy_{round_}.ckpt"
        sync(device)
        t0 = time.perf_counter()
        io.save_checkpoint({"state": state}, path)
        called = time.perf_counter() - t0
        torch._foreach_add_(state, 1.0)  # the next step's update, in place, queued behind the copies
        io.wait()
        written = time.perf_counter() - t0
        pinned = any(arena.pinned for arena in io._arenas)
        loaded = torch.load(path, weights_only=True)["state"]
        same = all(torch.equal(loaded[i], before[i].cpu()) for i in probes)
        path.unlink()
        emit({"variant": "io", "round": round_, "pinned": pinned, "save_call_s": round(called, 3),
              "written_s": round(written, 1), "file_holds_the_state_at_save_time": same})
    io.teardown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=float, default=1.0, help="fraction of each tensor's size (smoke runs)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", nargs="+", default=["pageable", "reused", "pinned", "flat"])
    p.add_argument("--io", metavar="FOLDER", help="instead: BackgroundCheckpointIO's reserve and two saves into FOLDER")
    args = p.parse_args()
    state = sd1_state(args.scale, args.device)
    if args.io:
        return through_io(state, args.device, args.io)
    nbytes = sum(t.numel() * t.element_size() for t in state)
    for name in args.variants:
        fn = globals()[name]
        keep = None
        for round_ in (1, 2):
            sync(args.device)
            t0 = time.perf_counter()
            copy = fn(state, keep, args.device)
            dt = time.perf_counter() - t0
            emit({"variant": name, "round": round_, "tensors": len(state), "GB": round(nbytes / 1e9, 2),
                  "seconds": round(dt, 3), "GB_per_s": round(nbytes / 1e9 / dt, 2)})
            keep = copy if name in ("reused", "flat") else None
            del copy
            gc.collect()
        del keep
        gc.collect()
        if args.device == "cuda":
            torch._C._host_emptyCache()  # the pinned variant's cached blocks, before the next variant


if __name__ == "__main__":
    main()
