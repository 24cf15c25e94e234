#!/usr/bin/env bash
# The 12 GiB full fine-tune through main.py at SD 1.x size, random weights: bf16 UNet, adamw_bf16
# stepped in the backward pass, the text encoder training, batch 6, no gradient checkpointing,
# compile: reduce-overhead (or COMPILE=true). 120 synthetic images made square (one bucket, so
# one set of compiled graphs), VAE encode in the step, 50 steps with sample grids at 25 and 50.
# Prints images/s and peak memory per 10-step window from the run's TensorBoard events.
# Usage (device): bash bench/main_12gib.sh OUTDIR
set -euo pipefail
out=${1:-/tmp/main12}
mkdir -p "$out"
python3 scripts/make_shapes.py "$out/data" --count 120 --size 512 --seed 1 > /dev/null
python3 - "$out/data" <<'PY'
import sys
from pathlib import Path
from PIL import Image
for f in Path(sys.argv[1]).rglob("*.png"):
    Image.open(f).convert("RGB").resize((512, 512)).save(f)
PY
python3 main.py --base configs/stable-diffusion/v1-finetune_everydream.yaml bench/configs/sd1_run_gpu.yaml \
    -t -n main12 --data_root "$out/data" -l "$out/logs" \
    model.params.unet_precision=bf16 model.params.optimizer.name=adamw_bf16 \
    model.params.optimizer.fused_backward=true model.params.cond_stage_trainable=true \
    model.params.compile="${COMPILE:-reduce-overhead}" model.params.unet_config.params.use_checkpoint=false \
    2>&1 | tr '\r' '\n' | grep -v "it/s" || true
run=$(ls -d "$out"/logs/*_main12 | tail -1)
python3 - "$run" <<'PY'
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1]); acc.Reload()
for tag in ("perf/images_per_sec", "perf/peak_memory_gib"):
    print(tag, [(e.step, round(e.value, 3)) for e in acc.Scalars(tag)])
PY
ls -la "$run/checkpoints"
[ "${KEEP:-0}" = 1 ] || rm -f "$run"/checkpoints/*.ckpt  # 6.8 GB each
