#!/usr/bin/env bash
# GPU check of the core model and of main.py at SD 1.x size, random weights (no SD file here).
#   1. bench/gpu_check_sd1.py: bf16 training steps, finite loss, a gradient in every trainable tensor
#   2. main.py -t on 120 synthetic 512 px images (6 aspect ratios, file-name captions), 50 steps,
#      batch 6, validation split, image logger every 25 steps, last.ckpt at the end;
#      then images/s (10-step windows) and peak memory from the run's TensorBoard events.
# Usage (device): bash bench/main_sd1_gpu.sh OUTDIR
set -euo pipefail
out=${1:-/tmp/sd1run}
mkdir -p "$out"
[ "${SKIP_CHECK:-0}" = 1 ] || python3 bench/gpu_check_sd1.py --batch 2 --checkpointing 1 --steps 3
python3 scripts/make_shapes.py "$out/data" --count 120 --size 640 --seed 1 > /dev/null
python3 main.py --base configs/stable-diffusion/v1-finetune_everydream.yaml bench/configs/sd1_run_gpu.yaml \
    -t -n sd1bench --data_root "$out/data" -l "$out/logs" 2>&1 | tr '\r' '\n' | grep -v "it/s" || true
run=$(ls -d "$out"/logs/*_sd1bench | tail -1)
python3 - "$run" <<'PY'
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1]); acc.Reload()
ips = [(e.step, round(e.value, 1)) for e in acc.Scalars("perf/images_per_sec")]
mem = [(e.step, round(e.value, 2)) for e in acc.Scalars("perf/peak_memory_gib")]
print("images/s per 10-step window (step, img/s):", ips)
print("steady images/s (windows after step 10):", round(sum(v for s, v in ips if s > 10) / max(1, sum(1 for s, v in ips if s > 10)), 1))
print("peak GPU memory GiB per window (step, GiB):", mem)
PY
ls -la "$run/checkpoints" "$run/images/train"
