#!/usr/bin/env bash
# Multi-node KOALA distillation: `accelerate launch` over torchrun's static rendezvous. Run it once on every node,
# at about the same time, with the same arguments and that node's NODE_RANK:
#   MAIN_ADDR=10.0.0.1 NODE_RANK=0 NUM_NODES=2 GPUS_PER_NODE=8 scripts/launch_multinode.sh experiment=koala-700m \
#       teacher.pipeline=/models/sdxl "data.path='/data/laion/{00000..09999}.tar'"
# Environment:
#   MAIN_ADDR        address of node 0 that every node can reach (required)
#   NODE_RANK        this node's rank, 0 .. NUM_NODES-1; node 0 hosts the rendezvous (required)
#   NUM_NODES        number of nodes (default 2)
#   GPUS_PER_NODE    processes on each node (default: the GPUs torch sees, or 1 on a machine without any, where
#                    the ranks use gloo on CPU; that is how tests/test_multinode.py runs 2 "nodes" on localhost)
#   MAIN_PORT        a free TCP port on node 0 (default 29500)
#   PYTHON           the interpreter that has koala installed (default: python)
#   ACCELERATE_ARGS  extra `accelerate launch` flags, word-split (e.g. "--same_network" or "--rdzv_conf ...")
# Precision, batch size and the rest come from the Hydra config (mixed_precision=bf16 in the experiments), not from
# accelerate's flags. Every rank computes the same run directory (outputs/<name>): use a filesystem all nodes share.
# Failure: no restarts (--max_restarts 0); resume with resume=latest. When a rank dies, its own node's launcher
# stops that node's other ranks; ranks on other nodes fail in their next collective: at once where the backend
# sees the connection drop (gloo does), else after the config's dist_timeout_s (default 600 s; a node that freezes,
# or NCCL, whose watchdog ends the process: TORCH_NCCL_ASYNC_ERROR_HANDLING, default 3). Each launcher then exits
# non-zero. tests/test_multinode.py checks this on CPU.
set -euo pipefail
: "${MAIN_ADDR:?set MAIN_ADDR to the address of node 0}"
: "${NODE_RANK:?set NODE_RANK (0 on the main node)}"
NUM_NODES=${NUM_NODES:-2}
PYTHON=${PYTHON:-python}
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
# --multi_gpu selects torchrun; without a GPU koala builds its Accelerator with cpu=True and the ranks use gloo.
# shellcheck disable=SC2086  # ACCELERATE_ARGS is a list of flags
exec "$PYTHON" -m accelerate.commands.launch \
  --multi_gpu \
  --num_machines "$NUM_NODES" \
  --machine_rank "$NODE_RANK" \
  --num_processes $((NUM_NODES * GPUS_PER_NODE)) \
  --main_process_ip "$MAIN_ADDR" \
  --main_process_port "${MAIN_PORT:-29500}" \
  --rdzv_backend static \
  --max_restarts 0 \
  --mixed_precision no \
  --dynamo_backend no \
  ${ACCELERATE_ARGS:-} \
  -m koala.train "$@"
