"""BackgroundCheckpointIO: a save of the state just saved (last.ckpt after epoch=N.ckpt) is a hard
link to that file, any other state is written in full, and without hard links or after a
failed first write the second file is still written."""
from __future__ import annotations

import threading

import pytest
import torch

import ldm.callbacks.checkpointing as ckpt
from checkpoint_states import holds_w, state
from ldm.callbacks.checkpointing import BackgroundCheckpointIO


def test_a_save_of_the_state_just_saved_is_a_hard_link_to_that_file(tmp_path):
    io, ckpt_dict = BackgroundCheckpointIO(), state(2.0)
    io.save_checkpoint(ckpt_dict, tmp_path / "epoch=01.ckpt")
    ckpt_dict["callbacks"]["ModelCheckpoint"]["last_model_path"] = str(tmp_path / "last.ckpt")  # bookkeeping only
    io.save_checkpoint(ckpt_dict, tmp_path / "last.ckpt")
    io.wait()
    assert (tmp_path / "last.ckpt").samefile(tmp_path / "epoch=01.ckpt")  # written once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=01.ckpt", "last.ckpt"]  # no temporary name left
    ckpt_dict["state_dict"]["w"].add_(1)  # the next steps: last.ckpt is replaced, the epoch file kept as it was
    ckpt_dict["global_step"] = 8
    io.save_checkpoint(ckpt_dict, tmp_path / "last.ckpt")
    io.teardown()
    assert not (tmp_path / "last.ckpt").samefile(tmp_path / "epoch=01.ckpt")
    assert holds_w(tmp_path / "epoch=01.ckpt", 2.0)
    assert holds_w(tmp_path / "last.ckpt", 3.0)


def test_small_cpu_tensors_a_save_makes_afresh_are_compared_by_their_contents(tmp_path):
    io, ckpt_dict = BackgroundCheckpointIO(), state(2.0)
    ckpt_dict["host_rng_state"] = torch.get_rng_state()
    io.save_checkpoint(ckpt_dict, tmp_path / "epoch=01.ckpt")
    ckpt_dict["host_rng_state"] = torch.get_rng_state()  # the same state, a new tensor
    io.save_checkpoint(ckpt_dict, tmp_path / "last.ckpt")
    torch.rand(1)  # the RNG moves on
    ckpt_dict["host_rng_state"] = torch.get_rng_state()
    io.save_checkpoint(ckpt_dict, tmp_path / "again.ckpt")
    io.teardown()
    assert (tmp_path / "last.ckpt").samefile(tmp_path / "epoch=01.ckpt")
    assert not (tmp_path / "again.ckpt").samefile(tmp_path / "last.ckpt")
    assert torch.equal(torch.load(tmp_path / "again.ckpt", weights_only=False)["host_rng_state"], torch.get_rng_state())


@pytest.mark.parametrize("change", ["a tensor in place", "the step", "another folder"])
def test_a_save_of_another_state_is_written_in_full(tmp_path, change):
    io, ckpt_dict = BackgroundCheckpointIO(), state(2.0)
    io.save_checkpoint(ckpt_dict, tmp_path / "epoch=01.ckpt")
    target = tmp_path / "last.ckpt"
    if change == "a tensor in place":
        ckpt_dict["optimizer_states"][0]["state"][0]["exp_avg"].mul_(2)
    elif change == "the step":
        ckpt_dict["global_step"] = 8
    else:
        target = tmp_path / "other" / "last.ckpt"
    io.save_checkpoint(ckpt_dict, target)
    io.teardown()
    assert not target.samefile(tmp_path / "epoch=01.ckpt")
    loaded = torch.load(target, weights_only=False)
    assert loaded["global_step"] == ckpt_dict["global_step"]
    assert torch.equal(loaded["optimizer_states"][0]["state"][0]["exp_avg"],
                       ckpt_dict["optimizer_states"][0]["state"][0]["exp_avg"])


def test_without_hard_links_the_same_state_is_written_in_full(tmp_path, monkeypatch):
    def no_links(*args):
        raise OSError(95, "Operation not supported")
    monkeypatch.setattr(ckpt.os, "link", no_links)  # e.g. FAT or some network file systems
    io, ckpt_dict = BackgroundCheckpointIO(), state(2.0)
    io.save_checkpoint(ckpt_dict, tmp_path / "epoch=01.ckpt")
    io.save_checkpoint(ckpt_dict, tmp_path / "last.ckpt")
    io.teardown()
    assert not (tmp_path / "last.ckpt").samefile(tmp_path / "epoch=01.ckpt")
    assert holds_w(tmp_path / "last.ckpt", 2.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=01.ckpt", "last.ckpt"]


def test_when_the_first_write_failed_the_second_file_is_still_written(tmp_path, monkeypatch):
    real = torch.save
    calls, release = [], threading.Event()

    def fail_first(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            assert release.wait(10)  # still writing when last.ckpt is saved (a failure already seen stops the save)
            raise OSError(28, "No space left on device")
        real(obj, f, *args, **kwargs)
    monkeypatch.setattr(ckpt.torch, "save", fail_first)
    io, ckpt_dict = BackgroundCheckpointIO(), state(2.0)
    io.save_checkpoint(ckpt_dict, tmp_path / "epoch=01.ckpt")
    io.save_checkpoint(ckpt_dict, tmp_path / "last.ckpt")
    release.set()
    with pytest.raises(RuntimeError, match="epoch=01.ckpt"):
        io.wait()
    io.teardown()
    assert not (tmp_path / "epoch=01.ckpt").exists()
    assert holds_w(tmp_path / "last.ckpt", 2.0)
