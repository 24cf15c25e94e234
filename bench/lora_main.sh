#!/usr/bin/env bash
# main.py -t training a LoRA (configs/lora/lora.yaml, UNet + text encoder, rank 16) at batch 8
# with compile: reduce-overhead (issue: adapters, batch-8 target), on 64 generated 512 px
# square images x 20 repeats (one bucket: each new shape compiles and records anew): 160 steps.
#   bash bench/lora_main.sh [OUTDIR] [extra override configs...]
# Prints the run's images/s from its logged steps (bench/end_to_end_report.py) and the files
# it wrote.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/lora_main}; shift || true
rm -rf "$out/logs"; mkdir -p "$out"
python3 - "$out/data/20_shape" <<'PY'
import sys
from pathlib import Path
from PIL import Image, ImageDraw
import random
root = Path(sys.argv[1]); root.mkdir(parents=True, exist_ok=True)
rng = random.Random(1)
for i in range(64):
    im = Image.new("RGB", (512, 512), tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(im)
    x, y, r = rng.randrange(100, 412), rng.randrange(100, 412), rng.randrange(30, 100)
    d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    im.save(root / f"{i:03d}.png")
    (root / f"{i:03d}.txt").write_text(f"a circle on a plain background, number {i}")
PY
python3 main.py --base configs/lora/lora.yaml bench/configs/lora_cudagraphs.yaml "$@" -t -n lora \
    --data_root "$out/data" -l "$out/logs" >"$out/main.log" 2>&1 || { tail -40 "$out/main.log"; exit 1; }
run=$(ls -d "$out"/logs/*_lora | tail -1)
python3 bench/end_to_end_report.py "$run" --batch 8 --skip 20 --log "$out/main.log"
python3 - "$run" <<'PY'
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1]); acc.Reload()
mem = [e.value for e in acc.Scalars("perf/peak_memory_gib")] if "perf/peak_memory_gib" in acc.Tags()["scalars"] else []
print({"peak_memory_gib_max": round(max(mem), 2) if mem else None,
       "loss_last": round(acc.Scalars("train/loss_step")[-1].value, 4)})
PY
grep -i "warn\|recompile\|cudagraph" "$out/main.log" | sort | uniq -c | head -20 || true
find "$run" -name "*.safetensors" -o -name "*.png" | head
