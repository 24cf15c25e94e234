"""HostArena: the checkpoint copy's host memory, of an exact size, page-locked where CUDA allows."""
import os
from types import SimpleNamespace

import pytest
import torch

from ldm.callbacks import host_arena
from ldm.callbacks.host_arena import ALIGN, HostArena, register_ranges

LAYOUTS = [((3, 5), torch.float32), ((7,), torch.bfloat16), ((2, 2), torch.int64), ((0,), torch.float32),
           ((3, 5), torch.float32), ((9,), torch.bool)]


def test_views_of_every_layout_on_their_own_pages_zeroed():
    arena = HostArena(LAYOUTS)
    views = [v for vs in arena.tensors.values() for v in vs]
    assert {layout: len(vs) for layout, vs in arena.tensors.items()} == {
        ((3, 5), torch.float32): 2, ((7,), torch.bfloat16): 1, ((2, 2), torch.int64): 1, ((0,), torch.float32): 1,
        ((9,), torch.bool): 1}
    base = arena.buffer.data_ptr()
    assert all((v.data_ptr() - base) % ALIGN == 0 for v in views if v.numel())
    assert all(not v.any() for v in views)
    assert arena.buffer.numel() == 5 * ALIGN  # each non-empty tensor rounded up to a page, the empty one none
    marks = [True if v.dtype == torch.bool else i + 1 for i, v in enumerate(views)]
    for v, mark in zip(views, marks):  # no two views share memory
        v.fill_(mark)
    assert all(v.eq(mark).all() for v, mark in zip(views, marks))
    assert not arena.pinned
    arena.release()  # nothing registered: nothing to undo


def test_pin_registers_the_exact_buffer_for_every_context_and_release_undoes_it(monkeypatch):
    calls = []
    fake = SimpleNamespace(cudaError=SimpleNamespace(success=0),
                           cudaHostRegister=lambda ptr, size, flags: calls.append(("register", ptr, size, flags)) or 0,
                           cudaHostUnregister=lambda ptr: calls.append(("unregister", ptr)) or 0)
    monkeypatch.setattr(host_arena.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(host_arena.torch.cuda, "cudart", lambda: fake)
    arena = HostArena(LAYOUTS, pin=True)
    ptr = arena.buffer.data_ptr()
    assert arena.pinned and calls == [("register", ptr, 5 * ALIGN, 1)]  # 1: cudaHostRegisterPortable
    arena.release()
    arena.release()
    assert calls[1:] == [("unregister", ptr)] and not arena.pinned


def test_register_ranges_cover_the_buffer_in_whole_tensors():
    page = ALIGN
    offsets, sizes = [0, page, 2 * page, 5 * page, 6 * page], [page, page, 3 * page - 7, 0, page]
    assert register_ranges(offsets, sizes, 7 * page, limit=2 * page) == [
        (0, 2 * page), (2 * page, 3 * page), (5 * page, 2 * page)]  # the 3-page tensor alone; the empty one joins
    assert register_ranges(offsets, sizes, 7 * page, limit=100 * page) == [(0, 7 * page)]
    assert register_ranges([], [], page) == [(0, page)]  # nothing to hold: the one page mapped


def test_pin_registers_range_by_range_and_a_refusal_undoes_the_others(monkeypatch):
    calls, refuse = [], []
    fake = SimpleNamespace(cudaError=SimpleNamespace(success=0),
                           cudaHostRegister=lambda ptr, size, flags: calls.append(("register", ptr, size)) or (
                               2 if len(calls) in refuse else 0),
                           cudaHostUnregister=lambda ptr: calls.append(("unregister", ptr)) or 0)
    monkeypatch.setattr(host_arena.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(host_arena.torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(host_arena, "REGISTER_BYTES", 2 * ALIGN)
    monkeypatch.setattr(host_arena, "REGISTER_PAUSE_S", 0.0)
    arena = HostArena(LAYOUTS, pin=True)
    ptr = arena.buffer.data_ptr()
    assert arena.pinned and calls == [("register", ptr, 2 * ALIGN), ("register", ptr + 2 * ALIGN, 2 * ALIGN),
                                      ("register", ptr + 4 * ALIGN, ALIGN)]
    arena.release()
    assert calls[3:] == [("unregister", ptr), ("unregister", ptr + 2 * ALIGN), ("unregister", ptr + 4 * ALIGN)]
    calls.clear()
    refuse.append(2)  # the second range refused: the first is unregistered, the arena stays pageable
    arena = HostArena(LAYOUTS, pin=True)
    ptr = arena.buffer.data_ptr()
    assert not arena.pinned and calls == [("register", ptr, 2 * ALIGN), ("register", ptr + 2 * ALIGN, 2 * ALIGN),
                                          ("unregister", ptr)]


def test_a_refused_registration_leaves_ordinary_memory(monkeypatch):
    fake = SimpleNamespace(cudaError=SimpleNamespace(success=0), cudaHostRegister=lambda ptr, size, flags: 2)
    monkeypatch.setattr(host_arena.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(host_arena.torch.cuda, "cudart", lambda: fake)
    arena = HostArena(LAYOUTS, pin=True)
    assert not arena.pinned and len(arena.tensors) == 5
    assert not HostArena(LAYOUTS, pin=False).pinned  # not asked: not tried


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(x, 16) for x in head.split("-"))
            inside = low <= address < high
        elif inside and head == "VmFlags:":
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux's /proc/self/smaps reports a mapping's flags")
def test_linux_memory_is_private_not_inherited_by_forks_and_in_huge_pages_when_page_locked(monkeypatch):
    pageable = HostArena(LAYOUTS)
    flags = _vm_flags(pageable.buffer.data_ptr())
    assert "sh" not in flags  # private: no shared memory object behind it
    assert "dc" in flags  # MADV_DONTFORK: a loader worker forked later does not map it
    assert "hg" not in flags  # pageable: 4 KiB pages, no compaction for huge ones
    fake = SimpleNamespace(cudaError=SimpleNamespace(success=0), cudaHostRegister=lambda ptr, size, flags: 0)
    monkeypatch.setattr(host_arena.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(host_arena.torch.cuda, "cudart", lambda: fake)
    pinned = HostArena(LAYOUTS, pin=True)
    assert pinned.pinned
    assert {"dc", "hg"} <= _vm_flags(pinned.buffer.data_ptr())  # MADV_HUGEPAGE: fewer pages to lock
