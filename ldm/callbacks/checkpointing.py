"""Checkpoint files that are never half-written, and a save when a run is interrupted.

* `AtomicCheckpointIO` writes every Lightning checkpoint to a temporary file in the
  target folder, fsyncs it and renames it over the target, so a crash or a full
  disk never leaves a truncated `last.ckpt` behind.
* `BackgroundCheckpointIO` does the same from a writer thread: the checkpoint is first
  copied to host memory (a point-in-time copy, so training may go on changing the
  weights), then written while the next steps run. Writes and removals keep their order;
  a failed write stops the run at the next save, and the end of the run (also after an
  error or Ctrl-C) waits for every write. The host memory of a finished write is kept
  for the next save, which copies into it (an SD 1.x full fine-tune's 11 GB: 0.8 s instead of
  7-8 s into fresh memory on an H200, doc/PERFORMANCE.md); it is freed at the end of the run.
  For the run's first save, `reserve` allocates and touches that memory from the writer
  thread while training goes on, page-locked for CUDA when the host has twice its size free
  (host_arena.py): the copies from the GPU are then queued on the stream rather than waited
  for, and the writer thread waits for them. Without the host memory for the copy it writes
  in place, as `AtomicCheckpointIO`. A save of the state the previous one wrote (last.ckpt
  after an epoch's checkpoint) becomes a hard link to that file once it is written: the
  11 GB are written once per epoch, not twice.
* `RunCheckpoint` is Lightning's ModelCheckpoint with `last.ckpt` written at the end of
  training too, whatever the save interval, and the first save's host memory reserved
  after the first optimizer step (once the optimizer's state exists).
* `InterruptCheckpoint` turns the first Ctrl-C into a stop at the next batch
  boundary (a second Ctrl-C aborts at once), and on Ctrl-C, SIGTERM or an
  exception saves `interrupted-epoch=EE-step=SSSSS.ckpt` (or `errored-...`) and
  names the file; not when no optimizer step has run since the start (or the resume),
  where it would only copy the weights the run began with (11 GB at SD size).
"""
from __future__ import annotations

import os
import secrets
import signal
import tempfile
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Iterable

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ldm.callbacks.host_arena import HostArena
from ldm.callbacks.writer import WriterThread


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_torch_save(checkpoint, path)


class BackgroundCheckpointIO(AtomicCheckpointIO):
    """Atomic checkpoint writes from one background thread, from a host copy of the state.

    Consecutive saves of the same training state (an epoch's checkpoint and last.ckpt)
    share the host copy of every tensor that did not change in between, so they cost one
    copy, not two; when nothing changed at all (the same step, every tensor as it was), the
    second file is a hard link to the first, made once that one is written (`_link_or_save`),
    so the state is written once, not twice. Once every write is done, the next save copies
    into the host tensors of the last one (same shape and dtype) rather than into fresh
    memory, whose pages the copy would fault in one by one."""

    def __init__(self) -> None:
        super().__init__()
        self._writer = WriterThread("checkpoint-writer", "checkpoint")
        self._copies: dict[tuple, torch.Tensor] = {}  # the latest save's host copies, by tensor identity
        self._spare: dict[tuple, list[torch.Tensor]] = {}  # host tensors no write uses, by (shape, dtype)
        self._reserved: Future | None = None  # reserve(): the writer thread touching host tensors
        self._arenas: list[HostArena] = []  # reserved memory, unregistered at teardown
        self._last_save: tuple[Path, Any] | None = None  # the latest background save: path, _state_of its state

    def reserve(self, tensors: Iterable[torch.Tensor]) -> bool:
        """Allocate host tensors for a copy of `tensors` (the next checkpoint's) and write
        every page of them, in the writer thread, so that the first save copies into touched
        memory as the later ones do. Only while no host memory is kept and when the copy fits
        in the free memory (the rule of save_checkpoint); returns whether it was queued."""
        if self._copies or self._spare or self._reserved is not None:
            return False
        layouts = [_layout(t) for t in {_tensor_key(t): t for t in tensors}.values()]
        needed = sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in layouts)
        free = _available_host_memory()
        if free is not None and needed * 1.25 >= free:
            return False
        pin = free is not None and needed * 2 < free  # page-locked memory cannot be swapped out: ample room only
        self._reserved = self._writer.call(_touched_host_tensors, layouts, pin)
        return True

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("BackgroundCheckpointIO takes no storage_options")
        self._writer.collect()
        if not self._writer.pending:  # no write reads the host copies any more: their memory is free to reuse
            self._spare = _by_layout(self._copies.values())
            self._copies = {}
        self._take_reserved()
        state, last, self._last_save = _state_of(checkpoint), self._last_save, None
        if not _host_memory_for(checkpoint, self._copies, self._spare):
            self.wait()  # in order: behind every earlier write
            rank_zero_info(f"{path}: not enough free host memory to copy the checkpoint; writing it in place")
            self._copies, self._spare = {}, {}
            atomic_torch_save(checkpoint, path)
            return
        copies: dict[tuple, torch.Tensor] = {}
        host = apply_to_collection(checkpoint, torch.Tensor, _host_copy, self._copies, copies, self._spare)
        self._copies, self._spare = copies, {}  # spare tensors this state had no use for are freed
        copied = None  # copies into page-locked memory are queued on the stream: the writer waits for them
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            copied = torch.cuda.Event()
            copied.record()
        if last is not None and last[1] == state and last[0].parent == Path(path).parent:
            self._writer.submit(path, _link_or_save, copied, host, last[0], path)  # the same state: a link
        else:
            self._writer.submit(path, _save_when_copied, copied, host, path)
        self._last_save = Path(path), state

    def remove_checkpoint(self, path: Any) -> None:
        self._writer.submit(path, super().remove_checkpoint, path)  # after the writes queued before it

    def wait(self) -> None:
        """Block until every queued write is done; raise the first failure, naming its file."""
        self._writer.collect(wait=True)

    def teardown(self) -> None:
        try:
            self._writer.shutdown()
        finally:
            if self._reserved is not None:
                self._take_reserved()  # done by now (the writer has shut down): its arena to release
            for arena in self._arenas:
                arena.release()
            self._copies, self._spare, self._reserved, self._arenas = {}, {}, None, []

    def _take_reserved(self) -> None:
        """Add the reserved host tensors to the spare ones (waiting if they are still being touched)."""
        if self._reserved is None:
            return
        try:
            arena = self._reserved.result()
        except Exception as e:  # e.g. MemoryError: this save copies into fresh memory instead
            rank_zero_warn(f"could not reserve host memory for the checkpoint copy: {e}")
            arena = None
        self._reserved = None
        if arena is not None:
            self._arenas.append(arena)
            for layout, tensors in arena.tensors.items():
                self._spare.setdefault(layout, []).extend(tensors)


def _tensor_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's current contents: its memory, view and in-place version."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
            t._version)


def _layout(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype


def _by_layout(tensors: Any) -> dict[tuple, list[torch.Tensor]]:
    spare: dict[tuple, list[torch.Tensor]] = {}
    for t in {id(t): t for t in tensors}.values():
        spare.setdefault(_layout(t), []).append(t)
    return spare


def _touched_host_tensors(layouts: list[tuple], pin: bool) -> HostArena:
    """Zero-filled host tensors of these (shape, dtype) layouts, page-locked with `pin` where
    CUDA allows: the fill writes every page, so the copy into them later faults none in."""
    return HostArena(layouts, pin)


def _save_when_copied(copied: torch.cuda.Event | None, checkpoint: dict[str, Any], path: Any) -> None:
    if copied is not None:
        copied.synchronize()  # the queued copies from the GPU have landed
    atomic_torch_save(checkpoint, path)


SMALL_CPU_TENSOR = 1 << 20  # bytes: _state_of compares CPU tensors up to this size by their contents


def _link_or_save(copied: torch.cuda.Event | None, checkpoint: dict[str, Any], source: Path, path: Any) -> None:
    """`path` as a hard link to `source`, the same state written just before (a link under a
    temporary name, then renamed over `path`: a crash leaves the old file or the new one);
    written in full where the file system has no hard links or `source` was not written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.link")
    try:
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        _save_when_copied(copied, checkpoint, path)


def _state_of(checkpoint: dict[str, Any]) -> tuple:
    """What makes two checkpoints the same training state: the step and epoch, every
    tensor's identity and in-place version, and the contents of small CPU tensors, which a
    save makes afresh (the RNG states). ModelCheckpoint's own bookkeeping, the file names of
    the last and best checkpoints, may differ: a linked last.ckpt holds the epoch file's, as
    Lightning's own `save_last: link` does."""
    keys: list[tuple] = []

    def key(t: torch.Tensor) -> None:
        if t.device.type == "cpu" and t.numel() * t.element_size() <= SMALL_CPU_TENSOR:
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            keys.append((t.dtype, tuple(t.shape), raw))
        else:
            keys.append(_tensor_key(t))
    apply_to_collection(checkpoint, torch.Tensor, key)
    return checkpoint.get("global_step"), checkpoint.get("epoch"), frozenset(keys), len(keys)


def _host_copy(t: torch.Tensor, previous: dict[tuple, torch.Tensor], copies: dict[tuple, torch.Tensor],
               spare: dict[tuple, list[torch.Tensor]] | None = None) -> torch.Tensor:
    """t's contents in host memory: the copy of an earlier save if t has not changed since,
    else a copy into a spare host tensor of t's shape and dtype, else into fresh memory."""
    key = _tensor_key(t)
    if key not in copies:
        if key in previous:
            copies[key] = previous[key]
        elif spare and spare.get(_layout(t)):  # non_blocking: queued when the memory is page-locked
            copies[key] = spare[_layout(t)].pop().copy_(t.detach(), non_blocking=t.is_cuda)
        else:
            copies[key] = t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)  # channels_last too
    return copies[key]


def _host_memory_for(checkpoint: dict[str, Any], previous: dict[tuple, torch.Tensor],
                     spare: dict[tuple, list[torch.Tensor]]) -> bool:
    """Whether the host copy fits in the memory that is free now, with a quarter to spare."""
    reusable = {layout: len(ts) for layout, ts in spare.items()}
    needed = []

    def count(t: torch.Tensor) -> None:
        if _tensor_key(t) in previous:
            return
        if reusable.get(_layout(t), 0) > 0:
            reusable[_layout(t)] -= 1
            return
        needed.append(t.numel() * t.element_size())
    apply_to_collection(checkpoint, torch.Tensor, count)
    free = _available_host_memory()
    return free is None or sum(needed) * 1.25 < free


def _available_host_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (free memory plus reclaimable cache); None
    where there is no such file (not Linux): then the copy is attempted."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` is always the state training ended with, also when
    the last save by step or epoch came a few steps before the end. After the first
    optimizer step it asks a checkpoint IO with `reserve` (BackgroundCheckpointIO) for the
    host memory of the first save, when it saves during training (by epoch, step or time)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reserve_asked = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._reserve_asked or trainer.global_step == 0:  # the optimizer's state comes with its first step
            return
        self._reserve_asked = True
        reserve = getattr(trainer.strategy.checkpoint_io, "reserve", None)
        saves_in_training = self._every_n_epochs or self._every_n_train_steps or self._train_time_interval
        if reserve is not None and saves_in_training and trainer.is_global_zero:
            reserve(checkpoint_tensors(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def checkpoint_tensors(trainer: pl.Trainer) -> list[torch.Tensor]:
    """The tensors the next checkpoint will hold, near enough for reserving their host
    memory: the module's state dict (as its `saved_state_dict` trims it, if it has one) and
    the optimizers' state."""
    module = trainer.lightning_module
    state = module.state_dict()
    trim = getattr(module, "saved_state_dict", None)
    tensors = list((trim(state) if trim is not None else state).values())
    for optimizer in trainer.optimizers:
        for param_state in optimizer.state_dict()["state"].values():
            tensors += [v for v in param_state.values() if isinstance(v, torch.Tensor)]
    return tensors


class _StopRequested(KeyboardInterrupt):
    """Raised at a batch boundary after the first Ctrl-C."""


class InterruptCheckpoint(pl.Callback):
    def __init__(self, dirpath: str | os.PathLike):
        self.dirpath = Path(dirpath)
        self._stop_requested = False
        self._previous_handler: Any = None
        self._start_step: int | None = None  # the step training began at (a resumed run's restored step)
        self.saved_path: Path | None = None

    # -- a first Ctrl-C stops cleanly after the current optimizer step -----------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread (e.g. a notebook worker): keep the default
            self._previous_handler = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = trainer.global_step

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        print("\nCtrl-C: saving a checkpoint after this batch (press again to abort at once)", flush=True)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._stop_requested:
            raise _StopRequested()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    # -- save on the way out ----------------------------------------------------------
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        interrupted = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        if self._start_step is None or trainer.global_step == self._start_step:
            rank_zero_info(f"No checkpoint saved: the run stopped before its first optimizer step (step "
                           f"{trainer.global_step}), so the weights are still those it started from")
            return
        kind = "interrupted" if interrupted else "errored"
        path = self.dirpath / f"{kind}-epoch={trainer.current_epoch:02d}-step={trainer.global_step:05d}.ckpt"
        try:
            trainer.save_checkpoint(path, weights_only=False)
            wait = getattr(trainer.strategy.checkpoint_io, "wait", None)
            if wait is not None:  # a background writer: the file exists before we say so
                wait()
        except Exception as e:  # saving what we can must not hide the original error
            rank_zero_warn(f"could not save {path} after {type(exception).__name__}: {e}")
            return
        self.saved_path = path
        if trainer.is_global_zero:
            if interrupted:
                rank_zero_info(f"Saved {path}; resume with: python main.py -r '{path}'")
            else:
                rank_zero_warn(f"Training failed with {type(exception).__name__}: {exception}. "
                               f"Saved the current state to {path}")
