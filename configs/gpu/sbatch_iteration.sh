#!/usr/bin/env bash
# One Slurm job that serves the critic and runs the pipeline (`dvc repro`) on 2 nodes x 8 GPUs.
# Submit from the repository root:  sbatch configs/gpu/sbatch_iteration.sh
#SBATCH --job-name=tcrlsd
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
set -euo pipefail
# dvc.yaml: update_launcher: bash configs/gpu/slurm_update.sh, gpu_fanout: bash configs/gpu/fanout.sh 7.
# The critic on the first node's GPU 7; the sharded stages use GPUs 0-6 of the first node; the
# update uses GPUs 0-6 of both nodes (14 processes: keep that layout for the whole run).
CUDA_VISIBLE_DEVICES=7 vllm serve models/Qwen3-4B --served-model-name Qwen3-4B --port 8000 \
  --max-model-len 8192 --gpu-memory-utilization 0.85 > critic-server.log 2>&1 &
CRITIC_PID=$!
trap 'kill $CRITIC_PID' EXIT
until curl -sf http://127.0.0.1:8000/v1/models > /dev/null; do sleep 10; done
export GPU_LIST=0,1,2,3,4,5,6 GPUS_PER_NODE=7
tcrlsd prune     # checkpoint retention, params checkpoints (docs/GPU.md, Storage): before and after
dvc repro        # what iterations.yaml lists and is not done yet (e.g. a resumed job)
tcrlsd prune
# then ITERATIONS more, one `dvc repro` and one prune each: sbatch --export=ALL,ITERATIONS=10 ...
if [ "${ITERATIONS:-0}" -gt 0 ]; then tcrlsd iterate "$ITERATIONS"; fi
