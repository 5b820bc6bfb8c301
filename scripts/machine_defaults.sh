# Sourced by the demo-training-*.sh scripts (from the repo root) after their settings: fills in
# PYTHON (the repo's .venv when present) and, when not set, ACCELERATOR (gpu if torch sees one, else
# cpu) with the PRECISION/STRATEGY that suit it (CPU: fp32 + Lightning's own; GPU: bf16 + DeepSpeed).
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "${ACCELERATOR:-}" ]; then
  if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    ACCELERATOR=gpu
  else
    ACCELERATOR=cpu
  fi
fi
if [ "$ACCELERATOR" = cpu ]; then
  PRECISION="${PRECISION:-fp32}"
  STRATEGY="${STRATEGY:-auto}"
else
  PRECISION="${PRECISION:-bf16}"
  STRATEGY="${STRATEGY:-deepspeed_stage_2}"
fi
