#!/usr/bin/env bash
# Data-parallel workers for a sharded stage (generate, score, evaluate, critique):
#   bash configs/gpu/fanout.sh N python stages/generate.py --params params.yaml ...
# runs N copies of the command with `--shard i/N`, worker i on GPU i (or on the i-th entry of
# GPU_LIST, e.g. GPU_LIST=0,1,2,3,4,5), waits for all, then runs the command once more without
# --shard: every part is done by then, so it only checks the artifact and writes the metrics.
# Used as dvc.yaml's gpu_fanout ("bash configs/gpu/fanout.sh 6"); a failed worker fails the stage,
# and rerunning resumes from the parts already written.
set -euo pipefail
N="${1:?usage: fanout.sh N COMMAND...}"
shift
IFS=, read -ra GPUS <<< "${GPU_LIST:-$(seq -s, 0 $((N - 1)))}"
if [ "${#GPUS[@]}" -lt "$N" ]; then
  echo "fanout.sh: $N workers but GPU_LIST has ${#GPUS[@]} entries" >&2
  exit 2
fi
pids=()
for ((i = 0; i < N; i++)); do
  CUDA_VISIBLE_DEVICES="${GPUS[$i]}" "$@" --shard "$i/$N" &
  pids+=("$!")
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
[ "$rc" -eq 0 ] || { echo "fanout.sh: a worker failed; rerun to resume from the finished parts" >&2; exit "$rc"; }
exec "$@"
