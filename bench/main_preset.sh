#!/usr/bin/env bash
# A memory preset through main.py at SD 1.x size, random weights: 120 synthetic images made
# square (one bucket, so one set of compiled graphs), VAE encode in the step, 50 steps with
# sample grids at 25 and 50. Prints images/s and peak memory per 10-step window from the run's
# TensorBoard events.
# Usage (device): bash bench/main_preset.sh configs/stable-diffusion/presets/vram_6gb.yaml OUTDIR [override ...]
#   PRESET_BASE=<yaml> replaces the SD 1.x fine-tune config (e.g. configs/stable-diffusion/v2-finetune_everydream-v.yaml)
#   PRESET_CONFIGS="<yaml> ..." merges more config files after the preset (e.g. bench/configs/memory_cap.yaml)
set -euo pipefail
preset=$1; base=${PRESET_BASE:-configs/stable-diffusion/v1-finetune_everydream.yaml}; out=${2:-/tmp/preset}; shift $(( $# < 2 ? $# : 2 ))  # the rest: overrides
mkdir -p "$out"
[ -d "$out/data" ] || python3 scripts/make_shapes.py "$out/data" --count 120 --size 512 --seed 1 > /dev/null
python3 - "$out/data" <<'PY'
import sys
from pathlib import Path
from PIL import Image
for f in Path(sys.argv[1]).rglob("*.png"):
    Image.open(f).convert("RGB").resize((512, 512)).save(f)
PY
name=$(basename "$preset" .yaml)
# shellcheck disable=SC2086  # PRESET_CONFIGS may list several files
python3 main.py --base "$base" "$preset" bench/configs/sd1_run_gpu.yaml ${PRESET_CONFIGS:-} \
    -t -n "$name" --data_root "$out/data" -l "$out/logs" "$@" 2>&1 | tr '\r' '\n' | grep -v "it/s" | tail -20 || true
run=$(ls -d "$out"/logs/*_"$name" | tail -1)
python3 - "$run" <<'PY'
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1]); acc.Reload()
for tag in ("perf/images_per_sec", "perf/peak_memory_gib"):
    print(tag, [(e.step, round(e.value, 3)) for e in acc.Scalars(tag)])
PY
[ "${KEEP:-0}" = 1 ] || rm -f "$run"/checkpoints/*.ckpt  # several GB each
