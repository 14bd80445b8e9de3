#!/usr/bin/env bash
# Multi-node KOALA distillation with accelerate. Run this on every node with its NODE_RANK set.
#   MAIN_ADDR=10.0.0.1 NODE_RANK=0 NUM_NODES=2 GPUS_PER_NODE=8 scripts/launch_multinode.sh experiment=koala-700m \
#       teacher.pipeline=/models/sdxl data.path='/data/laion/{00000..09999}.tar'
# Every rank computes the same run directory (outputs/<name>), so checkpoints and resume agree across nodes.
set -euo pipefail
: "${MAIN_ADDR:?set MAIN_ADDR to the first node's address}"
: "${NODE_RANK:?set NODE_RANK (0 on the main node)}"
NUM_NODES=${NUM_NODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
exec accelerate launch \
  --multi_gpu \
  --num_machines "$NUM_NODES" \
  --machine_rank "$NODE_RANK" \
  --num_processes $((NUM_NODES * GPUS_PER_NODE)) \
  --main_process_ip "$MAIN_ADDR" \
  --main_process_port "${MAIN_PORT:-29500}" \
  --mixed_precision bf16 \
  -m koala.train "$@"
