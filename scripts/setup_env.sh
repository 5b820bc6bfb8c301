#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install what the repo needs.
# Usage: source-free; run `bash scripts/setup_env.sh` and then use .venv/bin/python.
set -euo pipefail

VENV_DIR="${VENV_DIR:-.venv}"
PYTHON="${PYTHON:-python3}"
# Which torch to install. With no NVIDIA/AMD GPU visible we pin the CPU build that this
# project is tested with; on GPU machines plain `torch` lets pip pick the CUDA/ROCm build.
if command -v nvidia-smi >/dev/null 2>&1 || command -v rocm-smi >/dev/null 2>&1; then
  TORCH_SPEC="${TORCH_SPEC:-torch}"
else
  TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
fi
EXTRA_REQS="${EXTRA_REQS:-}"   # e.g. requirements-dev.txt

cd "$(dirname "$0")/.."
if [ ! -x "$VENV_DIR/bin/python" ]; then
  echo "[setup] creating $VENV_DIR with $PYTHON"
  "$PYTHON" -m venv "$VENV_DIR"
fi
PIP=("$VENV_DIR/bin/python" -m pip --disable-pip-version-check -q)
# torch goes in the same resolver run as the rest, so pip never swaps it for another build.
args=("$TORCH_SPEC" -r requirements.txt)
if [ -n "$EXTRA_REQS" ]; then args+=(-r "$EXTRA_REQS"); fi
echo "[setup] installing $TORCH_SPEC + requirements.txt ${EXTRA_REQS:+ + $EXTRA_REQS} into $VENV_DIR"
"${PIP[@]}" install "${args[@]}"
# The repo itself, editable and without dependencies (just installed): makes `src` importable for the
# scripts in data/ wherever they are run from (pyproject.toml).
"${PIP[@]}" install --no-deps -e .
"$VENV_DIR/bin/python" -c "import torch, pytorch_lightning as pl; print(f'[setup] torch {torch.__version__}, lightning {pl.__version__}, cuda={torch.cuda.is_available()}')"
