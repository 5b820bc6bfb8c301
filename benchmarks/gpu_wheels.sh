#!/usr/bin/env bash
# Wheels for the GPU image, made here (the GPU machine has no package index): DeepSpeed and the
# packages it needs that the image lacks. gpu_check.sh installs whatever lies in WHEEL_DIR.
#
#   bash benchmarks/gpu_wheels.sh        # then carry ".whl" with the device tool
set -euo pipefail

# ---- settings (override from the environment) --------------------------------------------------
PYTHON="${PYTHON:-.venv/bin/python}"
WHEEL_DIR="${WHEEL_DIR:-.whl}"                      # ignored by git (.gitignore: /.whl/)
DEEPSPEED="${DEEPSPEED:-deepspeed==0.19.8}"         # builds as a pure-Python wheel (ops JIT-built there)
# The GPU image (device README, KINDS.md) has torch, numpy, einops, msgpack, ninja, packaging, psutil,
# py-cpuinfo and tqdm, but not these (pydantic wants a newer typing-extensions than some images have):
EXTRA="${EXTRA:-hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions}"
TARGET_PY="${TARGET_PY:-3.12}"                      # the image's python3
# -------------------------------------------------------------------------------------------------

cd "$(dirname "$0")/.."
mkdir -p "$WHEEL_DIR"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps -w "$WHEEL_DIR" "$DEEPSPEED"
# shellcheck disable=SC2086  # EXTRA is a list of names
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEEL_DIR" $EXTRA
ls -l "$WHEEL_DIR"
