"""Train Mini-RWKV-7 (x070): stage 1 writes rwkv-init.pth, stages 2/3 pretrain or fine-tune (SFT).

    python train.py --train_stage 1 --proj_dir out/L8-D512-x070 --precision bf16 ...     # init
    python train.py --train_stage 3 --proj_dir out/L8-D512-x070 --data_file data/pretrain_hq \\
        --data_type binidx --my_exit_tokens 441795307 --magic_prime 862811 ...           # pretrain
    python train.py --train_stage 3 --proj_dir out/L8-D512-x070-sft --data_type sft \\
        --load_model out/L8-D512-x070/rwkv-final.pth --data_file data/sft_512 ...        # SFT

The demo-training-*.sh scripts hold the published settings. Reads top to bottom: parse the flags,
check them against the machine and the data (every problem is reported before any compute), then
stage 1 saves the initial weights, stages 2/3 find where to start, build the model, the data and
the Lightning Trainer, and fit. src/trainer.py documents the schedule, the files and the resume.

Where a stage 2/3 run starts, in this order:
1. proj_dir holds rwkv-N.pth (N >= 0): resume from the highest N at mini-epoch N+1; exactly (same
   lr, Adam moments, next sample) when its rwkv-N.state.pth fits this run, weights-only otherwise.
   --load_model is then ignored, so rerunning an interrupted SFT command continues it.
2. --load_model PATH: its weights, fresh optimizer, from mini-epoch --epoch_begin (default 0).
3. proj_dir/rwkv-init.pth from stage 1, from mini-epoch --epoch_begin.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import secrets
import shlex
import shutil
import signal
import sys
import sysconfig
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, Strategy
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Subset

from src import sampler
from src.binidx import BinIdxError, MMapIndexedDataset, mask_file, open_mask, strip_suffix
from src.dataset import PretrainDataset, SFTDataset
from src.model import RWKV, ModelConfig
from src.rnn import CheckpointError
from src.sampler import SAMPLES_PER_EPOCH
from src.tokenizer import copy_tokenizer, data_tokenizer_file, model_tokenizer_file, same_tokenizer
from src.trainer import (ProgressBar, RunPlan, Schedule, TrainingError, TrainingMonitor, TrainingStopped,
                         find_resume_checkpoint, load_resume_state, load_weights, save_atomic, state_path,
                         weights_fingerprint)
from src.wkv7.kernel import toolchain_problem

PRECISIONS = {"fp32": "32-true", "tf32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}
STRATEGIES = ("auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
              "deepspeed_stage_3", "deepspeed_stage_3_offload")


@rank_zero_only
def say(msg: str) -> None:
    """Print once per run (every DDP process runs this file; rank 0 speaks)."""
    print(msg, flush=True)


def str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes"):
        return True
    if v.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False or 1/0, got {v!r}")


def magic_prime_flag(v: str) -> int:
    """An int; make_data prints MAGIC_PRIME=NONE when the data has no valid prime, which SFT does not need."""
    return 0 if v.upper() == "NONE" else int(v)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # what to train, where
    a("--train_stage", type=int, default=3, choices=(1, 2, 3),
      help="1: write rwkv-init.pth and stop; 2/3: train (resume from the highest rwkv-N.pth in proj_dir)")
    a("--load_model", default="", help="start from this checkpoint (e.g. the pretrain's rwkv-final.pth for SFT)")
    a("--proj_dir", default="out", help="folder for checkpoints and train_log.txt")
    a("--wandb", default="", help="wandb project name ('' = off; WANDB_MODE=offline works without network)")
    a("--random_seed", type=int, default=-1, help="seed for init and SFT order (-1: init unseeded, SFT order 0)")
    # data
    a("--data_file", default="", help="binidx prefix (path without .bin/.idx) written by data/make_data.py")
    a("--data_type", default="binidx", choices=("binidx", "sft"),
      help="binidx: pretrain windows (magic-prime sampler); sft: conversations, loss on assistant tokens")
    a("--sft_whole_seq", type=int, default=0, choices=(0, 1), help="sft: 1 = loss on every token (no .mask)")
    a("--sft_mode", default="pack", choices=SFTDataset.MODES,
      help="sft: pack = a conversation and those after it fill ctx_len; pad = one conversation per sample")
    a("--vocab_size", type=int, default=6400, help="tokenizer vocabulary (MiniMind2: 6400)")
    a("--ctx_len", type=int, default=512, help="tokens per sample (a multiple of 16 for the GPU kernel)")
    a("--my_exit_tokens", type=int, default=0,
      help="tokens to train (must equal the data's token count; sft: one pass over every sample); "
           "0 = train --epoch_count mini-epochs")
    a("--magic_prime", type=magic_prime_flag, default=0,
      help="the sampler's prime printed by make_data (binidx; sft: unused, 0); NONE (make_data's word) = 0")
    # mini-epochs
    a("--epoch_steps", type=int, default=0,
      help="steps per mini-epoch; 0 = 40320 // real_bsz (the published mini-epoch of 40320 samples). "
           "Smaller values suit small data")
    a("--epoch_count", type=int, default=0,
      help="mini-epochs when --my_exit_tokens is 0; 0 = as many as the data holds")
    a("--epoch_begin", type=int, default=0, help="first mini-epoch when starting from --load_model/rwkv-init")
    a("--epoch_save", type=int, default=1, help="save rwkv-N.pth every this many mini-epochs (0: final only)")
    a("--micro_bsz", type=int, default=16, help="samples per device per step")
    # model
    a("--my_testing", default="x070", help="model version; only x070 exists here")
    a("--n_layer", type=int, default=8, help="blocks")
    a("--n_embd", type=int, default=512, help="model width C")
    a("--dim_att", type=int, default=0, help="0 = n_embd")
    a("--dim_ffn", type=int, default=0, help="0 = 4 * n_embd")
    a("--head_size", type=int, default=64, help="WKV head size N (heads = n_embd / head_size)")
    # LoRA widths: SPEC's formula fits every checkpoint this repo makes; others (e.g. RWKV-7 models of
    # n_embd 2048 with 96/96/64/256) need theirs to be fine-tuned (--load_model says which)
    for name, mats in (("decay", "w1/w2"), ("aaa", "a1/a2"), ("mv", "v1/v2"), ("gate", "g1/g2")):
        a(f"--d_{name}_lora", type=int, default=0, help=f"LoRA width of att.{mats}; 0 = SPEC's formula")
    a("--grad_cp", type=int, default=0, choices=(0, 1), help="1: gradient checkpointing (less memory, slower)")
    a("--wkv_impl", default="auto", choices=("auto", "cuda", "torch"), help="WKV7 implementation (src/wkv7)")
    a("--compile", type=int, default=0, choices=(0, 1),
      help="1: torch.compile the time/channel mixes (fused elementwise ops; the first step compiles, ~40 s for L8-D512 on 2 CPU cores)")
    # optimizer and schedule
    a("--lr_init", type=float, default=6e-4, help="learning rate after warmup (att.w0 gets 2x)")
    a("--lr_final", type=float, default=2e-5, help="learning rate at --my_exit_tokens (cosine in tokens)")
    a("--warmup_steps", type=int, default=10,
      help="steps of linear warmup from 1%% of the lr, counted from a fresh optimizer")
    a("--beta1", type=float, default=0.9, help="Adam beta1")
    a("--beta2", type=float, default=0.99, help="Adam beta2")
    a("--adam_eps", type=float, default=1e-18, help="Adam epsilon")
    a("--weight_decay", type=float, default=0.001, help="decoupled weight decay on 2-D weight matrices only")
    a("--grad_clip", type=float, default=1.0, help="gradient norm clip (0 = off)")
    # machine
    a("--accelerator", default="auto", choices=("auto", "cpu", "gpu", "cuda"), help="auto: gpu when present")
    a("--devices", type=int, default=1, help="GPUs (or CPU processes) per node")
    a("--num_nodes", type=int, default=1, help="machines (MASTER_ADDR/MASTER_PORT/NODE_RANK set on each)")
    a("--precision", default="bf16", choices=tuple(PRECISIONS),
      help="bf16 -> bf16-mixed, fp16 -> 16-mixed (GPU), fp32 -> 32-true, tf32 -> 32-true with TF32 matmuls")
    a("--strategy", default="auto", choices=STRATEGIES,
      help="deepspeed_* need GPUs; on CPU use auto (1 process) or ddp (gloo, --devices processes)")
    a("--ds_bucket_mb", type=float, default=200, help="DeepSpeed allgather/reduce bucket size in MB")
    a("--enable_progress_bar", type=str2bool, default=True,
      help="True/False: mini-epoch, its mean loss, lr and kilo-tokens/s per step")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Checks (no compute yet)
# ----------------------------------------------------------------------------------------------

def check_machine(args: argparse.Namespace) -> None:
    """Resolve --accelerator auto and reject settings this machine or strategy cannot run."""
    has_gpu = torch.cuda.is_available()
    if args.accelerator == "auto":
        args.accelerator = "gpu" if has_gpu else "cpu"
    args.accelerator = "gpu" if args.accelerator == "cuda" else args.accelerator
    if args.my_testing != "x070":
        raise TrainingError(f"--my_testing {args.my_testing!r}: only the x070 (RWKV-7) model is implemented")
    for flag in ("micro_bsz", "ctx_len", "devices", "num_nodes", "n_layer", "n_embd", "head_size", "vocab_size"):
        if getattr(args, flag) < 1:
            raise TrainingError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("epoch_steps", "epoch_count", "epoch_begin", "epoch_save", "warmup_steps", "my_exit_tokens",
                 "magic_prime"):
        if getattr(args, flag) < 0:
            raise TrainingError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if not (0 < args.lr_init < math.inf and 0 <= args.lr_final < math.inf):
        raise TrainingError(f"--lr_init must be > 0 and --lr_final >= 0, both finite "
                            f"(got {args.lr_init}, {args.lr_final})")
    if args.lr_final > args.lr_init:
        say(f"note: --lr_final {args.lr_final} is above --lr_init {args.lr_init}: the lr rises over the run")
    for flag in ("beta1", "beta2"):
        if not 0 <= getattr(args, flag) < 1:
            raise TrainingError(f"--{flag} must be in [0, 1), got {getattr(args, flag)} (published: 0.9 and 0.99)")
    for flag in ("adam_eps", "weight_decay", "grad_clip"):
        if not 0 <= getattr(args, flag) < math.inf:
            raise TrainingError(f"--{flag} must be finite and >= 0, got {getattr(args, flag)}"
                                + (" (0 turns clipping off)" if flag == "grad_clip" else ""))
    if args.train_stage == 1:
        return   # stage 1 only builds the model on the CPU: any machine and strategy will do
    if args.accelerator == "gpu" and not has_gpu:
        raise TrainingError("--accelerator gpu but torch sees no CUDA/ROCm device "
                            f"(torch {torch.__version__}); use --accelerator cpu --strategy auto --precision fp32")
    if args.accelerator == "cpu":
        if args.strategy.startswith("deepspeed"):
            raise TrainingError(f"--strategy {args.strategy} needs GPUs (DeepSpeed does not train on CPU); "
                                "on CPU use --strategy auto (one process) or ddp (--devices processes, gloo)")
        if args.precision == "fp16":
            raise TrainingError("--precision fp16 (16-mixed) needs a GPU; on CPU use bf16 or fp32")
        if args.wkv_impl == "cuda":
            raise TrainingError("--wkv_impl cuda needs a GPU; on CPU use --wkv_impl torch (or auto)")
    if args.accelerator == "gpu" and args.precision in ("bf16", "tf32") and not torch.version.hip:
        major, minor = torch.cuda.get_device_capability()
        if major < 8:   # bf16 and TF32 tensor cores came with Ampere (compute capability 8.0)
            card = f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"
            say(f"note: {card} has no bf16 or TF32 tensor cores, so --precision {args.precision} runs its matrix "
                "products several times slower than fp16 would. --precision fp16 (PRECISION=fp16 for the demo "
                "scripts) uses its fp16 tensor cores; fp16 can overflow, and a NaN/inf loss then stops training "
                "with the last checkpoint intact (continue from it in bf16 or fp32)")
    if args.accelerator == "gpu" and args.wkv_impl != "torch":   # the WKV7 GPU kernel will be used
        # Without nvcc/ninja, wkv7's "auto" would quietly train on the PyTorch path (~25x slower WKV7).
        problem = toolchain_problem()
        if problem is not None:
            raise TrainingError(f"the WKV7 GPU kernel cannot be built: {problem}. Install it, or train on the "
                                "PyTorch path with --wkv_impl torch (WKV7 ~25x slower; the demo scripts pass it on: "
                                "bash demo-training-run.sh --wkv_impl torch)")
        if args.ctx_len % 16:
            raise TrainingError(f"--ctx_len {args.ctx_len} is not a multiple of 16, which the WKV7 GPU kernel "
                                "needs (it keeps the state every 16 steps): use e.g. 512, or --wkv_impl torch (slow)")
    if args.compile:
        # torch.compile generates C++ (CPU) or Triton (GPU) code: say so now, not after the data is loaded.
        if args.accelerator == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
            raise TrainingError("--compile 1 on CPU needs a C++ compiler (c++/g++ on PATH): install one "
                                "(e.g. apt-get install g++) or use --compile 0")
        if args.accelerator == "gpu" and importlib.util.find_spec("triton") is None:
            raise TrainingError("--compile 1 on a GPU needs triton (it ships with the CUDA/ROCm torch wheels): "
                                "pip install triton, or use --compile 0")
        # Inductor's CPU kernels and Triton's GPU launcher are C code built against Python.h, which a
        # system Python (Debian/Ubuntu without python3-dev) lacks: the first step would fail in the compiler.
        headers = Path(sysconfig.get_path("include")) / "Python.h"
        if not headers.is_file():
            version = f"{sys.version_info.major}.{sys.version_info.minor}"
            raise TrainingError(f"--compile 1 needs the Python headers, and {headers} is missing: install them "
                                f"for Python {version} (e.g. apt-get install python{version}-dev) or use --compile 0")
    if args.ds_bucket_mb <= 0:
        raise TrainingError(f"--ds_bucket_mb must be > 0, got {args.ds_bucket_mb}")


def check_wandb(args: argparse.Namespace) -> None:
    """--wandb in online mode needs an API key; without one wandb.init would fail only once the model,
    the strategy and the data are set up."""
    if not args.wandb or os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return
    import wandb  # only when asked for
    if not wandb.login(prompt=False, verify=False):   # looks for a key (WANDB_API_KEY, ~/.netrc), no network
        raise TrainingError(f"--wandb {args.wandb}: wandb has no API key on this machine. Run `wandb login` (or set "
                            "WANDB_API_KEY), or log offline with WANDB_MODE=offline and upload later with `wandb sync`")


def check_data(args: argparse.Namespace) -> int:
    """Open the data, check --magic_prime/--my_exit_tokens against it; returns the samples it holds per pass."""
    if not args.data_file:
        raise TrainingError("--data_file is required for training: the binidx prefix written by data/make_data.py")
    try:
        data = MMapIndexedDataset(args.data_file)
        if args.data_type == "sft" and not args.sft_whole_seq:
            open_mask(data.prefix, data.num_tokens)
    except BinIdxError as e:
        raise TrainingError(str(e)) from e
    n, ctx = data.num_tokens, args.ctx_len
    right_p = sampler.magic_prime(n, ctx)
    right = f"--my_exit_tokens {n} --magic_prime {right_p}"
    script = f"the demo scripts' MY_EXIT_TOKENS={n} MAGIC_PRIME={right_p}"
    if args.my_exit_tokens not in (0, n):
        raise TrainingError(f"--my_exit_tokens {args.my_exit_tokens} does not match {args.data_file} ({n} tokens): "
                            f"use {right} for ctx_len {ctx} ({script}), or --my_exit_tokens 0 with --epoch_count")
    top = max_token(data)
    if top >= args.vocab_size:
        raise TrainingError(f"{args.data_file} holds token id {top} but --vocab_size is {args.vocab_size}: "
                            f"use --vocab_size {top + 1} or more (6400 for the MiniMind tokenizer), or remake "
                            "the data with the model's tokenizer")
    if args.data_type == "binidx":
        if mask_file(data.prefix).is_file():
            say(f"note: {args.data_file} is SFT data (it has a .mask): --data_type binidx pretrains on all of it; "
                "--data_type sft trains on the replies only (DATA_TYPE=sft for the demo scripts)")
        small = sampler.too_small_message(n, ctx)
        if small is not None:
            raise TrainingError(f"{args.data_file}: {small}")
        problem = sampler.magic_prime_problem(args.magic_prime, n, ctx)
        if problem is not None:
            raise TrainingError(f"--magic_prime {args.magic_prime} does not fit {args.data_file} ({n} tokens) at "
                                f"ctx_len {ctx}: {problem}; use {right} ({script}; what data/make_data.py prints)")
        if args.magic_prime != right_p:
            say(f"note: --magic_prime {args.magic_prime} is valid for {args.data_file}, though {right_p} "
                f"(the largest) would visit {right_p - args.magic_prime} more windows")
        return args.magic_prime
    if args.magic_prime not in (0, right_p):
        # SFT samples whole conversations and needs no prime; a wrong one still means wrong data or ctx_len.
        raise TrainingError(f"--magic_prime {args.magic_prime} does not match {args.data_file} ({n} tokens) at "
                            f"ctx_len {ctx}: --data_type sft does not use it; pass 0 or {right_p}")
    cut = int((np.asarray(data.sizes) > ctx + 1).sum())
    if cut:
        say(f"note: {cut} of {len(data)} conversations in {args.data_file} are longer than ctx_len + 1 = {ctx + 1} "
            "tokens: their ends are never trained (was the data made for a longer CTX_LEN?)")
    return SFTDataset(args.data_file, ctx, mode=args.sft_mode, whole_sequence=bool(args.sft_whole_seq)).n_samples


def max_token(data: MMapIndexedDataset, chunk: int = 1 << 26) -> int:
    """The largest token id in the data (a pass over the memory-mapped .bin, 64M tokens at a time)."""
    tokens = data.tokens
    return max((int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk)), default=0)


def plan_epochs(args: argparse.Namespace, samples_per_pass: int) -> tuple[int, int]:
    """Fill args.real_bsz, args.epoch_steps, args.epoch_count; returns (total_steps, exit_tokens)."""
    args.real_bsz = args.num_nodes * args.devices * args.micro_bsz
    if args.my_exit_tokens and args.epoch_count:
        raise TrainingError(f"--epoch_count {args.epoch_count} with --my_exit_tokens {args.my_exit_tokens}: the run "
                            "stops at my_exit_tokens, so epoch_count would do nothing; give one of them (the other 0)")
    if args.epoch_steps == 0:
        if SAMPLES_PER_EPOCH % args.real_bsz:
            raise TrainingError(
                f"real_bsz = num_nodes {args.num_nodes} x devices {args.devices} x micro_bsz {args.micro_bsz} = "
                f"{args.real_bsz} does not divide the {SAMPLES_PER_EPOCH} samples of a mini-epoch: choose "
                "sizes whose product divides 40320 (e.g. micro_bsz 1, 2, 4, 8, 16, 32, 64) or set --epoch_steps "
                "(EPOCH_STEPS=... for the demo scripts)")
        args.epoch_steps = SAMPLES_PER_EPOCH // args.real_bsz
    samples_per_epoch = args.epoch_steps * args.real_bsz
    available = samples_per_pass // samples_per_epoch
    if available == 0:
        raise TrainingError(f"{args.data_file} holds {samples_per_pass} samples of ctx_len {args.ctx_len}, fewer than "
                            f"one mini-epoch ({args.epoch_steps} steps x real_bsz {args.real_bsz}): set --epoch_steps "
                            f"to at most {max(samples_per_pass // args.real_bsz, 1)} "
                            "(EPOCH_STEPS=... for the demo scripts), or make more data")
    if args.epoch_count == 0:
        args.epoch_count = available
    tokens_per_step = args.real_bsz * args.ctx_len
    if args.my_exit_tokens and args.data_type == "sft":
        # SFT samples are whole conversations, padded or packed (the one cut off is repeated), so the
        # data's token count (what make_data prints, and check_data accepted) undercounts them: it
        # stands for one pass over every sample.
        total_steps = math.ceil(samples_per_pass / args.real_bsz)
        say(f"SFT: --my_exit_tokens {args.my_exit_tokens} (the data's tokens) = one pass over its "
            f"{samples_per_pass} samples: {total_steps} steps of {args.real_bsz}")
        return total_steps, total_steps * tokens_per_step
    if args.my_exit_tokens:
        total_steps = math.ceil(args.my_exit_tokens / tokens_per_step)
        return total_steps, args.my_exit_tokens
    if args.epoch_count > available:
        raise TrainingError(f"--epoch_count {args.epoch_count} needs {args.epoch_count * samples_per_epoch} samples "
                            f"but {args.data_file} holds {samples_per_pass}: at most {available} mini-epochs")
    total_steps = args.epoch_count * args.epoch_steps
    return total_steps, total_steps * tokens_per_step


def find_start(args: argparse.Namespace) -> tuple[Path, int, bool]:
    """(weights to load, first mini-epoch, whether they are this proj_dir's own rwkv-N.pth)."""
    proj = Path(args.proj_dir)
    ckpt, n = find_resume_checkpoint(proj)
    if n >= 0:
        assert ckpt is not None
        if args.load_model:
            say(f"note: {proj} already holds {ckpt.name}; continuing it and ignoring --load_model {args.load_model}")
        if args.epoch_begin not in (0, n + 1):
            say(f"note: --epoch_begin {args.epoch_begin} ignored: resuming {ckpt.name} continues at mini-epoch {n + 1}")
        return ckpt, n + 1, True
    if args.load_model:
        if not Path(args.load_model).is_file():
            raise TrainingError(f"--load_model {args.load_model}: no such file (for SFT: the pretraining writes "
                                "rwkv-final.pth when it reaches --my_exit_tokens)")
        return Path(args.load_model), args.epoch_begin, False
    if ckpt is not None:
        return ckpt, args.epoch_begin, False
    raise TrainingError(f"{proj} holds no rwkv-init.pth or rwkv-N.pth to start from: run stage 1 first "
                        "(demo-training-prepare.sh, --train_stage 1 with the same --proj_dir) or pass --load_model")


# ----------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------

def tokenizer_to_carry(args: argparse.Namespace, start: Path) -> Path | None:
    """The tokenizer to put beside this run's checkpoints, where the chat and eval find it: the one make_data
    used (DATA_FILE.tokenizer.json), else the start checkpoint's (data made elsewhere or before make_data
    wrote one). A start checkpoint or proj_dir holding another tokenizer than the data's learnt other token
    ids: stop. Nothing is written here (the start may still be refused)."""
    used = data_tokenizer_file(strip_suffix(args.data_file))
    theirs = model_tokenizer_file(start)
    if not used.is_file():
        return theirs if theirs.is_file() else None
    for other in dict.fromkeys((theirs, Path(args.proj_dir) / "tokenizer.json")):
        try:
            differs = other.is_file() and not same_tokenizer(used, other)
        except ValueError as e:   # not JSON (UnicodeDecodeError is one too): cut short, or a Git LFS pointer
            raise TrainingError(f"{other} or {used} is not a tokenizer.json ({e}): remake or remove it") from e
        if differs:
            raise TrainingError(f"{other} is not the tokenizer {args.data_file} was made with ({used}): the "
                                f"model there learnt other token ids. Remake the data with that tokenizer "
                                f"(data/make_data.py ... --tokenizer {other}), or delete {other} if the two "
                                "tokenize alike")
    return used


def check_writable(proj: Path) -> None:
    """Fail now, not at the first save after a mini-epoch of compute, when proj_dir cannot take files."""
    try:
        proj.mkdir(parents=True, exist_ok=True)
        probe = proj / f".write-test.{secrets.token_hex(8)}"   # not the pid: ranks on several nodes may share one
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)
    except OSError as e:
        raise TrainingError(f"--proj_dir {proj} cannot take files ({e.strerror or e}): give a writable folder") from e


def build_model(args: argparse.Namespace) -> RWKV:
    try:
        return RWKV(ModelConfig.from_namespace(args))
    except ValueError as e:
        raise TrainingError(str(e)) from e


def write_init(args: argparse.Namespace) -> int:
    """Stage 1: rwkv-init.pth (bf16 when --precision bf16), no data needed."""
    if args.random_seed >= 0:
        pl.seed_everything(args.random_seed)
    proj = Path(args.proj_dir)
    ckpt, n = find_resume_checkpoint(proj)
    if n >= 0 or (proj / "rwkv-final.pth").is_file():
        # A rerun of the prepare script (the quickstart again, a resubmitted job): the run's own init stays.
        held = ckpt.name if n >= 0 and ckpt is not None else "rwkv-final.pth"
        say(f"stage 1: {proj} holds a run ({held}), which stage 2/3 continue: its rwkv-init.pth is left as it is "
            "(use another --proj_dir to start over)")
        return 0
    check_writable(proj)
    model = build_model(args)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    path = proj / "rwkv-init.pth"
    save_atomic({k: v.to(dtype) for k, v in model.state_dict().items()}, path)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"stage 1: wrote {path} ({n_params:,} parameters, {str(dtype).replace('torch.', '')})")
    return 0


def _deepspeed_bf16_fields() -> set[str]:
    """The keys DeepSpeed's "bf16" config section accepts (it refuses unknown ones; older versions
    lack check_grad_overflow)."""
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    except ImportError:   # DeepSpeed before ~0.17 has no such module (nor the key)
        return set()
    return set(DeepSpeedBF16Config.model_fields)


def build_strategy(args: argparse.Namespace) -> Strategy | str:
    several = args.devices * args.num_nodes > 1
    if args.strategy.startswith("deepspeed"):
        stage = int(args.strategy.split("_")[2])
        offload = args.strategy.endswith("_offload")
        bucket = int(args.ds_bucket_mb * 1_000_000)
        # overlap_comm: reduce buckets while backward runs; with one GPU there is nothing to overlap,
        # and DeepSpeed then synchronizes the device at the end of every backward.
        strategy = DeepSpeedStrategy(stage=stage, offload_optimizer=offload, offload_parameters=offload and stage == 3,
                                     allgather_bucket_size=bucket, reduce_bucket_size=bucket, overlap_comm=several,
                                     logging_batch_size_per_gpu=args.micro_bsz)
        # Per-step host waits DeepSpeed adds by default: its throughput timer synchronizes the device
        # three times a step (for numbers it never prints here), and the bf16 overflow check reads a flag
        # back every step after ~7 kernels per gradient tensor. TrainingMonitor catches bad numbers
        # instead: a NaN/inf loss stops training, and weights with NaN/inf are never saved.
        strategy.config["timers"] = {"throughput": {"enabled": False}}
        if args.precision == "bf16" and "check_grad_overflow" in _deepspeed_bf16_fields():
            strategy.config["bf16"] = {"enabled": True, "check_grad_overflow": False}
        return strategy
    if args.strategy == "ddp" or several:
        # Layer 0 never uses its v0/v1/v2 (kept for the checkpoint format); a static graph lets DDP
        # skip their gradients without searching for unused parameters every step.
        return DDPStrategy(static_graph=True)
    return "auto"


class TrainData(pl.LightningDataModule):
    """Builds the rank's dataset once the Trainer knows rank and world size (after the processes start)."""

    def __init__(self, args: argparse.Namespace, epoch_begin: int, n_epochs: int, n_steps: int):
        super().__init__()
        self.args, self.epoch_begin, self.n_epochs, self.n_steps = args, epoch_begin, n_epochs, n_steps

    def train_dataloader(self) -> DataLoader:
        a = self.args
        layout = dict(rank=self.trainer.global_rank, world_size=self.trainer.world_size,
                      epoch_begin=self.epoch_begin, n_epochs=self.n_epochs, micro_bsz=a.micro_bsz,
                      samples_per_epoch=a.epoch_steps * a.real_bsz)
        if a.data_type == "binidx":
            ds = PretrainDataset(a.data_file, a.ctx_len, a.magic_prime, **layout)
        else:
            ds = SFTDataset(a.data_file, a.ctx_len, mode=a.sft_mode, whole_sequence=bool(a.sft_whole_seq),
                            seed=max(a.random_seed, 0), **layout)
        gpu = a.accelerator == "gpu"
        # Samples are read in order: all randomness is in the dataset's index math (resume, ranks).
        # The datasets hold whole mini-epochs; the run may end inside the last one (--my_exit_tokens):
        # exactly the run's samples, so that the progress bar's total is its steps.
        ds = Subset(ds, range(self.n_steps * a.micro_bsz))
        return DataLoader(ds, batch_size=a.micro_bsz, shuffle=False, drop_last=True, pin_memory=gpu,
                          num_workers=1 if gpu else 0, persistent_workers=gpu,
                          worker_init_fn=_ignore_sigterm)


def _ignore_sigterm(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM. A scheduler's cancel, `timeout` and `kill -- -PGID` signal the whole
    process group: torch's worker handler would end the worker, and the rank's SIGCHLD handler would then
    raise "DataLoader worker ... is killed by signal: Terminated" at an arbitrary point of a step (exit 1,
    other ranks left in a collective) instead of TrainingMonitor's stop at the same step on every rank.
    The worker still ends with its rank (it watches its parent)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _stop_aware_child_observer() -> type | None:
    """Lightning's launcher (--devices N without torchrun or SLURM: rank 0 starts ranks 1..N-1) runs a
    thread in rank 0 that polls the child ranks every 5 s and SIGKILLs rank 0 and all of them as soon as
    one has exited with a nonzero status, so that a crashed rank cannot leave the others hanging in a
    collective. A SIGTERM stop (TrainingStopped) ends every rank at the same step with 128 + 15, after its
    last collective: a child rank that is out before rank 0 (rank 0 writes the log, prints, tears down)
    got rank 0 killed whenever the poll fell in between, exit -9 instead of 143. This observer counts
    that status as a finished child, like 0; any other nonzero status ends the run as Lightning's does.
    None where Lightning has no such observer (private names: a Lightning version may rename them)."""
    from lightning_fabric.strategies.launchers import subprocess_script as fabric_launcher
    observer = getattr(fabric_launcher, "_ChildProcessObserver", None)
    if observer is None or not callable(getattr(observer, "_run", None)):
        return None
    stopped = 128 + signal.SIGTERM

    class StopAwareObserver(observer):
        def _run(self) -> bool:
            codes = [proc.poll() for proc in self._child_processes]
            if all(code in (0, stopped) for code in codes):
                return True                      # every child is done: nothing left to watch
            if any(code not in (None, 0, stopped) for code in codes):
                return super()._run()            # a crash: Lightning's message, and it ends every rank
            return False

    return StopAwareObserver


def _watch_child_ranks_but_not_their_stop() -> None:
    """Make Lightning's DDP/DeepSpeed launcher start `_stop_aware_child_observer` instead of its own."""
    from pytorch_lightning.strategies.launchers import subprocess_script as launcher
    current = getattr(launcher, "_launch_process_observer", None)
    if current is None or getattr(current, "stop_aware", False):
        return
    observer = _stop_aware_child_observer()
    if observer is None:
        return

    def launch_observer(child_processes: list) -> None:
        observer(child_processes=child_processes, main_pid=os.getpid()).start()

    launch_observer.stop_aware = True
    launcher._launch_process_observer = launch_observer


def build_trainer(args: argparse.Namespace, max_steps: int, callbacks: Sequence[pl.Callback]) -> pl.Trainer:
    _watch_child_ranks_but_not_their_stop()
    if args.precision == "tf32" and args.accelerator == "gpu":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Under SLURM, Lightning's auto-requeue would on SIGUSR1 write its own hpc_ckpt_N.ckpt into proj_dir
    # and, in the requeued job, load it over this repo's resume (rwkv-N.pth and its state): two resumes
    # that disagree. Off: a job started again with the same command continues from the newest rwkv-N.pth.
    # Only where Lightning would pick SLURM itself: torchrun inside a SLURM job (TorchElastic) comes first there.
    slurm = SLURMEnvironment.detect() and not TorchElasticEnvironment.detect()
    plugins = [SLURMEnvironment(auto_requeue=False)] if slurm else []
    return pl.Trainer(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                      precision=PRECISIONS[args.precision], strategy=build_strategy(args),
                      max_epochs=1, max_steps=max_steps, use_distributed_sampler=False,
                      gradient_clip_val=args.grad_clip if args.grad_clip > 0 else None,
                      logger=False, enable_checkpointing=False, num_sanity_val_steps=0, enable_model_summary=False,
                      enable_progress_bar=args.enable_progress_bar, default_root_dir=args.proj_dir,
                      callbacks=list(callbacks), plugins=plugins)


def run_header(args: argparse.Namespace, argv: Sequence[str], start: Path, how: str) -> list[str]:
    return [f"run {datetime.now(timezone.utc).isoformat(timespec='seconds')} stage {args.train_stage}: "
            f"from {start} ({how}) at mini-epoch {args.epoch_begin}, world size {args.num_nodes * args.devices}",
            "argv: " + " ".join(shlex.quote(a) for a in argv),
            *(f"  {k} = {v}" for k, v in sorted(vars(args).items()))]


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None, callbacks: Sequence[pl.Callback] = ()) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    check_machine(args)
    if args.train_stage == 1:
        return write_init(args)

    check_wandb(args)
    samples_per_pass = check_data(args)
    total_steps, exit_tokens = plan_epochs(args, samples_per_pass)
    final = Path(args.proj_dir) / "rwkv-final.pth"
    if final.is_file():
        say(f"nothing to train: {final} exists, this run has finished (delete it or use another --proj_dir "
            "to train again)")
        return 0
    if args.warmup_steps >= total_steps:
        say(f"note: --warmup_steps {args.warmup_steps} is not below this run's {total_steps} steps: the lr never "
            "leaves warmup (it rises from 1% of --lr_init); use fewer")
    start, args.epoch_begin, own = find_start(args)
    check_writable(Path(args.proj_dir))
    tokenizer = tokenizer_to_carry(args, start)
    start_step = args.epoch_begin * args.epoch_steps
    if start_step >= total_steps and not own:
        raise TrainingError(f"--epoch_begin {args.epoch_begin} starts at step {start_step}, past this run's "
                            f"{total_steps} steps: use at most {math.ceil(total_steps / args.epoch_steps) - 1}")
    plan = RunPlan(proj_dir=Path(args.proj_dir), ctx_len=args.ctx_len, real_bsz=args.real_bsz,
                   world_size=args.num_nodes * args.devices, epoch_steps=args.epoch_steps, start_step=start_step,
                   total_steps=total_steps, epoch_save=args.epoch_save,
                   deepspeed=args.strategy.startswith("deepspeed"),
                   data=(str(Path(strip_suffix(args.data_file)).resolve()), args.data_type))
    model = build_model(args)
    try:
        load_weights(model, start)
    except TrainingError as e:
        if not own or not isinstance(e.__cause__, CheckpointError):   # a new start, or flags of another shape
            raise
        raise TrainingError(f"{e}\nIt is {plan.proj_dir}'s newest checkpoint: if it is damaged (a copy or a disk "
                            f"cut it short), move it and {state_path(start).name} out of {plan.proj_dir} to continue "
                            "from the one before") from e
    resume, why = (load_resume_state(start, plan, weights_fingerprint(model.state_dict())) if own
                   else (None, "a new start: fresh optimizer, warmup"))
    if tokenizer is not None and rank_zero_only.rank == 0 and not (plan.proj_dir / "tokenizer.json").is_file():
        copy_tokenizer(tokenizer, plan.proj_dir / "tokenizer.json")
    if start_step >= total_steps:   # killed after its last mini-epoch's save, before rwkv-final.pth
        if rank_zero_only.rank == 0:
            save_atomic(model.state_dict(), final)
        say(f"nothing to train: {start} is at step {start_step} of {total_steps}; {final} holds the result")
        return 0
    how = f"exact resume with {why}" if resume else f"weights only: {why}"
    say(f"stage {args.train_stage}: starting from {start} at mini-epoch {args.epoch_begin} "
        f"(step {start_step} of {total_steps}), {how}")
    say(f"training {sum(p.numel() for p in model.parameters()):,} parameters on {args.accelerator} x "
        f"{args.num_nodes * args.devices} ({args.precision}, strategy {args.strategy}), {plan.tokens_per_step:,} "
        f"tokens a step, mini-epochs of {args.epoch_steps} steps")

    schedule = Schedule(lr_init=args.lr_init, lr_final=args.lr_final, warmup_steps=args.warmup_steps,
                        tokens_per_step=plan.tokens_per_step, exit_tokens=exit_tokens)
    monitor = TrainingMonitor(plan, schedule, run_header(args, argv, start, how), resume=resume,
                              wandb_project=args.wandb, wandb_config=vars(args))
    n_epochs = math.ceil((total_steps - start_step) / args.epoch_steps)
    bar = [ProgressBar(monitor)] if args.enable_progress_bar else []
    trainer = build_trainer(args, total_steps - start_step, [monitor, *bar, *callbacks])
    trainer.fit(model, datamodule=TrainData(args, args.epoch_begin, n_epochs, total_steps - start_step))
    say(f"stage {args.train_stage} done: {final}")
    return 0


def _close_gloo_process_group() -> None:
    """Destroy a gloo process group (CPU ranks) before the interpreter exits. Left to exit, gloo's
    worker threads can still hold tensors while Python shuts down, and the process then aborts
    ("terminate called without an active exception", SIGABRT) instead of exiting with its status:
    seen once in CI after both ranks stopped with the same error. Lightning registers this clean-up
    for NCCL only. Called only where every rank ends together (finished, stopped, or the same error
    after a collective): a rank must not tear down while the others may still be inside a collective."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_backend() == "gloo":
        torch.distributed.destroy_process_group()


def cli(argv: Sequence[str] | None = None, callbacks: Sequence[pl.Callback] = ()) -> int:
    """main() as a command, returning its exit status: a problem the user must fix is one line and 2,
    a SIGTERM that stopped training (on every rank) 128 + 15, as the signal itself would give."""
    try:
        status = main(argv, callbacks)
    except TrainingStopped as e:   # not an error to fix, but the run has not finished
        print(e, file=sys.stderr)
        status = 128 + e.signum
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 2
    _close_gloo_process_group()
    return status


if __name__ == "__main__":
    # Lightning's hint to add DataLoader workers does not apply: samples are memory-mapped slices.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # RWKV overrides configure_gradient_clipping (to clip for fused torch optimizers); under DeepSpeed it
    # hands over to Lightning's own clipping, a no-op there, as DeepSpeed clips from --grad_clip itself.
    warnings.filterwarnings("ignore", "Since DeepSpeed handles gradient clipping internally.*")
    # A deprecation inside Lightning's own code (torch >= 2.10 renamed LeafSpec); nothing to do here.
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    # Lightning's info lines (devices found, a logging-service tip, "max_steps reached") repeat what the
    # lines above say; its warnings still show.
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    sys.exit(cli())
