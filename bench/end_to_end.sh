#!/usr/bin/env bash
# main.py -t against the bare training step (issue: performance, target 2: >= 90% over 200+ steps).
#   bash bench/end_to_end.sh [OUTDIR]
# 50 generated images of 6 aspect ratios (640 px long side: several buckets at 512), file-name
# captions, 10% held out for validation, 20 repeats, batch 6: 150 steps per epoch, 2 epochs,
# with validation, a checkpoint and sample grids each epoch (and grids every 250 steps, and the base
# model's grid before the first step, before the measured window).
# The baseline: the bare step with the same model, batch and settings (VAE encode in the step,
# gradient checkpointing as the config has it) on the run's own buckets (its dataset_plan.json:
# images of ~0.93 of 512^2's pixels on average here), timed in main.py's process after its
# training (bench/bare_in_process.py): the host's speed, which bounds this step, varied up to
# 1.45x between processes. Then, in processes of their own, the bare step at 512 x 512 and
# E2E_BARE_RUNS (default 1) times on the buckets, and the ratios against each. With
# bare_in_process's `before: true` (bench/configs/bare_before.yaml) the in-process baseline is
# the mean of the bare step before and after the run.
#   E2E_BASE=<config> E2E_BATCH=<its batch size> E2E_BARE=0 (main.py only, e.g. on a CPU;
#   E2E_SKIP=5 for runs of under ~40 steps: the rate is taken from the logged steps after it;
#   E2E_KEEP=1 keeps the run's checkpoints, deleted once measured)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/e2e}
base=${E2E_BASE:-configs/stable-diffusion/v1-finetune_everydream.yaml}
batch=${E2E_BATCH:-6}
rm -rf "$out/logs"; mkdir -p "$out"
[ -d "$out/data" ] || python3 scripts/make_shapes.py "$out/data" --count "${E2E_IMAGES:-50}" --size 640 --seed 1 >/dev/null
# shellcheck disable=SC2086  # E2E_BASE may list several configs
python3 main.py --base $base ${E2E_OVERRIDES:-bench/configs/end_to_end.yaml} -t -n e2e --data_root "$out/data" \
    -l "$out/logs" >"$out/main.log" 2>&1 || { tail -30 "$out/main.log"; exit 1; }
run=$(ls -d "$out"/logs/*_e2e | tail -1)
# bare steps run during the run (bench/configs/bare_during.yaml): their time is not main.py's
during=$( (grep -a -o 'bare in process (step [0-9]*) took [0-9.]* s' "$out/main.log" || true) | awk '{s += $(NF-1)} END {print s + 0}')
e2e=$(python3 bench/end_to_end_report.py "$run" --batch "$batch" --skip "${E2E_SKIP:-20}" --log "$out/main.log" \
    --exclude_seconds "$during" $([ "${E2E_INTERVALS:-0}" = 1 ] && echo --intervals))
echo "$e2e"
in_process=$(grep -a -o 'bare in process: {.*' "$out/main.log" | sed 's/^bare in process: //' | tail -1 || true)
before=$(grep -a -o 'bare in process (before): {.*' "$out/main.log" | sed 's/^bare in process (before): //' | tail -1 \
    || true)
[ -z "$in_process" ] || { echo "$in_process"; [ -z "$before" ] || echo "before: $before"
    python3 -c "import json,sys; e,*b=(json.loads(s) for s in sys.argv[1:] if s)
bare=sum(r['img_per_s'] for r in b)/len(b)  # after the run, or the mean of before and after
print(json.dumps({'bare_in_process': round(bare, 2),
                  'main_over_bare_in_process': round(e['img_per_s']/bare, 3),
                  'steady_over_bare_in_process': round(e['steady_img_per_s']/bare, 3)}))" "$e2e" "$in_process" "$before"; }
samples=$(grep -a -o 'bare in process (step [0-9]*): {.*' "$out/main.log" | sed 's/^[^{]*//' || true)
[ -z "$samples" ] || python3 -c "import json,sys; e=json.loads(sys.argv[1]); b=[json.loads(l) for l in sys.argv[2].splitlines()]
bare=sum(r['img_per_s'] for r in b)/len(b)
print(json.dumps({'bare_during': [r['img_per_s'] for r in b], 'bare_during_mean': round(bare, 2),
                  'main_over_bare_during': round(e['img_per_s']/bare, 3),
                  'steady_over_bare_during': round(e['steady_img_per_s']/bare, 3)}))" "$e2e" "$samples"
# the run's checkpoints are 11 GB each at SD size: repeated runs filled a 64 GiB disk
[ "${E2E_KEEP:-0}" = 1 ] || rm -rf "$run/checkpoints"
[ "${E2E_BARE:-1}" = 0 ] && exit 0
# as the shipped configs run (lightning.trainer.benchmark: false); with cuDNN's per-process kernel
# trials on, the bare step differed by up to 10% between two processes of one call
# shellcheck disable=SC2086
# bf16 weights with fp32 masters, gradient checkpointing and CUDA graphs, as the run trained
flags=$(python3 -c "import sys; from ldm.config import load_config; p = load_config(sys.argv[1:]).model.params
print(('--master' if p.optimizer.name == 'adamw_master' else ''), ('--ckpt' if p.unet_config.params.use_checkpoint else ''),
      ('--graphs' if p.get('cuda_graphs', False) else ''))" \
    $base ${E2E_OVERRIDES:-bench/configs/end_to_end.yaml})
# shellcheck disable=SC2086
bare=$(python3 bench/train_step.py --impl ours --batch "$batch" --encode --no_cudnn_benchmark $flags | grep '^{')
echo "$bare"
# The bare step on the run's buckets in E2E_BARE_RUNS processes, the ratios against their median.
buckets=()
for _ in $(seq "${E2E_BARE_RUNS:-1}"); do
    # shellcheck disable=SC2086
    buckets+=("$(python3 bench/train_step.py --impl ours --batch "$batch" --encode --no_cudnn_benchmark \
        $flags --steps 60 --plan "$run/dataset_plan.json" | grep '^{')")
    echo "${buckets[-1]}"
done
python3 -c "import json,statistics,sys; e,b,*k=(json.loads(s) for s in sys.argv[1:])
median=statistics.median(r['img_per_s'] for r in k)
print(json.dumps({
    'main_over_bare': round(e['img_per_s']/b['img_per_s'], 3),
    'bare_same_buckets': [r['img_per_s'] for r in k], 'bare_same_buckets_median': median,
    'main_over_bare_same_buckets': round(e['img_per_s']/median, 3),
    'steady_over_bare_same_buckets': round(e['steady_img_per_s']/median, 3)}))" "$e2e" "$bare" "${buckets[@]}"
