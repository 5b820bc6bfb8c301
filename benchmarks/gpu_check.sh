#!/usr/bin/env bash
# One-GPU check: build the WKV7 kernel, run the GPU tests and the GPU benchmarks, print a summary.
#
#   bash benchmarks/gpu_check.sh                          # logs under benchmarks/_work/gpu (or $OUT)
#   STEPS="kernel_build bench_train" bash benchmarks/gpu_check.sh   # only some steps
# Steps run in this order: kernel_build bench_wkv7 alt_kernel gpu_tests bench_train bench_chat.
#
# A/B of a candidate kernel on the same warm GPU (the device machine gets no .git, so bring the file):
#   mkdir -p .alt && git show exp/wkv7-bwd-2tpr:cuda/wkv7_cuda.cu > .alt/wkv7_cuda.cu    # .alt/ is ignored
#   STEPS="kernel_build bench_wkv7 alt_kernel gpu_tests" ALT_CU=.alt/wkv7_cuda.cu bash benchmarks/gpu_check.sh
# (device tool: carry [".whl", ".alt"]). alt_kernel builds ALT_CU in a copy of the repo with its own
# extension cache, runs the GPU kernel tests there and the same bench_wkv7; the summary prints both tables.
# On a 15-minute device budget with 10-minute calls (times estimated from earlier H100/H200 runs):
#   1. STEPS="kernel_build bench_wkv7 gpu_tests"  ~7 min (gpu_tests ~5-6 min: kernel tests first, then 9
#      train.py runs with DeepSpeed op builds and --compile on the GPU; its 340 s limit keeps the call
#      under 600 s);
#   2. STEPS="bench_train" on the same warm machine  ~4.5 min;
#   3. alt_kernel (~2 min) only with the time left, else first in the next GPU session.
#
# Each step runs under its own time limit and its log is kept; a failed step does not stop the
# later ones, the summary at the end says which failed, and the script exits non-zero if any did.
# Wheels carried in .whl/ (if any; benchmarks/gpu_wheels.sh makes them) are installed into a private
# target first.
set -euo pipefail

# ---- settings (override from the environment) --------------------------------------------------
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT:-benchmarks/_work/gpu}"              # logs and the summary
WHEEL_DIR="${WHEEL_DIR:-.whl}"                     # carried wheels, installed when present
WHEEL_SITE="${WHEEL_SITE:-${TMPDIR:-/tmp}/wkv7_site}"
HEAD_SIZE="${HEAD_SIZE:-64}"                       # kernel head size to build
STEPS="${STEPS:-kernel_build gpu_tests bench_wkv7 bench_train bench_chat}"   # which steps to run
BUILD_TIMEOUT="${BUILD_TIMEOUT:-150}"              # seconds per step
TEST_TIMEOUT="${TEST_TIMEOUT:-340}"                # 9 train.py runs, DeepSpeed op builds, GPU compiles; with
                                                   # the build and bench_wkv7 limits it stays under a 600 s call
BENCH_TIMEOUT="${BENCH_TIMEOUT:-90}"
TRAIN_TIMEOUT="${TRAIN_TIMEOUT:-330}"              # --quick: 6 configurations (one compiles), FusedAdam build included
CHAT_TIMEOUT="${CHAT_TIMEOUT:-60}"
ALT_TIMEOUT="${ALT_TIMEOUT:-300}"                  # alt_kernel: build + GPU kernel tests + bench_wkv7
ALT_CU="${ALT_CU:-}"                               # alt_kernel: the candidate cuda/wkv7_cuda.cu
# kernel tests first: if the step runs out of time, the training tests are the ones cut
PYTEST_ARGS="${PYTEST_ARGS:--m gpu tests/test_wkv7_kernel.py tests/test_rnn.py tests/test_train_compile.py tests/test_train_gpu.py -q}"
BENCH_ARGS="${BENCH_ARGS:---device cuda}"
# -------------------------------------------------------------------------------------------------

cd "$(dirname "$0")/.."
# DeepSpeed 0.19's op builder cannot parse arch names like "9.0a" (ValueError: invalid literal for
# int() with base 10: '0a') when it JIT-builds FusedAdam; name the card's plain capability instead.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || true)"
    export TORCH_CUDA_ARCH_LIST
fi
mkdir -p "$OUT_DIR"
SUMMARY=()
FAILED=0

# step NAME TIMEOUT CMD...: run CMD with a time limit, log to $OUT_DIR/NAME.log (and the terminal),
# record status and seconds for the summary.
step() {
    local name="$1" limit="$2"
    shift 2
    case " wheels $STEPS " in *" $name "*) ;; *) return 0 ;; esac   # wheels: always
    local log="$OUT_DIR/$name.log" start end rc
    echo "==== $name: $*"
    start=$(date +%s)
    set +e
    timeout "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    end=$(date +%s)
    local status="ok"
    if [ "$rc" -eq 124 ]; then status="TIMEOUT(${limit}s)"; elif [ "$rc" -ne 0 ]; then status="FAILED(rc=$rc)"; fi
    [ "$status" = "ok" ] || FAILED=1
    SUMMARY+=("$(printf '| %-14s | %-14s | %6ss | %s' "$name" "$status" "$((end - start))" "$log")")
}

if compgen -G "$WHEEL_DIR/*.whl" > /dev/null; then
    step wheels 300 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$WHEEL_SITE" "$WHEEL_DIR"/*.whl
    export PYTHONPATH="$WHEEL_SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    if command -v nvidia-smi > /dev/null; then nvidia-smi || true; elif command -v rocm-smi > /dev/null; then rocm-smi || true; fi
    if command -v nvcc > /dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not on PATH"; fi
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'hip', torch.version.hip, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')" || true
} 2>&1 | tee "$OUT_DIR/device.log"

step kernel_build "$BUILD_TIMEOUT" "$PYTHON" -c "
import time
from src.wkv7.kernel import load_kernel
t0 = time.perf_counter()
load_kernel($HEAD_SIZE, verbose=True)  # shows nvcc's register/spill report
print(f'wkv7 kernel N=$HEAD_SIZE built and loaded in {time.perf_counter() - t0:.1f} s')
"
# The kernel's figures first: a call cut short by the device's time limit still has them.
# shellcheck disable=SC2086  # the argument strings are meant to split
step bench_wkv7 "$BENCH_TIMEOUT" "$PYTHON" -m benchmarks.bench_wkv7 $BENCH_ARGS

# alt_kernel: the same kernel tests and benchmark with ALT_CU in place of cuda/wkv7_cuda.cu
alt_kernel() {
    [ -f "$ALT_CU" ] || { echo "alt_kernel: ALT_CU='$ALT_CU' is not a file (see the header of benchmarks/gpu_check.sh)"; return 2; }
    local dir py="$PYTHON"
    case "$py" in */*) py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" ;; esac   # we cd below
    dir="$(mktemp -d)"
    cp -r cuda src tests benchmarks pytest.ini "$dir"/
    cp "$ALT_CU" "$dir/cuda/wkv7_cuda.cu"
    (
        cd "$dir"
        export TORCH_EXTENSIONS_DIR="$dir/torch_extensions"   # never reuse the main kernel's build
        "$py" -c "from src.wkv7.kernel import load_kernel; load_kernel($HEAD_SIZE, verbose=True)" \
            && "$py" -m pytest -m gpu tests/test_wkv7_kernel.py -q \
            && "$py" -m benchmarks.bench_wkv7 --device cuda
    )
}
export -f alt_kernel   # step runs its command under `timeout`, in a child bash
export ALT_CU HEAD_SIZE PYTHON
step alt_kernel "$ALT_TIMEOUT" bash -c alt_kernel

# shellcheck disable=SC2086
step gpu_tests "$TEST_TIMEOUT" "$PYTHON" -m pytest $PYTEST_ARGS
step bench_train "$TRAIN_TIMEOUT" "$PYTHON" -m benchmarks.bench_train --device cuda --quick
step bench_chat "$CHAT_TIMEOUT" "$PYTHON" -m benchmarks.bench_chat --device cuda --quick --no_pip


{
    echo
    echo "==== summary ($(head -n 40 "$OUT_DIR/device.log" | grep -m1 -oE 'NVIDIA [A-Za-z0-9 -]+|AMD [A-Za-z0-9 -]+' || echo 'device unknown'))"
    echo "| step           | status         |    time | log"
    printf '%s\n' "${SUMMARY[@]}"
    grep -h "built and loaded" "$OUT_DIR/kernel_build.log" 2>/dev/null || true
    grep -hE "[0-9]+ (passed|failed|skipped|error)" "$OUT_DIR/gpu_tests.log" 2>/dev/null | tail -n 1 || true
    grep -hE "^\| (device|cuda) " "$OUT_DIR/bench_wkv7.log" 2>/dev/null || true
    if [ -f "$OUT_DIR/alt_kernel.log" ]; then
        echo "alt_kernel ($ALT_CU):"
        grep -hE "[0-9]+ (passed|failed|skipped|error)" "$OUT_DIR/alt_kernel.log" | tail -n 1 || true
        grep -hE "^\| (device|cuda) " "$OUT_DIR/alt_kernel.log" || true
    fi
    grep -hE "^\|" "$OUT_DIR/bench_train.log" 2>/dev/null || true
    grep -hE "^\|" "$OUT_DIR/bench_chat.log" 2>/dev/null | tail -n 6 || true
} | tee "$OUT_DIR/summary.txt"
exit "$FAILED"
