#!/usr/bin/env bash
# Stage 3: pretrain $PROJ_DIR from its rwkv-init.pth (run demo-training-prepare.sh first), or continue
# from its highest rwkv-N.pth after an interruption (just run this again).
# DATA_FILE/MY_EXIT_TOKENS/MAGIC_PRIME: what `python3 data/make_data.py FILE.jsonl N_EPOCH CTX_LEN` printed
# (defaults: MiniMind's pretrain_hq.jsonl at ctx 512). Every setting can be overridden from the environment:
#   DATA_FILE=data/pretrain MY_EXIT_TOKENS=... MAGIC_PRIME=... bash demo-training-run.sh
# With a GPU: bf16 + DeepSpeed ZeRO-2; without one: CPU (bf16 with AMX, else fp32), one process. Multi-GPU: GPU_PER_NODE=8;
# multi-node: N_NODE=2 plus MASTER_ADDR, MASTER_PORT and NODE_RANK on every node (Lightning reads them).
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
M_BSZ="${M_BSZ:-16}"
LR_INIT="${LR_INIT:-6e-4}"
LR_FINAL="${LR_FINAL:-2e-5}"
GRAD_CP="${GRAD_CP:-0}"
WARMUP_STEPS="${WARMUP_STEPS:-10}"
BETA1="${BETA1:-0.9}"
BETA2="${BETA2:-0.99}"
ADAM_EPS="${ADAM_EPS:-1e-18}"
WEIGHT_DECAY="${WEIGHT_DECAY:-0.001}"
COMPILE="${COMPILE:-0}"              # 1: torch.compile the time/channel mixes (faster steps; the first one compiles)
EPOCH_SAVE="${EPOCH_SAVE:-1}"
EPOCH_STEPS="${EPOCH_STEPS:-0}"      # 0: 40320 samples per mini-epoch (SPEC); set it for small data
N_NODE="${N_NODE:-1}"
GPU_PER_NODE="${GPU_PER_NODE:-1}"
DS_BUCKET_MB="${DS_BUCKET_MB:-2}"
MY_EXIT_TOKENS="${MY_EXIT_TOKENS:-441795307}"
MAGIC_PRIME="${MAGIC_PRIME:-862811}"
DATA_FILE="${DATA_FILE:-data/pretrain_hq}"
DATA_TYPE="${DATA_TYPE:-binidx}"
LOAD_MODEL="${LOAD_MODEL:-}"         # empty: start from $PROJ_DIR/rwkv-init.pth
WANDB="${WANDB:-}"                   # a wandb project name to log there
RANDOM_SEED="${RANDOM_SEED:--1}"
# PYTHON, and ACCELERATOR/PRECISION/STRATEGY when unset: one shared rule for the demo scripts.
source scripts/machine_defaults.sh

# exec: train.py takes this shell's place, so a SIGTERM to the script (timeout, kill, a scheduler) reaches it
exec "$PYTHON" train.py --train_stage 3 --proj_dir "$PROJ_DIR" --load_model "$LOAD_MODEL" --wandb "$WANDB" \
  --my_testing "$MODEL_TYPE" --n_layer "$N_LAYER" --n_embd "$N_EMBD" --head_size "$HEAD_SIZE" \
  --vocab_size "$VOCAB_SIZE" --ctx_len "$CTX_LEN" --micro_bsz "$M_BSZ" \
  --lr_init "$LR_INIT" --lr_final "$LR_FINAL" --warmup_steps "$WARMUP_STEPS" --beta1 "$BETA1" --beta2 "$BETA2" \
  --adam_eps "$ADAM_EPS" --weight_decay "$WEIGHT_DECAY" --grad_cp "$GRAD_CP" --compile "$COMPILE" --epoch_save "$EPOCH_SAVE" --epoch_steps "$EPOCH_STEPS" \
  --my_exit_tokens "$MY_EXIT_TOKENS" --magic_prime "$MAGIC_PRIME" --data_file "$DATA_FILE" \
  --data_type "$DATA_TYPE" --random_seed "$RANDOM_SEED" --num_nodes "$N_NODE" --devices "$GPU_PER_NODE" \
  --ds_bucket_mb "$DS_BUCKET_MB" --accelerator "$ACCELERATOR" --precision "$PRECISION" \
  --strategy "$STRATEGY" --enable_progress_bar True "$@"
