#!/usr/bin/env bash
# Multi-node training with torchrun (c10d rendezvous). Run the same command on every node:
#
#   NNODES=4 GPUS=8 HOST=node0.cluster PORT=29500 bash examples/multinode_torchrun.sh pretrain \
#       --preset vit_l16_224 --data '/data/shards/train-{000000..001023}.tar' --output-dir runs/vit_l
#   NNODES=4 GPUS=8 HOST=node0.cluster bash examples/multinode_torchrun.sh finetune \
#       --model vit_large_patch16 --finetune runs/vit_l/checkpoints/checkpoint-00100000.pth --data /data/imagenet-shards
#   NNODES=4 GPUS=8 HOST=node0.cluster bash examples/multinode_torchrun.sh linprobe \
#       --model vit_large_patch16 --finetune runs/vit_l/checkpoints/checkpoint-00100000.pth --data /data/imagenet-shards
#
# TASK is pretrain | finetune | linprobe; every other argument goes to the training command.
# HOST:PORT is any node's address (every node must reach it); the job id RDZV_ID must be the same on
# all nodes and new for each job. The output folder and the data must be on storage every node sees.
# GPUS defaults to the GPUs nvidia-smi lists (1 without any: one CPU process, gloo); TORCHRUN to torchrun.
set -euo pipefail
task=${1:?usage: multinode_torchrun.sh pretrain|finetune|linprobe [options...]}
shift
case "$task" in
  pretrain|finetune|linprobe) ;;
  *) echo "multinode_torchrun.sh: unknown task '$task' (pretrain, finetune or linprobe)" >&2; exit 2 ;;
esac
: "${NNODES:?set NNODES (number of nodes)}" "${HOST:?set HOST (rendezvous host, e.g. the first node)}"
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
GPUS=${GPUS:-1}
[ "$GPUS" -ge 1 ] || GPUS=1
exec ${TORCHRUN:-torchrun} --nnodes "$NNODES" --nproc-per-node "$GPUS" \
  --rdzv-backend c10d --rdzv-endpoint "$HOST:${PORT:-29500}" --rdzv-id "${RDZV_ID:-mae-fast-$task}" \
  -m "mae_fast.train.$task" "$@"
