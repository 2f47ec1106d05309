#!/usr/bin/env bash
# CPU-only (gloo), how every multi-rank test of this project runs:
#   NPROC=2 launch/cpu_gloo.sh eval ppl CKPT --data held_out.txt --pp 2
set -euo pipefail
export MEGATRON_PRUNE_DEVICE=cpu OMP_NUM_THREADS=1
exec torchrun --standalone --nproc-per-node="${NPROC:-2}" -m megatron_prune.cli "$@"
