#!/usr/bin/env bash
# The test command of README.md: sets up .venv from nothing (if needed) and runs the whole suite.
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -k wkv7`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_DIR="${VENV_DIR:-.venv}"
EXTRA_REQS=requirements-dev.txt VENV_DIR="$VENV_DIR" bash scripts/setup_env.sh
# One BLAS/OpenMP thread per process: the suite runs many tiny models and subprocesses, which
# oversubscribed threads slow down 10-25x on small CI machines.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$VENV_DIR/bin/python" -m pytest "$@"
