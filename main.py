#!/usr/bin/env python
"""Fine-tune Stable Diffusion: `python main.py --help` lists the options; doc/ has the recipes."""
import sys

from ldm.train import main

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
