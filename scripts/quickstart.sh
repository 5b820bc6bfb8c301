#!/usr/bin/env bash
# The main job on the bundled sample data, from nothing: venv -> make_data -> init (stage 1) ->
# pretrain -> SFT -> a chat answer -> held-out accuracy of the init and the final model.
#   bash scripts/quickstart.sh
# Runs on CPU when there is no GPU. Every setting below can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV_DIR="${VENV_DIR:-.venv}"
OUT_DIR="${OUT_DIR:-out/quickstart}"
N_LAYER="${N_LAYER:-2}"
N_EMBD="${N_EMBD:-128}"
CTX_LEN="${CTX_LEN:-256}"
M_BSZ="${M_BSZ:-8}"
PRETRAIN_EPOCHS="${PRETRAIN_EPOCHS:-2}"     # copies of pretrain.jsonl (~0.6M tokens)
SFT_EPOCHS="${SFT_EPOCHS:-5}"               # copies of sft.jsonl (~0.9M tokens)
PRETRAIN_LR="${PRETRAIN_LR:-2e-3}"          # a tiny model wants a larger lr than L8-D512's 6e-4
SFT_LR="${SFT_LR:-1e-3}"
EPOCH_STEPS="${EPOCH_STEPS:-50}"            # small mini-epochs: a log line and checkpoint every 50 steps
THREADS="${THREADS:-$(nproc)}"
PROMPT="${PROMPT:-Reverse the order: cat moon tree}"   # phrased like the sample's reverse task
SKIP_SETUP="${SKIP_SETUP:-0}"               # 1: use $VENV_DIR as it is (tests)
CPU_PRECISION="${CPU_PRECISION:-fp32}"      # on CPU; this tiny model gains nothing from bf16 (GPU: bf16)

export OMP_NUM_THREADS="$THREADS"
if [ "$SKIP_SETUP" != 1 ]; then VENV_DIR="$VENV_DIR" bash scripts/setup_env.sh; fi
PY="$VENV_DIR/bin/python"
mkdir -p "$OUT_DIR"

step() { echo; echo "==== [quickstart] $*"; }

step "1/6 make_data: tokenize the bundled sample (data/sample/*.jsonl) into binidx"
"$PY" data/make_data.py data/sample/pretrain.jsonl "$PRETRAIN_EPOCHS" "$CTX_LEN" --out "$OUT_DIR/pretrain" | tee "$OUT_DIR/make_data_pretrain.txt"
"$PY" data/make_data.py data/sample/sft.jsonl "$SFT_EPOCHS" "$CTX_LEN" --out "$OUT_DIR/sft" | tee "$OUT_DIR/make_data_sft.txt"
# make_data prints a line "MY_EXIT_TOKENS=... MAGIC_PRIME=... DATA_FILE=... DATA_TYPE=... CTX_LEN=..." of shell
# words (DATA_FILE quoted where needed): eval makes it an array, so an OUT_DIR with spaces stays one word.
eval "PRETRAIN_FLAGS=($(grep -m1 '^MY_EXIT_TOKENS=' "$OUT_DIR/make_data_pretrain.txt"))"
eval "SFT_FLAGS=($(grep -m1 '^MY_EXIT_TOKENS=' "$OUT_DIR/make_data_sft.txt"))"

COMMON=(N_LAYER="$N_LAYER" N_EMBD="$N_EMBD" CTX_LEN="$CTX_LEN" M_BSZ="$M_BSZ" EPOCH_STEPS="$EPOCH_STEPS"
        PYTHON="$PY" RANDOM_SEED=42 CPU_PRECISION="$CPU_PRECISION")

step "2/6 init: demo-training-prepare.sh (stage 1 writes rwkv-init.pth)"
env "${COMMON[@]}" PROJ_DIR="$OUT_DIR/pretrain-run" PRECISION=fp32 STRATEGY=auto bash demo-training-prepare.sh

step "3/6 pretrain: demo-training-run.sh"
env "${COMMON[@]}" "${PRETRAIN_FLAGS[@]}" PROJ_DIR="$OUT_DIR/pretrain-run" \
    LR_INIT="$PRETRAIN_LR" LR_FINAL=1e-4 bash demo-training-run.sh

step "4/6 SFT: demo-training-run-sft.sh (loss on the assistant replies)"
env "${COMMON[@]}" "${SFT_FLAGS[@]}" PRETRAIN_DIR="$OUT_DIR/pretrain-run" \
    PROJ_DIR="$OUT_DIR/sft-run" LR_INIT="$SFT_LR" LR_FINAL=1e-4 bash demo-training-run-sft.sh

step "5/6 chat: API_DEMO_CHAT.py --prompt \"$PROMPT\" (greedy)"
"$PY" API_DEMO_CHAT.py --model "$OUT_DIR/sft-run/rwkv-final.pth" --temperature 0 --prompt "$PROMPT"

step "6/6 held-out evaluation (data/sample/eval.jsonl)"
"$PY" -m scripts.eval_sample --model "$OUT_DIR/pretrain-run/rwkv-init.pth" --label "untrained init"
"$PY" -m scripts.eval_sample --model "$OUT_DIR/sft-run/rwkv-final.pth" --label "after pretrain + SFT"

echo
echo "==== [quickstart] next: chat with the model (the venv's python has everything installed)"
printf '  %q API_DEMO_CHAT.py --model %q --temperature 0\n' "$PY" "$OUT_DIR/sft-run/rwkv-final.pth"
echo "  it knows the sample's 12 tasks, e.g. 'What is 3 + 1?', 'Uppercase: coin', 'Reverse the order: cat moon tree'"
echo "  (data/sample/eval.jsonl has more); 'source .venv/bin/activate' puts this python first on PATH"
