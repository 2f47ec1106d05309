#!/usr/bin/env bash
# Run any megatron-prune command on the processes of one node.
#   NPROC=8 launch/single_node.sh eval ppl CKPT --data held_out.txt --tp 4 --pp 2
# (equivalent to `megatron-prune ... --nproc-per-node 8`)
set -euo pipefail
NPROC=${NPROC:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
exec torchrun --standalone --nproc-per-node="$NPROC" -m megatron_prune.cli "$@"
