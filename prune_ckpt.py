#!/usr/bin/env python
"""Shrink a training checkpoint to a Stable Diffusion checkpoint for inference.

    python prune_ckpt.py --ckpt logs/run/checkpoints/last.ckpt
        -> logs/run/checkpoints/last-pruned.ckpt (fp16, EMA weights if the run had EMA)

The logic lives in ldm/prune.py.
"""
from __future__ import annotations

import argparse
import sys

import torch

from ldm.prune import prune_checkpoint

DESCRIPTION = """\
Write the model weights of a training checkpoint to a new, much smaller file that
Stable Diffusion tools (AUTOMATIC1111, ComfyUI, ...) load directly.

Kept: the UNet (model.diffusion_model.*), VAE (first_stage_model.*), text encoder
(cond_stage_model.*) and noise-schedule buffers, under their usual names.
Dropped: the optimizer state, learning-rate schedulers, loops, callbacks,
hyper-parameters, epoch/global_step, and the model_ema.* copy of the UNet.

If the run kept an EMA of the weights, the EMA weights become the UNet weights
(use --no-ema for the raw trained weights). Floating-point weights are stored in
fp16 unless --full or --bf16 is given; the schedule buffers and integer tensors keep
their dtype.

The output goes beside the input as NAME-pruned.ckpt (or NAME-pruned.safetensors
with --safetensors) unless --out says otherwise. The input is never modified or
overwritten, and an existing output is only replaced with --force. Paths may use
either / or \\ as the separator.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prune_ckpt.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, metavar="PATH",
                        help="the checkpoint to prune (.ckpt, .pt, .pth or .safetensors)")
    parser.add_argument("--out", metavar="PATH",
                        help="output file (.ckpt or .safetensors), or a directory to write the default name "
                             "into (default: NAME-pruned.ckpt beside the input)")
    parser.add_argument("--safetensors", action="store_true",
                        help="write .safetensors instead of .ckpt (default name NAME-pruned.safetensors)")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false",
                        help="keep the trained UNet weights even if the checkpoint has EMA weights")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--full", dest="dtype", action="store_const", const=torch.float32,
                           help="store the weights in fp32 (about twice the size of fp16)")
    precision.add_argument("--bf16", dest="dtype", action="store_const", const=torch.bfloat16,
                           help="store the weights in bf16 instead of fp16")
    parser.set_defaults(dtype=torch.float16)
    parser.add_argument("--force", action="store_true", help="replace the output file if it already exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = prune_checkpoint(args.ckpt, args.out, use_ema=args.use_ema, dtype=args.dtype,
                                  safetensors=args.safetensors, force=args.force)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError; messages name the file
        print(f"prune_ckpt.py: error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
