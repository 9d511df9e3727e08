#!/usr/bin/env bash
# The prepared GPU check (issue 22 item 6): on one GPU, with no internet, measure at the GPU preset's
# policy shape (Llama-3.2-3B, random weights) the score forward and the update step (tokens/s, MFU
# against the card's dense bf16 peak), vLLM generation throughput and the bf16 sampler/scorer
# log-prob mismatch; print one table (also written to $OUT/gpu_check.json). Under 10 minutes.
#
#   bash scripts/gpu_check.sh [WHEELS_DIR]       # WHEELS_DIR: wheels carried alongside (pip --no-index)
#   GPU_CHECK_ARGS=--tiny bash scripts/gpu_check.sh   # the CPU dry run of the same code (a tiny Llama)
#
# OUT (default: a temporary folder) holds the 6.4 GB random checkpoint while it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "" ]; then
  python -m pip install --no-index --find-links "$1" -e ".[gpu]"
fi
OUT="${OUT:-$(mktemp -d -t gpu-check-XXXXXX)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
# 600 s in all; each phase has its own limit inside (bench/gpu_check.py BUDGET)
timeout 600 python bench/gpu_check.py --out "$OUT" ${GPU_CHECK_ARGS:-}
echo "details: $OUT/gpu_check.json"
[ -n "${KEEP_OUT:-}" ] || rm -rf "$OUT/model"
