#!/usr/bin/env bash
# One command that exercises, on one GPU in about 5 minutes, every CUDA path the CPU tests cannot reach
# (AMP bf16/fp16 with the in-place ABN kernels, channels_last, compile, nccl, the loader at its default
# workers, pre-emption and resume on the GPU, peak memory of ResNet-101 at crop 512 batch 12), and
# prints one table (benchmarks/gpu_check.py says what each row does). Exit 0: no row failed; 1: a row
# failed; 2: no GPU visible.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --device cpu    # rehearsal on the CPU, tiny sizes
#   bash benchmarks/gpu_check.sh --keep DIR      # keep the runs' folders in DIR
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$PY" benchmarks/gpu_check.py "$@"
