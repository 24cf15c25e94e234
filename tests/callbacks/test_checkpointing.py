"""BackgroundCheckpointIO: checkpoints written from a writer thread while training goes on."""
from __future__ import annotations

import threading

import pytest
import torch

import ldm.callbacks.checkpointing as ckpt
from ldm.callbacks.checkpointing import BackgroundCheckpointIO


def state(value: float = 1.0) -> dict:
    return {"state_dict": {"w": torch.full((64,), value), "b": torch.zeros(3)},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.full((64,), value / 2)}}, "param_groups": [{"lr": 1e-4}]}],
            "callbacks": {"ModelCheckpoint": {"best_k_models": {"a.ckpt": torch.tensor(0.5)}}},
            "global_step": 7}


class Gate:
    """Holds the writer thread inside torch.save until released."""

    def __init__(self, monkeypatch):
        self.entered, self.release = threading.Event(), threading.Event()
        real = torch.save

        def slow_save(obj, f, *args, **kwargs):
            self.entered.set()
            assert self.release.wait(10)
            real(obj, f, *args, **kwargs)
        monkeypatch.setattr(ckpt.torch, "save", slow_save)


def test_the_file_holds_the_state_at_save_time_while_training_changes_it(tmp_path, monkeypatch):
    gate = Gate(monkeypatch)
    io, ckpt_dict = BackgroundCheckpointIO(), state(1.0)
    io.save_checkpoint(ckpt_dict, tmp_path / "e.ckpt")  # returns while the writer waits in torch.save
    assert gate.entered.wait(10) and not (tmp_path / "e.ckpt").exists()
    ckpt_dict["state_dict"]["w"].add_(100)  # the next optimizer steps, in place
    ckpt_dict["callbacks"]["ModelCheckpoint"]["best_k_models"]["b.ckpt"] = torch.tensor(0.1)
    gate.release.set()
    io.teardown()  # the end of the run waits for the write
    loaded = torch.load(tmp_path / "e.ckpt", weights_only=False)
    assert torch.equal(loaded["state_dict"]["w"], torch.full((64,), 1.0))
    assert list(loaded["callbacks"]["ModelCheckpoint"]["best_k_models"]) == ["a.ckpt"]
    assert loaded["global_step"] == 7 and loaded["optimizer_states"][0]["param_groups"][0]["lr"] == 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.ckpt"]  # no temp file left


def test_two_saves_of_one_state_share_the_host_copy_and_removals_keep_their_order(tmp_path, monkeypatch):
    gate = Gate(monkeypatch)
    copies = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: copies.append(t.numel()) or real_to(t, *a, **k))
    io, ckpt_dict = BackgroundCheckpointIO(), state(2.0)
    (tmp_path / "old.ckpt").write_bytes(b"x")
    io.save_checkpoint(ckpt_dict, tmp_path / "epoch=01.ckpt")
    io.save_checkpoint(ckpt_dict, tmp_path / "last.ckpt")  # ModelCheckpoint's save_last, same state
    io.remove_checkpoint(tmp_path / "old.ckpt")  # top-k dropping an older file
    assert (tmp_path / "old.ckpt").exists()  # queued behind the writes
    n_tensors = 4
    assert len(copies) == n_tensors  # one host copy per tensor, not two
    gate.release.set()
    io.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=01.ckpt", "last.ckpt"]
    for name in ("epoch=01.ckpt", "last.ckpt"):
        assert torch.equal(torch.load(tmp_path / name, weights_only=False)["state_dict"]["w"], torch.full((64,), 2.0))
    ckpt_dict["state_dict"]["w"].add_(1)  # a later save after an in-place change copies that tensor anew
    io.save_checkpoint(ckpt_dict, tmp_path / "last.ckpt")
    io.teardown()
    assert torch.equal(torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]["w"], torch.full((64,), 3.0))


def test_a_save_after_the_writes_are_done_copies_into_the_host_memory_of_the_last_one(tmp_path, monkeypatch):
    fresh = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: fresh.append(t.numel()) or real_to(t, *a, **k))
    saved = []
    real_save = torch.save
    monkeypatch.setattr(ckpt.torch, "save", lambda obj, f, *a, **k: saved.append(obj) or real_save(obj, f, *a, **k))
    io, ckpt_dict = BackgroundCheckpointIO(), state(1.0)
    io.save_checkpoint(ckpt_dict, tmp_path / "epoch=00.ckpt")
    io.wait()
    first = {id(saved[0]["state_dict"]["w"]), id(saved[0]["optimizer_states"][0]["state"][0]["exp_avg"])}
    assert len(fresh) == 4
    ckpt_dict["state_dict"]["w"].add_(1)  # an epoch of training
    ckpt_dict["optimizer_states"][0]["state"][0]["exp_avg"].add_(1)
    io.save_checkpoint(ckpt_dict, tmp_path / "epoch=01.ckpt")
    io.teardown()
    assert len(fresh) == 4  # no fresh host memory for the second save
    assert id(saved[1]["state_dict"]["w"]) in first  # a host tensor of the first save (same shape), overwritten
    loaded = torch.load(tmp_path / "epoch=01.ckpt", weights_only=False)
    assert torch.equal(loaded["state_dict"]["w"], torch.full((64,), 2.0))
    assert torch.equal(loaded["optimizer_states"][0]["state"][0]["exp_avg"], torch.full((64,), 1.5))
    assert torch.equal(torch.load(tmp_path / "epoch=00.ckpt", weights_only=False)["state_dict"]["w"],
                       torch.full((64,), 1.0))  # written before its memory was reused


def test_host_memory_a_write_still_reads_is_not_reused(tmp_path, monkeypatch):
    gate = Gate(monkeypatch)
    io, ckpt_dict = BackgroundCheckpointIO(), state(1.0)
    io.save_checkpoint(ckpt_dict, tmp_path / "a.ckpt")
    assert gate.entered.wait(10)
    ckpt_dict["state_dict"]["w"].add_(1)
    io.save_checkpoint(ckpt_dict, tmp_path / "b.ckpt")  # while a.ckpt is still being written
    gate.release.set()
    io.teardown()
    assert torch.equal(torch.load(tmp_path / "a.ckpt", weights_only=False)["state_dict"]["w"], torch.full((64,), 1.0))
    assert torch.equal(torch.load(tmp_path / "b.ckpt", weights_only=False)["state_dict"]["w"], torch.full((64,), 2.0))


def test_the_memory_check_counts_host_tensors_kept_for_reuse(tmp_path, monkeypatch):
    io, ckpt_dict = BackgroundCheckpointIO(), state(1.0)
    io.save_checkpoint(ckpt_dict, tmp_path / "a.ckpt")
    io.wait()
    monkeypatch.setattr(ckpt, "_available_host_memory", lambda: 100)  # bytes: far less than a fresh copy
    ckpt_dict["state_dict"]["w"].add_(1)
    io.save_checkpoint(ckpt_dict, tmp_path / "b.ckpt")
    assert io._pending  # copied into the kept tensors and written in the background, not in place
    io.teardown()
    assert torch.equal(torch.load(tmp_path / "b.ckpt", weights_only=False)["state_dict"]["w"], torch.full((64,), 2.0))


def test_a_failed_write_names_its_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    io = BackgroundCheckpointIO()
    io.save_checkpoint(state(1.0), tmp_path / "last.ckpt")
    io.wait()
    good = (tmp_path / "last.ckpt").read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"half")
        raise OSError("No space left on device")
    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    io.save_checkpoint(state(5.0), tmp_path / "last.ckpt")
    with pytest.raises(RuntimeError, match=r"could not write checkpoint .*last.ckpt: No space left"):
        io.teardown()
    assert (tmp_path / "last.ckpt").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_without_host_memory_for_the_copy_it_writes_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "_available_host_memory", lambda: 100)  # bytes: less than the copy needs
    io, ckpt_dict = BackgroundCheckpointIO(), state(4.0)
    io.save_checkpoint(ckpt_dict, tmp_path / "e.ckpt")
    assert (tmp_path / "e.ckpt").exists()  # written before save_checkpoint returned
    ckpt_dict["state_dict"]["w"].add_(1)
    assert torch.equal(torch.load(tmp_path / "e.ckpt", weights_only=False)["state_dict"]["w"], torch.full((64,), 4.0))
    io.teardown()


def test_main_writes_in_the_background_unless_last_is_a_link():
    from omegaconf import OmegaConf

    from ldm.run import checkpoint_io_for
    assert type(checkpoint_io_for(OmegaConf.create({}))) is BackgroundCheckpointIO
    link = OmegaConf.create({"lightning": {"modelcheckpoint": {"params": {"save_last": "link"}}}})
    assert type(checkpoint_io_for(link)) is ckpt.AtomicCheckpointIO
