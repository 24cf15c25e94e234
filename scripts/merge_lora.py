#!/usr/bin/env python
"""Merge LoRA / LoCon / LoHa / LoKr files into a Stable Diffusion checkpoint.

    python scripts/merge_lora.py --ckpt sd15.safetensors --lora meebs.safetensors:0.8 \
        --out sd15-meebs.safetensors

Each --lora is FILE or FILE:WEIGHT (weight 1 by default; negative subtracts); several
are merged in order. The output is a normal checkpoint that every SD tool loads. The
logic lives in ldm/modules/adapters/merge.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_lora(text: str) -> tuple[str, float]:
    path, sep, weight = text.rpartition(":")
    if sep and path and not weight.startswith(("/", "\\")):
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="the base checkpoint (.ckpt or .safetensors)")
    p.add_argument("--lora", required=True, action="append", metavar="FILE[:WEIGHT]", help="an adapter file")
    p.add_argument("--out", required=True, help="the merged checkpoint to write (.ckpt or .safetensors)")
    p.add_argument("--config", help="the model YAML (default: SD 1.x or 2.x, from the checkpoint's keys)")
    args = p.parse_args(argv)
    from ldm.modules.adapters.merge import merge_adapters

    try:
        for line in merge_adapters(args.ckpt, [parse_lora(t) for t in args.lora], args.out, args.config):
            print(line)
    except ValueError as e:  # AdapterError, CheckpointError: each names its file
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
