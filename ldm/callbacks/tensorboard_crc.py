"""A fast checksum for TensorBoard's event files, which carry a masked CRC-32C per record.

Without TensorFlow, tensorboard computes that CRC byte by byte in Python
(`tensorboard.compat.tensorflow_stub.pywrap_tensorflow.crc32c`): ~0.36 s for a 3 MB sample
grid's image on one core, in the event writer's thread, holding the GIL. On a GPU whose step is
bound by the host's kernel launches that stalled the training thread by ~1 s after every sample
grid (doc/PERFORMANCE.md). The `crc32c` package computes the same checksum in C, releasing the
GIL for large buffers; `use_fast_crc32c` puts it in tensorboard's place.
"""
from __future__ import annotations


def use_fast_crc32c() -> bool:
    """Route tensorboard's CRC-32C through the `crc32c` package; False where either is missing."""
    try:
        import crc32c
        from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
    except ImportError:
        return False
    pywrap_tensorflow.crc32c = crc32c.crc32c  # masked_crc32c looks it up by name at every call
    return True
