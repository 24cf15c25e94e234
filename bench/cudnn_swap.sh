#!/usr/bin/env bash
# Does another cuDNN run the step faster? The trainer pins torch 2.14.1, whose wheel brings
# cuDNN 9.24 (nvidia-cudnn-cu13 9.24.0.43); a GPU machine with an older torch has an older one.
# Runs a command with another cuDNN's libraries loaded in place of torch's own:
#   bash bench/cudnn_swap.sh pack SITE_PACKAGES PARTS_DIR  # nvidia/cudnn/lib as xz parts of 41 MB
#   bash bench/cudnn_swap.sh unpack PARTS_DIR DIR          # the parts -> DIR/lib
#   bash bench/cudnn_swap.sh run DIR CMD...                # CMD with DIR/lib's cuDNN preloaded
# (9.24: 463 MB in 12 parts; one part fits beside the ~24 MB working tree in a GPU call's
# 64 MiB, so a part travels per call and a warm machine keeps them.)
# A machine with a CUDA 13 driver and torch built for CUDA 13 takes the cu13 libraries.
# `run` prints the version torch then reports and which cuDNN files the process mapped.
set -eu
case $1 in
  pack)
    mkdir -p "$3"
    (cd "$2/nvidia/cudnn" && tar -cf - lib) | xz -T2 -8 | split -b 41000000 - "$3/cudnn.tar.xz.part-" ;;
  unpack)
    mkdir -p "$3"
    cat "$2"/cudnn.tar.xz.part-* | xz -d | tar -xf - -C "$3" ;;
  run)
    lib=$(cd "$2/lib" && pwd); shift 2
    export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    LD_PRELOAD=$(ls "$lib"/libcudnn*.so.9 | tr '\n' ':')
    export LD_PRELOAD
    python3 -c "import torch; print('cudnn', torch.backends.cudnn.version(),
      sorted({line.split()[-1] for line in open('/proc/self/maps') if 'cudnn' in line}))"
    "$@" ;;
  *) echo "usage: $0 pack|unpack|run ..." >&2; exit 2 ;;
esac
