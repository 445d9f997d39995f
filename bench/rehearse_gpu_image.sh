#!/usr/bin/env bash
# Build, on the CPU, a virtual environment with the lent GPU image's packages (Python 3.12, torch 2.11.0,
# triton 3.6.0, ...; no webdataset, xformers, nvidia-dali or Hugging Face kernels), install this checkout
# into it as the GPU machine does, and run the suite's dry run there. See bench/README.md.
#   bash bench/rehearse_gpu_image.sh [VENV_DIR]      # default /tmp/mae-rehearse; needs python3.12 and network
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/mae-rehearse}
PY312=${PY312:-$(command -v python3.12 || true)}
[ -n "$PY312" ] || { echo "rehearse_gpu_image.sh: error: no python3.12 on PATH (set PY312=/path/to/python3.12)" >&2; exit 2; }
[ -e "$VENV" ] || "$PY312" -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q --upgrade pip setuptools wheel
pip install -q "torch==2.11.0" "triton==3.6.0" "torchvision==0.26.0" "transformers==5.17.0" "numpy>=2,<3" \
  timm "safetensors==0.8.0" "huggingface_hub==1.33.0" scikit-learn scikit-image pytest pytest-benchmark \
  matplotlib pyyaml tqdm pillow tensorboard
pip uninstall -q -y kernels webdataset xformers nvidia-dali-cuda130 2>/dev/null || true
pip install -q --no-deps --no-build-isolation -e .
MAE_RESULTS_DIR=$(mktemp -d) bash bench/gpu_suite.sh --dry-run
echo "rehearsal env ready: $VENV (full tests: $VENV/bin/python -m pytest -q)"
