#!/usr/bin/env bash
# The 12 GiB full fine-tune through main.py at SD 1.x size (configs/stable-diffusion/presets/vram_12gb.yaml:
# bf16 UNet, adamw_bf16 stepped in the backward pass, the text encoder training, batch 6, no
# gradient checkpointing, compile: reduce-overhead, or COMPILE=true); see bench/main_preset.sh.
# Usage (device): bash bench/main_12gib.sh OUTDIR
set -euo pipefail
exec bash "$(dirname "$0")/main_preset.sh" configs/stable-diffusion/presets/vram_12gb.yaml "${1:-/tmp/main12}" \
    ${COMPILE:+model.params.compile=$COMPILE}
