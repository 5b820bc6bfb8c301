#!/usr/bin/env bash
# Stage 1: write the initial weights $PROJ_DIR/rwkv-init.pth (SPEC init; bf16 with PRECISION=bf16).
# Needs no data and no GPU. Every setting below can be overridden from the environment, e.g.
#   N_LAYER=4 N_EMBD=256 bash demo-training-prepare.sh
# Paths are relative to this folder (the script changes into it). Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")"

MODEL_TYPE="${MODEL_TYPE:-x070}"
N_LAYER="${N_LAYER:-8}"
N_EMBD="${N_EMBD:-512}"
HEAD_SIZE="${HEAD_SIZE:-64}"
VOCAB_SIZE="${VOCAB_SIZE:-6400}"
CTX_LEN="${CTX_LEN:-512}"
PROJ_DIR="${PROJ_DIR:-out/L${N_LAYER}-D${N_EMBD}-${MODEL_TYPE}}"
M_BSZ="${M_BSZ:-1}"
LR_INIT="${LR_INIT:-6e-4}"
LR_FINAL="${LR_FINAL:-2e-5}"
GRAD_CP="${GRAD_CP:-0}"
EPOCH_SAVE="${EPOCH_SAVE:-1}"
N_NODE="${N_NODE:-1}"
GPU_PER_NODE="${GPU_PER_NODE:-1}"
DS_BUCKET_MB="${DS_BUCKET_MB:-2}"
MY_EXIT_TOKENS="${MY_EXIT_TOKENS:-441795307}"
MAGIC_PRIME="${MAGIC_PRIME:-862811}"
DATA_FILE="${DATA_FILE:-data/pretrain_hq}"
DATA_TYPE="${DATA_TYPE:-binidx}"
RANDOM_SEED="${RANDOM_SEED:--1}"
# Stage 1 builds the model on the CPU whatever these say (the published flags, kept as published).
ACCELERATOR="${ACCELERATOR:-cpu}"
PRECISION="${PRECISION:-bf16}"
STRATEGY="${STRATEGY:-deepspeed_stage_2}"
# PYTHON, and ACCELERATOR/PRECISION/STRATEGY when unset: one shared rule for the demo scripts.
source scripts/machine_defaults.sh

# exec: train.py takes this shell's place, so a SIGTERM to the script (timeout, kill, a scheduler) reaches it
exec "$PYTHON" train.py --train_stage 1 --proj_dir "$PROJ_DIR" --my_testing "$MODEL_TYPE" \
  --n_layer "$N_LAYER" --n_embd "$N_EMBD" --head_size "$HEAD_SIZE" --vocab_size "$VOCAB_SIZE" \
  --ctx_len "$CTX_LEN" --micro_bsz "$M_BSZ" --lr_init "$LR_INIT" --lr_final "$LR_FINAL" \
  --grad_cp "$GRAD_CP" --epoch_save "$EPOCH_SAVE" --num_nodes "$N_NODE" --devices "$GPU_PER_NODE" \
  --ds_bucket_mb "$DS_BUCKET_MB" --my_exit_tokens "$MY_EXIT_TOKENS" --magic_prime "$MAGIC_PRIME" \
  --data_file "$DATA_FILE" --data_type "$DATA_TYPE" --random_seed "$RANDOM_SEED" \
  --accelerator "$ACCELERATOR" --precision "$PRECISION" --strategy "$STRATEGY" "$@"
