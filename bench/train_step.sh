#!/usr/bin/env bash
# The first full fine-tune table of doc/performance/step.md, one process per configuration.
#   bash bench/train_step.sh            (the diffusers rows need diffusers: benchmark-only)
set -u
cd "$(dirname "$0")/.."
run() { python bench/train_step.py "$@" || echo "{\"failed\": \"$*\"}"; }
run --impl diffusers --batch 32
run --impl ours --batch 32
run --impl diffusers --batch 32 --compile
run --impl ours --batch 32 --compile
run --impl ours --batch 32 --encode
run --impl diffusers --batch 1 --ckpt
run --impl ours --batch 1 --ckpt
