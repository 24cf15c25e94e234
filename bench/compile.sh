#!/usr/bin/env bash
# Does model.params.compile pay? Eager and compiled rows, one process each (doc/PERFORMANCE.md).
#   bash bench/compile.sh            # all rows; or name some: bash bench/compile.sh lora8 full32
# A row prints its JSON line, or its last lines of output when it fails or runs out of time.
# On a machine that starts afresh, reuse compiled kernels of an earlier start (bench/common.py):
#   BENCH_COMPILE_CACHE=.cache/compile BENCH_COMPILE_CACHE_OUT=$OUT/compile bash bench/compile.sh ...
set -u
cd "$(dirname "$0")/.."
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}  # rows share kernels
row() {  # row NAME TIMEOUT SCRIPT ARGS...  (ROW_LIMIT=<s> overrides every row's timeout)
  local name=$1 limit=${ROW_LIMIT:-$2}; shift 2
  [ ${#ROWS[@]} -eq 0 ] || [[ " ${ROWS[*]} " == *" $name "* ]] || return 0
  local log; log=$(mktemp)
  local t0=$SECONDS
  if timeout "$limit" python "$@" >"$log" 2>&1; then grep '^{' "$log"
  else echo "{\"row\": \"$name\", \"failed_after_s\": $((SECONDS - t0))}"; grep -v Warning "$log" | tail -15; fi
  rm -f "$log"
}
ROWS=("$@")
row lora8      300 bench/lora_step.py --impl ours --mode lora --batch 8 --compile
row full8      300 bench/lora_step.py --impl ours --mode full --batch 8 --compile
row full32     300 bench/train_step.py --impl ours --batch 32 --compile
row diffusers32 300 bench/train_step.py --impl diffusers --batch 32 --compile
row peer8      300 bench/lora_step.py --impl peer --batch 8 --compile
row lora8cg    300 bench/lora_step.py --impl ours --mode lora --batch 8 --compile --cudagraphs
row lowmem1    300 bench/train_step.py --impl ours --batch 1 --ckpt --low_memory --compile
row lowmem6te  300 bench/train_step.py --impl ours --batch 6 --low_memory --text_encoder --compile
row lowmem6teck 300 bench/train_step.py --impl ours --batch 6 --low_memory --text_encoder --ckpt --compile
row encode32   300 bench/train_step.py --impl ours --batch 32 --encode --compile
row eager32    150 bench/train_step.py --impl ours --batch 32
row eager32cl  150 bench/train_step.py --impl ours --batch 32 --channels_last
row full32cl   300 bench/train_step.py --impl ours --batch 32 --compile --channels_last
row diffusers32e   150 bench/train_step.py --impl diffusers --batch 32
row diffusers32ecl 150 bench/train_step.py --impl diffusers --batch 32 --channels_last
row diffusers32cl  300 bench/train_step.py --impl diffusers --batch 32 --compile --channels_last
row full32clb  300 bench/train_step.py --impl ours --batch 32 --compile --channels_last --compile_blocks
row full32clck 300 bench/train_step.py --impl ours --batch 32 --compile --channels_last --inductor combo_kernels=1
row full32clmb 300 bench/train_step.py --impl ours --batch 32 --compile --channels_last --memory_budget 0.9
row full32clmb99 300 bench/train_step.py --impl ours --batch 32 --compile --channels_last --memory_budget 0.99
row full32clcgw 300 bench/train_step.py --impl ours --batch 32 --compile --channels_last --cudagraphs --whole_unet
row full32clnt 300 bench/train_step.py --impl ours --batch 32 --compile --channels_last --no_text_cache
row full32clmag 300 bench/train_step.py --impl ours --batch 32 --compile --channels_last --inductor max_autotune_gemm=1
row full32clbf 300 bench/train_step.py --impl ours --batch 32 --compile --channels_last --unet_bf16
row full32clsr 300 bench/train_step.py --impl ours --batch 32 --compile --channels_last --bf16_sr
row full32clsrcd 300 bench/train_step.py --impl ours --batch 32 --compile --channels_last --bf16_sr --inductor coordinate_descent_tuning=1
row full32clsrck 300 bench/train_step.py --impl ours --batch 32 --compile --channels_last --bf16_sr --inductor combo_kernels=1
row full32clsrcgw 300 bench/train_step.py --impl ours --batch 32 --compile --channels_last --bf16_sr --cudagraphs --whole_unet
row lowmem6teold 300 bench/train_step.py --impl ours --batch 6 --low_memory --text_encoder --compile --old_update
row full32clms 300 bench/train_step.py --impl ours --batch 32 --compile --channels_last --master
row full32clmslt 300 bench/train_step.py --impl ours --batch 32 --compile --channels_last --master --blas cublaslt
row full32clmsto 300 bench/train_step.py --impl ours --batch 32 --compile --channels_last --master --blas tunableop
row full32clmsin 300 bench/train_step.py --impl ours --batch 32 --compile --channels_last --master --inductor_norm
row eager32ms  150 bench/train_step.py --impl ours --batch 32 --master
row encode6clms 300 bench/train_step.py --impl ours --batch 6 --encode --compile --channels_last --master
row encode6clmsin 300 bench/train_step.py --impl ours --batch 6 --encode --compile --channels_last --master --inductor_norm
row encode32clms 300 bench/train_step.py --impl ours --batch 32 --encode --compile --channels_last --master
row full32clmsmb99 300 bench/train_step.py --impl ours --batch 32 --compile --channels_last --master --memory_budget 0.99
row full32clmsmb999 300 bench/train_step.py --impl ours --batch 32 --compile --channels_last --master --memory_budget 0.999
row full32clmsfc 300 bench/train_step.py --impl ours --batch 32 --compile --channels_last --master --frozen_on_cpu
