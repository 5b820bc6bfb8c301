#!/usr/bin/env bash
# The test command of README.md: sets up .venv from nothing (if needed) and runs the whole suite.
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -k wkv7`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_DIR="${VENV_DIR:-.venv}"
EXTRA_REQS=requirements-dev.txt VENV_DIR="$VENV_DIR" bash scripts/setup_env.sh
exec "$VENV_DIR/bin/python" -m pytest "$@"
