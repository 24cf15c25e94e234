"""ldm/checkpoint.py refusing what it must not load (pickles that would run code, objects of other
types, missing, empty, corrupt or truncated files, files without tensors), each error naming the
file, and a failed save keeping the old file."""
import os

import numpy as np
import pytest
import safetensors.torch
import torch

from ldm.checkpoint import (CheckpointError, UnsafeCheckpointError, load_checkpoint_file, load_state_dict,
                            save_checkpoint)
from tiny_ldm import random_sd


# --------------------------------------------------------------------------- refusing and bad files
class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class WritesFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("payload, global_name", [(RunsShell, "system"), (WritesFile, "open")])
@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload, global_name, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": random_sd(), "x": payload(marker)}, path, _use_new_zipfile_serialization=not legacy)
    for load in (load_state_dict, load_checkpoint_file):
        with pytest.raises(UnsafeCheckpointError) as e:
            load(path)
        message = str(e.value)
        assert str(path) in message and global_name in message
        assert "arbitrary code" in message and ".safetensors" in message
    assert not marker.exists()


def test_disallowed_object_type_is_refused(tmp_path):
    torch.save({"state_dict": random_sd(), "v": torch.torch_version.TorchVersion("2.0")}, tmp_path / "m.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="TorchVersion"):
        load_checkpoint_file(tmp_path / "m.ckpt")


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_state_dict(tmp_path / "nope.ckpt")
    (tmp_path / "dir.ckpt").mkdir()
    with pytest.raises(IsADirectoryError, match="dir.ckpt"):
        load_state_dict(tmp_path / "dir.ckpt")
    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="m.bin.*extension"):
        load_state_dict(tmp_path / "m.bin")
    with pytest.raises(CheckpointError, match="m.bin.*extension"):
        save_checkpoint(random_sd(), tmp_path / "m.bin")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.ckpt.*empty"):
        load_state_dict(tmp_path / "empty.ckpt")


def test_corrupt_files_name_the_file(tmp_path):
    save_checkpoint(random_sd(), tmp_path / "good.ckpt")
    save_checkpoint(random_sd(), tmp_path / "good.safetensors")
    torch.save({"state_dict": random_sd()}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    rng = np.random.default_rng(0)
    cases = {
        "garbage.ckpt": rng.bytes(4096),
        "text.pt": b"hello world\n",
        "garbage.safetensors": rng.bytes(4096),
        "truncated.ckpt": (tmp_path / "good.ckpt").read_bytes()[:3000],
        "truncated_legacy.ckpt": (tmp_path / "legacy.ckpt").read_bytes()[:-100],
        "truncated.safetensors": (tmp_path / "good.safetensors").read_bytes()[:-100],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
            load_state_dict(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)
        assert not isinstance(e.value, UnsafeCheckpointError), name


def test_files_without_tensors_are_rejected(tmp_path):
    torch.save({"state_dict": {"a": 1}}, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match="m.ckpt.*no tensors"):
        load_state_dict(tmp_path / "m.ckpt")
    torch.save([torch.ones(1)], tmp_path / "l.ckpt")
    with pytest.raises(CheckpointError, match="l.ckpt.*dict"):
        load_state_dict(tmp_path / "l.ckpt")


# --------------------------------------------------------------------------- atomic save
@pytest.mark.parametrize("suffix, writer", [(".ckpt", (torch, "save")),
                                            (".safetensors", (safetensors.torch, "save_file"))])
def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch, suffix, writer):
    path = tmp_path / f"m{suffix}"
    save_checkpoint(random_sd(), path)
    good = path.read_bytes()

    def write_half_then_fail(obj, target, *args, **kwargs):
        with open(target, "wb") as f:
            f.write(good[: len(good) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(*writer, write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(random_sd(torch.float16), path)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(random_sd(), tmp_path / f"new{suffix}")
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
