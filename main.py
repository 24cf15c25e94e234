#!/usr/bin/env python
"""Fine-tune Stable Diffusion: `python main.py --help` lists the options; doc/ has the recipes."""
import os
import sys

# CUDA's allocator grows its segments in place instead of keeping blocks of fixed sizes: less
# memory lost between bucket shapes, so that the CUDA graphs fit a 24 GB card
# (doc/PERFORMANCE.md). Read when CUDA starts, so set before torch is imported; the user's own
# setting wins.
if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

from ldm.train import main  # noqa: E402

# Configs written for the original trainer name `main.DataModuleFromConfig` and
# `main.ImageLogger`; both resolve to this project's classes (imported only when asked for).
_ALIASES = {"DataModuleFromConfig": "ldm.data.datamodule", "ImageLogger": "ldm.callbacks.image_logger"}


def __getattr__(name):
    if name in _ALIASES:
        import importlib
        return getattr(importlib.import_module(_ALIASES[name]), name)
    raise AttributeError(f"module 'main' has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
