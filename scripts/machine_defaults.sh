# Sourced by the demo-training-*.sh scripts (from the repo root) after their settings: fills in
# PYTHON (the repo's .venv when present) and, when not set, ACCELERATOR (gpu if torch sees one, else
# cpu) with the PRECISION/STRATEGY that suit it (GPU: bf16 + DeepSpeed; CPU: Lightning's own strategy
# and CPU_PRECISION).
# CPU_PRECISION auto: bf16 on CPUs with AMX bf16 units (listed in $CPUINFO), where bf16 autocast trains
# L8-D512 1.3-1.5x faster than fp32 (benchmarks/RESULTS.md); fp32 elsewhere (on CPUs without bf16
# instructions bf16 is emulated and slower; AVX512-BF16 without AMX is not measured: try CPU_PRECISION=bf16).
CPU_PRECISION="${CPU_PRECISION:-auto}"
CPUINFO="${CPUINFO:-/proc/cpuinfo}"
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
  if [ -z "${PRECISION:-}" ]; then
    case "$CPU_PRECISION" in
      auto)
        if grep -qw amx_bf16 "$CPUINFO" 2> /dev/null; then PRECISION=bf16; else PRECISION=fp32; fi
        echo "machine_defaults: CPU training in $PRECISION (bf16 when the CPU has AMX; set PRECISION to choose)" >&2 ;;
      fp32 | bf16) PRECISION="$CPU_PRECISION" ;;
      *) echo "machine_defaults: CPU_PRECISION=$CPU_PRECISION is not one of auto, fp32, bf16" >&2; exit 2 ;;
    esac
  fi
  STRATEGY="${STRATEGY:-auto}"
else
  PRECISION="${PRECISION:-bf16}"
  STRATEGY="${STRATEGY:-deepspeed_stage_2}"
fi
