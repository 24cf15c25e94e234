"""Host memory of an exact size for the checkpoint's copy, page-locked for CUDA where it can be.

torch's `pin_memory()` takes page-locked memory from its caching host allocator, which rounds
each block up to a power of two: an SD 1.x fine-tune's 11.1 GB state would lock 16 GiB.
`HostArena` maps one anonymous buffer of the exact size (each tensor at a 4 KiB boundary),
writes every page of it, so that no copy has to fault one in, and with `pin` registers it
with CUDA (cudaHostRegister), in transparent huge pages where Linux grants them, a range of
whole tensors at a time (REGISTER_BYTES, a pause between two: one call for the whole buffer held
up every CUDA call of the process for 0.25-0.9 s, long enough to empty the GPU's queue in a run
whose step replays CUDA graphs; doc/performance/end-to-end.md). Each tensor is
its own storage over its part of the buffer (torch.frombuffer), so torch.save writes each at
its own size, whatever its dtype. A copy from the GPU into a registered tensor with
`non_blocking=True` is queued on the stream and runs as one DMA transfer while the host goes
on (0.21 s for the 11.1 GB state against 0.82 s into pageable memory on an H200,
doc/PERFORMANCE.md); into pageable memory the same call returns when the copy is done.
Without CUDA, or where registering fails, the arena is ordinary (pageable) memory.
"""
from __future__ import annotations

import mmap
import time

import torch

ALIGN = 4096  # bytes: each tensor starts on a page
REGISTER_BYTES = 256 * 2**20  # registered per cudaHostRegister call (more where one tensor is larger)
REGISTER_PAUSE_S = 0.01  # between two calls: the other threads' CUDA calls go on

Layout = tuple[tuple[int, ...], torch.dtype]  # (shape, dtype)


class HostArena:
    def __init__(self, layouts: list[Layout], pin: bool = False):
        sizes = [torch.Size(shape).numel() * dtype.itemsize for shape, dtype in layouts]
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += -(-size // ALIGN) * ALIGN
        pin = pin and torch.cuda.is_available()
        self._map = _anonymous_map(max(total, ALIGN), huge_pages=pin)
        self.buffer = torch.frombuffer(self._map, dtype=torch.uint8)
        self.buffer.fill_(0)  # writes every page
        self._registered: list[int] = []  # addresses of the registered ranges
        if pin:
            self._register(register_ranges(offsets, sizes, self.buffer.numel()))
        self.pinned = bool(self._registered)
        self.tensors: dict[Layout, list[torch.Tensor]] = {}
        for (shape, dtype), offset, size in zip(layouts, offsets, sizes):
            n = size // dtype.itemsize
            t = torch.frombuffer(self._map, dtype=dtype, count=n, offset=offset) if n else torch.empty(0, dtype=dtype)
            self.tensors.setdefault((tuple(shape), dtype), []).append(t.view(shape))

    def _register(self, ranges: list[tuple[int, int]]) -> None:
        """Register the buffer range by range; if the driver refuses one, undo the others (pageable)."""
        base = self.buffer.data_ptr()
        for i, (start, length) in enumerate(ranges):
            if i:
                time.sleep(REGISTER_PAUSE_S)
            if not _register(base + start, length):
                self.release()
                return
            self._registered.append(base + start)

    def release(self) -> None:
        """Unregister the buffer (its tensors stay valid, as pageable memory)."""
        for address in self._registered:
            torch.cuda.cudart().cudaHostUnregister(address)
        self._registered = []
        self.pinned = False


def register_ranges(offsets: list[int], sizes: list[int], total: int,
                    limit: int | None = None) -> list[tuple[int, int]]:
    """(start, length) ranges that cover the buffer's `total` bytes, each of whole tensors (at
    `offsets`, of `sizes` bytes, each on its own pages) and of at most `limit` bytes unless one
    tensor is larger (REGISTER_BYTES by default): a copy into one tensor stays within one range."""
    limit = REGISTER_BYTES if limit is None else limit
    ranges, start = [], 0
    for offset, size in zip(offsets, sizes):
        end = offset + -(-size // ALIGN) * ALIGN
        if end - start > limit and offset > start:  # close the range before this tensor
            ranges.append((start, offset - start))
            start = offset
    if total > start:
        ranges.append((start, total - start))
    return ranges


def _anonymous_map(size: int, huge_pages: bool) -> mmap.mmap:
    """`size` bytes of anonymous memory, page-aligned. On Linux private to this process and not
    inherited by processes forked later (a loader's workers never map it, and no write to it is
    copied on write); with `huge_pages`, in transparent huge pages where the kernel grants them:
    cudaHostRegister, which holds up every CUDA call of the process while it runs, then locks
    2 MiB pages (0.20-0.41 s for 12 GiB through main.py on an H200 against 0.49-0.69 s in 4 KiB
    pages, doc/performance/end-to-end.md). Asked for page-locked memory only: a huge page fault
    can mean the kernel compacting memory first, slower than 4 KiB pages where memory is short
    or fragmented."""
    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: the default anonymous map
        return mmap.mmap(-1, size)
    buffer_map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_DONTFORK"):
        buffer_map.madvise(mmap.MADV_DONTFORK)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        buffer_map.madvise(mmap.MADV_HUGEPAGE)
    return buffer_map


def _register(address: int, length: int) -> bool:
    """cudaHostRegister with cudaHostRegisterPortable (1): page-locked for every CUDA context,
    whichever device the calling thread has current. False where the driver refuses."""
    cudart = torch.cuda.cudart()
    return cudart.cudaHostRegister(address, length, 1) == cudart.cudaError.success
