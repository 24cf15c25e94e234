#!/usr/bin/env bash
# Every adapter-step configuration of doc/PERFORMANCE.md, one process each (peaks do not mix).
#   bash bench/lora_step.sh            (needs diffusers and peft for the peer rows)
set -u
cd "$(dirname "$0")/.."
run() { python bench/lora_step.py "$@" || echo "{\"failed\": \"$*\"}"; }
run --impl ours --mode lora --batch 1 --ckpt
run --impl peer --batch 1 --ckpt
run --impl ours --mode lora --batch 1
run --impl peer --batch 1
run --impl ours --mode lora --batch 8
run --impl peer --batch 8
run --impl ours --mode full --batch 8
