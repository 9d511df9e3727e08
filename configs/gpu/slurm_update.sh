#!/usr/bin/env bash
# Start the update stage on every node of a Slurm allocation: one torchrun per node, 8 processes
# each, rendezvous on the first node. Used as dvc.yaml's update_launcher inside an sbatch job:
#   update_launcher: bash configs/gpu/slurm_update.sh
# The script path and its arguments follow (dvc.yaml appends `stages/update.py --params ...`).
# GPUS_PER_NODE, RDZV_PORT and GPU_LIST (the GPUs each node's processes use, e.g. 0,1,2,3,4,5,6 when
# GPU 7 of the first node serves the critic) may be set in the environment.
set -euo pipefail
: "${SLURM_JOB_NODELIST:?run inside a Slurm allocation (sbatch / salloc)}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
RDZV_PORT="${RDZV_PORT:-29500}"
NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
MASTER="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
GPU_LIST="${GPU_LIST:-$(seq -s, 0 $((GPUS_PER_NODE - 1)))}"
exec srun --nodes "$NNODES" --ntasks-per-node 1 \
  env CUDA_VISIBLE_DEVICES="$GPU_LIST" torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER:$RDZV_PORT" --rdzv_id "${SLURM_JOB_ID}-update" \
  "$@"
