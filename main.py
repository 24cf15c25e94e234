#!/usr/bin/env python
"""Fine-tune Stable Diffusion: `python main.py --help` lists the options; doc/ has the recipes."""
import sys

from ldm.train import main

if __name__ == "__main__":
    sys.exit(main())
