"""tensorboard's record checksum through the crc32c package: the same event files, faster."""
import os
import struct
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

from ldm.callbacks.tensorboard_crc import use_fast_crc32c


def pure_python_crc32c(data):
    """tensorboard's own CRC-32C, byte by byte (what its `crc32c` is until use_fast_crc32c)."""
    return pywrap_tensorflow.crc_finalize(pywrap_tensorflow.crc_update(pywrap_tensorflow.CRC_INIT, data))


@pytest.fixture
def restore_crc(monkeypatch):
    # tensorboard's own checksum for the test, whatever an earlier main.py run in this process
    # installed; the one before the test is back afterwards
    monkeypatch.setattr(pywrap_tensorflow, "crc32c", pure_python_crc32c)


def test_the_same_masked_checksums_in_a_fraction_of_the_time(restore_crc):
    data = [b"", b"a", struct.pack("<Q", 1234), os.urandom(300_000)]
    slow = [pywrap_tensorflow.masked_crc32c(d) for d in data]
    t0 = time.perf_counter()
    pywrap_tensorflow.masked_crc32c(data[-1])
    slow_s = time.perf_counter() - t0
    assert use_fast_crc32c()
    t0 = time.perf_counter()
    fast = [pywrap_tensorflow.masked_crc32c(d) for d in data]
    fast_s = time.perf_counter() - t0
    assert fast == slow
    assert fast_s < slow_s / 20  # pure Python: ~35 ms for 300 kB here; C: well under a millisecond


def test_event_files_written_with_it_read_back(restore_crc, tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    import numpy as np

    assert use_fast_crc32c()
    writer = SummaryWriter(str(tmp_path))
    writer.add_scalar("loss", 0.5, 1)
    writer.add_image("grid", np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8), 1,
                     dataformats="HWC")
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()  # reading checks every record's CRC
    assert [e.value for e in acc.Scalars("loss")] == [0.5]
    assert acc.Images("grid")[0].width == 96
