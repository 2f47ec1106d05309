#!/usr/bin/env bash
# Multi-node on NVIDIA GPUs (NCCL). Run the same line on every node, e.g. under Slurm:
#   srun --nodes=2 --ntasks-per-node=1 launch/multi_node_cuda.sh convert gguf:m.gguf out --tp 8 --pp 2
# MASTER_ADDR / NODE_RANK / NNODES come from the scheduler or the environment.
set -euo pipefail
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n1 || echo localhost)}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=1          # Megatron's TP/SP overlap needs in-order streams
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export MEGATRON_PRUNE_DEVICE=${MEGATRON_PRUNE_DEVICE:-cuda}  # cpu: the loopback test (gloo)
exec torchrun --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$GPUS_PER_NODE" \
  --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" -m megatron_prune.cli "$@"
