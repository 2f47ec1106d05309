#!/usr/bin/env bash
# CPU-only (gloo), how every multi-rank test of this project runs:
#   NPROC=2 launch/cpu_gloo.sh eval ppl CKPT --data held_out.txt --pp 2
# Works on GPU nodes too: the GPUs are hidden from the ranks, which compute on the CPU.
# (`--device cpu` or MEGATRON_PRUNE_DEVICE=cpu alone also runs the CPU path on a GPU node: the
# CPU shim then makes megatron-core see no CUDA.)
set -euo pipefail
export MEGATRON_PRUNE_DEVICE=cpu OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
exec torchrun --standalone --nproc-per-node="${NPROC:-2}" -m megatron_prune.cli "$@"
