#!/usr/bin/env bash
# Multi-node on Ascend NPUs (HCCL, torch_npu). Install with `pip install megatron-prune[npu]`
# and source CANN first (set_env.sh). Run the same line on every node:
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=10.0.0.1 launch/multi_node_ascend.sh convert SRC DST --tp 8 --pp 4
set -euo pipefail
: "${ASCEND_TOOLKIT_HOME:?source CANN's set_env.sh first}"
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
NPUS_PER_NODE=${NPUS_PER_NODE:-8}
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
export CUDA_DEVICE_MAX_CONNECTIONS=1          # read by Megatron through torch_npu's bridge
export MEGATRON_PRUNE_DEVICE=npu               # torch_npu + transfer_to_npu, backend hccl
exec torchrun --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPUS_PER_NODE" \
  --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" -m megatron_prune.cli "$@"
