"""What the Lightning fit loop needs beyond the model and the data: LR schedule, progress, logs, checkpoints.

train.py builds one `TrainingMonitor` (a Lightning Callback) per run and hands it everything
explicitly; all run state (step counters, loss sums, timers) lives in the callback, nothing is
pushed onto the Trainer or the model.

Steps and tokens. One optimizer step consumes real_bsz = num_nodes * devices * micro_bsz samples of
ctx_len tokens. `step` counts optimizer steps since the start of training (across resumes); a
mini-epoch is `epoch_steps` steps, so mini-epoch e ends when step == (e + 1) * epoch_steps.
Training ends at `total_steps`, the first step whose tokens reach my_exit_tokens.

LR (SPEC section 4), evaluated before each step from the tokens seen before it:
    progress = clip((tokens - warmup_tokens) / (exit_tokens - warmup_tokens), 0, 1)
    lr = lr_init * ((1 + f) / 2 + (1 - f) / 2 * cos(pi * progress)),   f = lr_final / lr_init
    times 0.01 + 0.99 * warm_step / warmup_steps while warm_step < warmup_steps
and each optimizer group gets lr * group["my_lr_scale"]. warm_step counts the steps taken by the
current Adam moments: an exact resume carries it on, a weights-only start (rwkv-init, --load_model,
or a checkpoint without its optimizer state) warms up again because its moments start from zero.

Files written into proj_dir (rank 0 writes; every file via a temporary name and os.replace):
- rwkv-N.pth       plain state_dict (SPEC keys) after mini-epoch N, every epoch_save mini-epochs,
                   in the dtype the parameters have while training (fp32, or bf16 under DeepSpeed bf16);
- rwkv-N.state.pth what an exact resume needs: step, warm_step, the plan it belongs to, and the
                   optimizer state (torch optimizers); under DeepSpeed the optimizer state, fp32
                   master weights included, lives in the folder rwkv-N.ds/ written by the engine
                   (every rank writes its shard) and the state file names it. It is written before
                   rwkv-N.pth, so a rwkv-N.pth on disk always has its state beside it;
- rwkv-final.pth   weights once tokens reach my_exit_tokens;
- train_log.txt    a header per run ("#" lines: date, resume source, every argument), then one line
                   per mini-epoch: `epoch E loss L ppl P lr LR time ISO elapsed S steps N tokens T ...`;
- train_log.svg    the loss curve of train_log.txt, redrawn after each mini-epoch (`plot_train_log`);
- tokenizer.json   (train.py, before training) the tokenizer the data was made with, for the chat.
A save killed before its rename leaves a `.rwkv-*.pth.<hex>.tmp` file, never read; the next run's
start deletes those (`remove_stale_temporaries`).

Bad numbers: the loss (averaged over ranks) is checked at every step; NaN/inf stops training with a
TrainingError naming the step (no file is written after it), and before every save the weights are
checked too. A step's loss is read one step later (on a GPU through a pinned host copy and an
event; the rank mean by a plain all_reduce, as Lightning's reduce adds a barrier that blocks the CPU),
so that reading it never stops the CPU from queueing the next step; before any checkpoint or log line
the newest loss is read at once. Every device takes the same path, and so does the progress bar
(`ProgressBar`), which shows the monitor's numbers without LightningModule.log. A loss above
SPIKE_RATIO times its running mean is a spike: a warning with the step, counted in the mini-epoch's
log line.

SIGTERM (to any or all ranks) is noted by a handler that replaces Lightning's and travels with the next
step's loss mean, so every rank stops at the same step (after that step's mini-epoch save, if any) with
TrainingStopped; train.py exits with 143. Nothing is saved for the unfinished mini-epoch.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.strategies import DeepSpeedStrategy
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from tqdm import tqdm

from src.rnn import CheckpointError, config_from_state_dict, load_error, read_state_dict

STATE_FORMAT = 1
SPIKE_RATIO = 2.0                # loss > SPIKE_RATIO * running mean -> a spike warning
SPIKE_MIN_STEPS = 100            # the running mean needs this many steps of this run first
SPIKE_EMA = 0.01                 # weight of the newest loss in the running mean (~100 steps)


class TrainingError(RuntimeError):
    """A problem the user must fix (flags, files, diverged training); train.py prints it without a traceback."""


class TrainingStopped(TrainingError):
    """SIGTERM (a scheduler's cancel or preemption, `kill`, `timeout`) ended training early on every
    rank at the same step; train.py exits with 128 + the signal number, as a process killed by it would."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# ----------------------------------------------------------------------------------------------
# Schedule and plan
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """SPEC's learning rate: warmup multiplier, cosine in tokens from lr_init to lr_final."""
    lr_init: float
    lr_final: float
    warmup_steps: int
    tokens_per_step: int
    exit_tokens: int

    def lr(self, step: int, warm_step: int) -> float:
        """Learning rate of the step taken after `step` steps, `warm_step` of them with these Adam moments."""
        tokens = step * self.tokens_per_step
        warmup_tokens = self.warmup_steps * self.tokens_per_step
        span = self.exit_tokens - warmup_tokens
        # A run shorter than its warmup has no cosine part left: it sits at lr_final.
        progress = 1.0 if span <= 0 else min(1.0, max(0.0, (tokens - warmup_tokens) / span))
        f = self.lr_final / self.lr_init
        lr = self.lr_init * ((1 + f) / 2 + (1 - f) / 2 * math.cos(math.pi * progress))
        if warm_step < self.warmup_steps:
            lr *= 0.01 + 0.99 * warm_step / self.warmup_steps
        return lr


@dataclass(frozen=True)
class RunPlan:
    """Fixed facts of one run; `start_step` is where it begins, `total_steps` where training ends."""
    proj_dir: Path
    ctx_len: int
    real_bsz: int
    world_size: int
    epoch_steps: int
    start_step: int
    total_steps: int
    epoch_save: int
    deepspeed: bool = False   # DeepSpeed keeps its own optimizer state (sharded), torch's does not
    data: tuple[str, str] = ("", "")   # (absolute data prefix, data_type): kept in the state, checked on resume

    @property
    def tokens_per_step(self) -> int:
        return self.real_bsz * self.ctx_len

    def resume_key(self) -> dict[str, int]:
        """What must be equal for an exact resume (same samples per step and per mini-epoch)."""
        return {"ctx_len": self.ctx_len, "real_bsz": self.real_bsz, "epoch_steps": self.epoch_steps}
    # (Without DeepSpeed the world size may change: step s trains the same global samples either way.)


# ----------------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------------

_NUMBERED = re.compile(r"rwkv-(\d+)\.pth")


def find_resume_checkpoint(proj_dir: Path) -> tuple[Path | None, int]:
    """Highest rwkv-N.pth in proj_dir -> (path, N); rwkv-init.pth counts as -1; (None, -1) if neither.

    rwkv-final.pth is ignored (training already ended there) and so are temporary files.
    """
    best: tuple[Path | None, int] = (None, -1)
    if not proj_dir.is_dir():
        return best
    for p in proj_dir.iterdir():
        m = _NUMBERED.fullmatch(p.name)
        if m and int(m.group(1)) > best[1]:
            best = (p, int(m.group(1)))
    if best[0] is None and (proj_dir / "rwkv-init.pth").is_file():
        best = (proj_dir / "rwkv-init.pth", -1)
    return best


def state_path(weights: Path) -> Path:
    """rwkv-N.pth -> rwkv-N.state.pth (the exact-resume state beside it)."""
    return weights.with_name(weights.stem + ".state.pth")


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary name in the same folder, then os.replace: never a half-written file.
    The temporary name is unique (not the process id, which the first process of every node of a
    containerised multi-node job may share), so concurrent writers of one file never mix their bytes.
    Created with mode 0o666 less the umask, as open() would: not tempfile.mkstemp, whose 0o600 would
    make every checkpoint readable by its owner only."""
    def failed(e: BaseException) -> TrainingError:
        cause = _os_cause(e)
        return TrainingError(f"cannot write {path}: {cause or load_error(e)}; nothing was written under that name "
                             "and the files before it are intact"
                             + (": make room or fix the folder, then rerun the command" if cause else ""))

    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            f = open(tmp, "xb")   # "x": a new file (O_EXCL)
            break
        except FileExistsError:   # another writer's: never ours to remove
            continue
        except OSError as e:
            raise failed(e) from e
    try:
        with f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:   # torch.save reports a full disk as a RuntimeError of its zip writer
        raise failed(e) from e
    finally:
        tmp.unlink(missing_ok=True)


def _os_cause(e: BaseException) -> str | None:
    """The operating system's reason (e.g. "No space left on device") from e or the errors it was raised from."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return None


_SAVE_TEMPORARY = re.compile(r"\.rwkv-[\w.-]+\.pth\.[0-9a-f]{16}\.tmp")


def remove_stale_temporaries(proj_dir: Path, min_age_s: float = 60.0) -> list[Path]:
    """Delete the temporary files that saves killed before their rename left in proj_dir (save_atomic's
    names only): each is as large as the checkpoint it was becoming, and nothing ever reads one. A file
    written to in the last min_age_s may be a save in progress (another run in the same folder) and stays."""
    if not proj_dir.is_dir():
        return []
    now = time.time()
    removed = []
    for p in proj_dir.iterdir():
        if _SAVE_TEMPORARY.fullmatch(p.name) and p.is_file() and now - p.stat().st_mtime >= min_age_s:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


SHAPE_FIELDS = ("n_layer", "n_embd", "head_size", "vocab_size", "dim_ffn", "d_decay_lora", "d_aaa_lora", "d_mv_lora",
                "d_gate_lora")


def fitting_flags(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> str:
    """What model the checkpoint `sd` holds and the train.py flags that build one of its shape, where they
    differ from `model`'s (LoRA widths included: checkpoints made elsewhere need not follow SPEC's formula)."""
    try:
        theirs = config_from_state_dict(sd)
    except CheckpointError:   # not a whole x070 checkpoint: the list of keys says enough
        return ""
    ours = model.cfg

    def formula(cfg: Any) -> Any:   # dim_ffn and the LoRA widths that flags of 0 give at cfg's size
        return dataclasses.replace(cfg, dim_ffn=0, d_decay_lora=0, d_aaa_lora=0, d_mv_lora=0, d_gate_lora=0)

    def needed(f: str) -> bool:
        if f in ("n_layer", "n_embd", "head_size", "vocab_size"):
            return getattr(theirs, f) != getattr(ours, f)
        # a derived size: a flag when the checkpoint's is not the formula's, or one given for this run is wrong
        return getattr(theirs, f) != getattr(formula(theirs), f) or (
            getattr(ours, f) != getattr(formula(ours), f) and getattr(ours, f) != getattr(theirs, f))

    flags = [f"--{f} {getattr(theirs, f)}" for f in SHAPE_FIELDS if needed(f)]
    return (f"\nThe checkpoint is L{theirs.n_layer}-D{theirs.n_embd} (head_size {theirs.head_size}, vocab "
            f"{theirs.vocab_size})" + (f"; to build its shape add: {' '.join(flags)}" if flags else ""))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a plain state_dict checkpoint into `model`, or raise TrainingError saying which tensor differs."""
    try:
        sd, _ = read_state_dict(path)
    except CheckpointError as e:
        raise TrainingError(str(e)) from e
    own = model.state_dict()
    problems = [f"{k}: not in the checkpoint" for k in own if k not in sd]
    problems += [f"{k}: in the checkpoint but not in this model" for k in sd if k not in own]
    problems += [f"{k}: checkpoint {list(sd[k].shape)} vs model {list(v.shape)}"
                 for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise TrainingError(f"checkpoint {path} does not fit the model built from the flags "
                            f"(--n_layer/--n_embd/--head_size/--vocab_size/--dim_ffn):\n  {shown}"
                            + fitting_flags(sd, model))
    model.load_state_dict(sd, strict=True)


def check_resume_position(weights: Path, state: dict[str, Any], plan: RunPlan) -> None:
    """Raise TrainingError unless resuming `weights` continues its run: at the sample where it stopped (a
    changed --epoch_steps or batch size moves the mini-epoch boundaries, so the run would skip or repeat
    data) and on data of the same type (an SFT command pointed at a pretraining proj_dir would continue the
    pretraining's optimizer and schedule). Another data file of the same type gets a note."""
    old = state["plan"]
    saved, here = state["step"] * old["real_bsz"], plan.start_step * plan.real_bsz
    mini_epochs = plan.start_step // plan.epoch_steps      # what rwkv-N.pth holds: N + 1 mini-epochs
    # (a state whose step is not the end of as many of its own mini-epochs belongs to other weights: the
    # plain "weights only" of load_resume_state says so)
    if state["step"] == mini_epochs * old["epoch_steps"] and saved != here:
        keep = old["epoch_steps"] * old["real_bsz"]
        how = (f"--epoch_steps {keep // plan.real_bsz}" if keep % plan.real_bsz == 0 else
               f"--epoch_steps {old['epoch_steps']} and a real_bsz of {old['real_bsz']}")
        raise TrainingError(f"{weights} was saved after {saved} samples ({state['step']} steps of {old['real_bsz']}), "
                            f"but these flags make mini-epochs of {plan.epoch_steps} steps of {plan.real_bsz}, so the "
                            f"run would continue at sample {here} and skip or repeat data. Keep its mini-epochs of "
                            f"{keep} samples ({how}), or start another --proj_dir with --load_model {weights}")
    data_file, data_type = state.get("data") or ("", "")   # states written before the data was recorded: ""
    if data_type and plan.data[1] and data_type != plan.data[1]:
        raise TrainingError(f"{weights.parent} holds a run on {data_type} data ({data_file}); this command trains on "
                            f"{plan.data[1]} data ({plan.data[0]}). Continue that run with its own data, or give "
                            f"this one another --proj_dir (--load_model {weights} starts it from these weights)")
    if data_file and plan.data[0] and data_file != plan.data[0]:
        rank_zero_warn(f"{weights.name} was trained on {data_file}; its run continues on {plan.data[0]}")


def weights_fingerprint(sd: Mapping[str, Tensor]) -> tuple[float, float]:
    """(sum, sum of squares) of emb.weight in float64: tells the weights a state file was saved with from
    others (a rwkv-N.pth copied in from another run) without storing them twice."""
    emb = sd["emb.weight"].detach().double()
    return float(emb.sum()), float(emb.square().sum())


def load_resume_state(weights: Path, plan: RunPlan,
                      fingerprint: tuple[float, float] | None = None) -> tuple[dict[str, Any] | None, str]:
    """The exact-resume state saved beside `weights`, or (None, why it cannot be used). `fingerprint`:
    weights_fingerprint of the weights loaded from `weights`, checked against the state's."""
    path = state_path(weights)
    if not path.is_file():
        return None, f"{path.name} not found"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:   # e.g. a file cut short by hand
        return None, f"{path.name} cannot be read ({load_error(e)})"
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        return None, f"{path.name} has format {found}, this code reads {STATE_FORMAT}"
    saved = state.get("weights")   # absent in states written before the fingerprint was
    # float64 sums on another device or in another order agree to ~1e-15 relative
    if fingerprint is not None and saved is not None and not all(
            math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(saved, fingerprint)):
        return None, f"{path.name} was saved with other weights than {weights.name} (copied from another run?)"
    check_resume_position(weights, state, plan)
    if state["plan"] != plan.resume_key():
        return None, f"{path.name} was saved with {state['plan']}, this run has {plan.resume_key()}"
    if state["step"] != plan.start_step:
        return None, f"{path.name} is at step {state['step']}, {weights.name} ends at step {plan.start_step}"
    if bool(state["deepspeed_dir"]) != plan.deepspeed:
        return None, (f"{path.name} holds the optimizer state of a run {'with' if state['deepspeed_dir'] else 'without'}"
                      f" DeepSpeed, this run is {'with' if plan.deepspeed else 'without'} it")
    if state["deepspeed_dir"]:
        if not (weights.parent / state["deepspeed_dir"]).is_dir():
            return None, f"its DeepSpeed folder {state['deepspeed_dir']} is missing"
        if state["world_size"] != plan.world_size:
            return None, (f"its DeepSpeed optimizer shards come from {state['world_size']} processes, "
                          f"this run has {plan.world_size}")
    return state, f"optimizer state {path.name}"


# ----------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------

@dataclass
class _EpochStats:
    loss_sum: float = 0.0
    steps: int = 0
    spikes: int = 0
    started: float = field(default_factory=time.time)


@dataclass
class StepLoss:
    """A step's rank-mean loss on its way to the host: read with `value()`, which on CUDA waits only
    for that step's copy (an event), not for work queued after it. `loss` may hold a second number,
    the rank mean of the stop flags (`stop_requested()`)."""
    step: int      # optimizer steps since the start of training
    run_step: int  # steps of this run (1 = its first, which includes compiling and warm-up)
    lr: float
    ended: float   # time.time() when the step's batch ended (on the CPU)
    loss: torch.Tensor
    copied: torch.cuda.Event | None = None

    @classmethod
    def start(cls, step: int, run_step: int, lr: float, loss: torch.Tensor) -> StepLoss:
        ended = time.time()
        loss = loss.detach().float()
        if loss.device.type != "cuda":
            return cls(step, run_step, lr, ended, loss)
        host = torch.empty(loss.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(loss, non_blocking=True)  # on loss.device's current stream
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(loss.device))
        return cls(step, run_step, lr, ended, host, event)

    def value(self) -> float:
        if self.copied is not None:
            self.copied.synchronize()
        return float(self.loss.reshape(-1)[0])

    def stop_requested(self) -> bool:
        """Whether some rank had received SIGTERM by this step (the same answer on every rank)."""
        self.value()
        return self.loss.numel() > 1 and float(self.loss.reshape(-1)[1]) > 0


def _rank_mean(t: Tensor) -> Tensor:
    """Mean of a tensor over all ranks (itself when there is one). A plain all_reduce: on NCCL it
    only orders GPU streams, while Lightning's strategy.reduce first calls a barrier, which makes the
    CPU wait for the GPU every step."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.clone()
    if dist.get_backend() == "gloo":  # gloo has no AVG
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / dist.get_world_size()
    dist.all_reduce(t, op=dist.ReduceOp.AVG)
    return t


class TrainingMonitor(pl.Callback):
    """Sets the LR, tracks tokens/s and loss, writes train_log.txt, checkpoints and (optionally) wandb."""

    def __init__(self, plan: RunPlan, schedule: Schedule, header: list[str],
                 resume: dict[str, Any] | None = None, wandb_project: str = "",
                 wandb_config: dict[str, Any] | None = None):
        super().__init__()
        self.plan, self.schedule, self.header = plan, schedule, header
        self.resume = resume
        self.wandb_project, self.wandb_config = wandb_project, wandb_config or {}
        self.step = plan.start_step
        self.warm_step = resume["warm_step"] if resume else 0
        self.lr = 0.0
        self.epoch = _EpochStats()
        self.loss_ema: float | None = None
        self.run_steps = 0
        self.kt_per_s = 0.0
        self._last_time = 0.0
        self._pending: StepLoss | None = None  # the newest step's loss, not read yet
        self._sigterm = False                  # this rank received SIGTERM (see _on_sigterm)
        self._stop_at = 0                      # the step at which every rank saw a stop request
        self.progress: dict[str, float] = {}   # what ProgressBar shows: mini-epoch, its mean loss, lr, kt/s
        self._wandb: Any = None

    # ---- paths -------------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.plan.proj_dir / "train_log.txt"

    # ---- hooks -------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            # Replaces Lightning's SIGTERM handler (its teardown restores the one from before fit).
            # Lightning's runs a broadcast inside the handler and forwards the signal to its child
            # ranks, which then broadcast as well: when several ranks get the signal (a process
            # group, SLURM's scancel) the collectives no longer match and every rank hangs; when it
            # works, it ends fit with SystemExit(0), exit status 0 for an unfinished run.
            signal.signal(signal.SIGTERM, self._on_sigterm)
            # A SIGTERM that came since fit installed Lightning's handler (while the data was set up) is
            # ours to act on: left in Lightning's flag, it would end fit with SIGTERMException, a
            # SystemExit(0), after the first step (exit status 0, nothing said).
            connector = getattr(trainer, "_signal_connector", None)
            if connector is not None and connector.received_sigterm:
                self._sigterm = True
                connector.received_sigterm = False
            # With that handler gone, Lightning's SIGTERM poll at every step (world size > 1: a
            # broadcast and an .item(), so the CPU waits for the GPU at each step) only costs time.
            # A private method of its loop: if a Lightning version renames it, this line does nothing.
            loop = trainer.fit_loop.epoch_loop
            if hasattr(loop, "_broadcast_sigterm_tensor"):
                loop._broadcast_sigterm_tensor = lambda *args, **kwargs: None
        self._check_ranks_agree(trainer, pl_module)
        if self.resume is not None:
            self._restore_optimizer(trainer)
        if trainer.is_global_zero:
            self.plan.proj_dir.mkdir(parents=True, exist_ok=True)
            stale = remove_stale_temporaries(self.plan.proj_dir)
            if stale:
                _say(f"removed {len(stale)} temporary file(s) of interrupted saves from {self.plan.proj_dir}: "
                     + ", ".join(p.name for p in stale))
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write("".join(f"# {line}\n" for line in self.header))
            if self.wandb_project:
                import wandb  # only when asked for: it starts a background service
                self._wandb = wandb.init(project=self.wandb_project, config=self.wandb_config,
                                         dir=str(self.plan.proj_dir),
                                         name=f"{self.plan.proj_dir.name}-step{self.step}")
        self._last_time = time.time()
        self.epoch = _EpochStats()

    def _check_ranks_agree(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every rank chose its start alone, from the files in its proj_dir and its own flags: a node
        whose proj_dir is not the shared folder (or whose command differs) would train other samples,
        from other optimizer moments, for another number of steps, then hang in a collective."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        p = self.plan
        mine = torch.tensor([p.start_step, p.total_steps, p.epoch_steps, p.real_bsz, p.ctx_len, self.warm_step,
                             int(self.resume is not None)], dtype=torch.int64, device=pl_module.device)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        every = [t.tolist() for t in gathered]

        def says(row: list[int]) -> str:
            return (f"step {row[0]} of {row[1]} ({'exact resume' if row[6] else 'weights only'}, warmup step "
                    f"{row[5]}), {row[2]} steps of {row[3]} x {row[4]} tokens a mini-epoch")

        odd = [r for r, row in enumerate(every) if row != every[0]]
        if odd:
            raise TrainingError(f"the ranks do not agree where this run starts: rank 0 at {says(every[0])}, rank "
                                f"{odd[0]} at {says(every[odd[0]])}. Every node must run the same command with the "
                                f"same --proj_dir on a shared filesystem (its rwkv-N.pth files decide the start)")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self.lr = self.schedule.lr(self.step, self.warm_step)
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = self.lr * group["my_lr_scale"]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        loss_t = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        # Mean over ranks, with this rank's stop flag beside the loss: every rank sees the same
        # numbers, so all decide (stop, save) alike, at the same step.
        loss_t = _rank_mean(torch.cat([loss_t.detach().float().reshape(1), self._stop_flag(loss_t.device)]))
        self.step += 1
        self.warm_step += 1
        self.run_steps += 1
        previous, self._pending = self._pending, StepLoss.start(self.step, self.run_steps, self.lr, loss_t)
        if previous is not None:
            self._track(previous)
        at_end = self.step >= self.plan.total_steps
        if self.step % self.plan.epoch_steps == 0 or at_end:
            self._flush()  # the mini-epoch's last loss, read before its log and save
            self._end_of_mini_epoch(trainer, pl_module, at_end)
        if self._stop_at and not at_end:   # after a mini-epoch's save, so that a signal there keeps it
            raise TrainingStopped(f"stopped by SIGTERM at step {self.step}; rerun the same command and "
                                  f"{self._where_it_continues()}", signal.SIGTERM)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush()
        self._finish_wandb(0)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish_wandb(1)
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            _say(f"interrupted at step {self.step}; rerun the same command and {self._where_it_continues()}")

    def _where_it_continues(self) -> str:
        ckpt, n = find_resume_checkpoint(self.plan.proj_dir)
        return (f"it continues from {ckpt} (step {(n + 1) * self.plan.epoch_steps})" if ckpt is not None and n >= 0
                else "it starts again (nothing was saved in this run yet)")

    # ---- stop signal -------------------------------------------------------------------------
    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """Only note it. The flag travels with the next step's loss mean, so every rank learns of it
        at the same step and all stop there (whichever ranks got the signal)."""
        self._sigterm = True

    def _stop_flag(self, device: torch.device) -> Tensor:
        # filled on the device (a kernel argument): no host-to-device copy that could wait for the GPU
        return torch.full((1,), 1.0 if self._sigterm else 0.0, device=device)

    # ---- per step ----------------------------------------------------------------------------
    def _flush(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._track(pending)

    def _track(self, entry: StepLoss) -> None:
        loss = entry.value()
        if entry.stop_requested() and not self._stop_at:
            self._stop_at = entry.step
        if not math.isfinite(loss):
            raise TrainingError(
                f"loss is {loss} at step {entry.step} (mini-epoch {(entry.step - 1) // self.plan.epoch_steps}, "
                f"lr {entry.lr:.3e}); nothing was saved after it. Resume from the last rwkv-N.pth in "
                f"{self.plan.proj_dir} with a lower --lr_init or more --warmup_steps")
        rate = self.plan.tokens_per_step / max(entry.ended - self._last_time, 1e-9) / 1000
        self._last_time = entry.ended
        # The first step of a run includes compilation and warm-up of the data pipeline.
        self.kt_per_s = rate if entry.run_step <= 2 else 0.9 * self.kt_per_s + 0.1 * rate
        self.epoch.loss_sum += loss
        self.epoch.steps += 1
        if self.loss_ema is not None and entry.run_step > SPIKE_MIN_STEPS and loss > SPIKE_RATIO * self.loss_ema:
            self.epoch.spikes += 1
            rank_zero_warn(f"loss spike at step {entry.step}: {loss:.4f} vs running mean {self.loss_ema:.4f} "
                           f"(lr {entry.lr:.3e})")
        self.loss_ema = loss if self.loss_ema is None else (1 - SPIKE_EMA) * self.loss_ema + SPIKE_EMA * loss
        self.progress = {"mini-epoch": (entry.step - 1) // self.plan.epoch_steps,
                         "loss": self.epoch.loss_sum / self.epoch.steps, "lr": entry.lr, "kt/s": self.kt_per_s}
        if self._wandb is not None:
            self._wandb.log({"loss": loss, "lr": entry.lr, "tokens": entry.step * self.plan.tokens_per_step,
                             "kt/s": self.kt_per_s}, step=entry.step)

    # ---- per mini-epoch ----------------------------------------------------------------------
    def _end_of_mini_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, at_end: bool) -> None:
        plan = self.plan
        full = self.step % plan.epoch_steps == 0
        e = self.step // plan.epoch_steps - (1 if full else 0)
        if trainer.is_global_zero:
            self._log_epoch(e, full)
        if full and plan.epoch_save > 0 and e % plan.epoch_save == 0:
            self.save(trainer, pl_module, plan.proj_dir / f"rwkv-{e}.pth", with_state=True)
        if at_end:
            self.save(trainer, pl_module, plan.proj_dir / "rwkv-final.pth", with_state=False)
        self.epoch = _EpochStats()

    def _log_epoch(self, e: int, full: bool) -> None:
        mean = self.epoch.loss_sum / max(self.epoch.steps, 1)
        line = (f"epoch {e} loss {mean:.6f} ppl {math.exp(min(mean, 700)):.4f} lr {self.lr:.6e} "
                f"time {datetime.now(timezone.utc).isoformat(timespec='seconds')} "
                f"elapsed {time.time() - self.epoch.started:.1f} steps {self.step} "
                f"tokens {self.step * self.plan.tokens_per_step} kt/s {self.kt_per_s:.2f} "
                f"spikes {self.epoch.spikes}{'' if full else ' partial 1'}")
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        _say(line)
        plot_train_log(self.log_path)
        if self._wandb is not None:
            self._wandb.log({"epoch": e, "epoch_loss": mean}, step=self.step)

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: Path, with_state: bool) -> None:
        """Write weights (and the exact-resume state) for the current step; collective on all ranks."""
        strategy = trainer.strategy
        deepspeed = isinstance(strategy, DeepSpeedStrategy)
        weights = _gathered_state_dict(strategy, pl_module)   # whole tensors, also under ZeRO-3
        bad = torch.tensor(0.0 if _all_finite(weights.values()) else 1.0, device=pl_module.device)
        if float(strategy.reduce(bad, reduce_op="max")) > 0:
            raise TrainingError(f"weights hold NaN/inf after step {self.step}; {path.name} was not written. "
                                f"Resume from an earlier checkpoint in {path.parent} with a lower --lr_init")
        state: dict[str, Any] | None = None
        if with_state:
            state = {"format": STATE_FORMAT, "step": self.step, "warm_step": self.warm_step,
                     "plan": self.plan.resume_key(), "world_size": trainer.world_size, "optimizer": None,
                     "deepspeed_dir": None, "data": list(self.plan.data), "weights": weights_fingerprint(weights)}
            if deepspeed:
                ds_dir = path.with_suffix(".ds")
                strategy.deepspeed_engine.save_checkpoint(str(ds_dir), tag="state", save_latest=False)
                strategy.barrier("deepspeed state saved")
                state["deepspeed_dir"] = ds_dir.name
            elif trainer.is_global_zero:   # DDP keeps the optimizer identical on every rank
                state["optimizer"] = trainer.optimizers[0].state_dict()
        if trainer.is_global_zero:
            if state is not None:
                save_atomic(state, state_path(path))
            save_atomic(weights, path)
            _say(f"saved {path}" + (f" and {state_path(path).name}" if state is not None else ""))
        if state is not None:
            # Resume only ever reads the newest state; older ones (2x the fp32 weights each, more with
            # DeepSpeed) go once this one is complete on disk. Their rwkv-N.pth weights stay.
            strategy.barrier("checkpoint saved")
            if trainer.local_rank == 0:   # once per node: DeepSpeed shards may lie on node-local disks
                _remove_older_states(path)

    def _restore_optimizer(self, trainer: pl.Trainer) -> None:
        assert self.resume is not None
        strategy = trainer.strategy
        assert bool(self.resume["deepspeed_dir"]) == isinstance(strategy, DeepSpeedStrategy), \
            "RunPlan.deepspeed must say whether the strategy is DeepSpeed (load_resume_state compares them)"
        if self.resume["deepspeed_dir"]:
            strategy.deepspeed_engine.load_checkpoint(str(self.plan.proj_dir / self.resume["deepspeed_dir"]),
                                                      tag="state", load_optimizer_states=True,
                                                      load_lr_scheduler_states=False)
            return
        optimizer = trainer.optimizers[0]
        saved = self.resume["optimizer"]
        # load_state_dict takes every group setting from the file, also how the step runs (fused,
        # foreach), which belongs to this run (states saved before AdamW was fused would turn it off).
        how = ("fused", "foreach", "capturable")
        groups = [{**g, **{k: own[k] for k in how if k in own}}
                  for g, own in zip(saved["param_groups"], optimizer.param_groups)]
        saved = {**saved, "param_groups": groups}
        try:
            optimizer.load_state_dict(saved)
        except ValueError as e:
            raise TrainingError(f"the saved optimizer state does not fit this model's parameter groups ({e}); "
                                "delete the .state.pth file for a weights-only resume") from e

    def _finish_wandb(self, exit_code: int) -> None:
        if self._wandb is not None:
            self._wandb.finish(exit_code=exit_code)
            self._wandb = None


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar showing a TrainingMonitor's numbers (mini-epoch, its mean loss, lr, kt/s).

    Not through LightningModule.log: it turns every float into a tensor on the model's device, on a
    GPU a host-to-device copy that waits for all queued work (3 a step), plus ~1 ms of bookkeeping each.
    """

    def __init__(self, monitor: TrainingMonitor) -> None:
        super().__init__()
        self.monitor = monitor

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        # Lightning's one "epoch" is the whole run here; the mini-epoch is shown beside the loss.
        self.train_progress_bar.set_description("training")

    def get_metrics(self, trainer: pl.Trainer,
                    pl_module: pl.LightningModule) -> dict[str, int | str | float | dict[str, float]]:
        return {**super().get_metrics(trainer, pl_module), **self.monitor.progress}


def _say(line: str) -> None:
    """Print a line above the progress bar (tqdm.write clears and redraws a bar being drawn; a plain
    print would end up on the bar's line)."""
    tqdm.write(line)
    sys.stdout.flush()


def _remove_older_states(weights: Path) -> None:
    """Delete the rwkv-M.state.pth files and rwkv-M.ds folders of M below weights' rwkv-N.pth."""
    n = int(_NUMBERED.fullmatch(weights.name).group(1))
    for p in weights.parent.iterdir():
        m = re.fullmatch(r"rwkv-(\d+)\.(state\.pth|ds)", p.name)
        if m and int(m.group(1)) < n:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)   # another node may be removing it from a shared disk
            else:
                p.unlink(missing_ok=True)


def _all_finite(params: Iterable[Tensor]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params if p.numel())


def _gathered_state_dict(strategy: pl.strategies.Strategy, pl_module: pl.LightningModule) -> dict[str, Tensor]:
    """The full state_dict on every rank (ZeRO-3 partitions parameters: gather them first)."""
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(pl_module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
    return {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# Loss curve
# ----------------------------------------------------------------------------------------------

def read_train_log(path: Path) -> list[dict[str, float]]:
    """The mini-epoch lines of a train_log.txt as dicts of their numeric fields (header lines skipped)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.startswith("epoch "):
            continue
        parts = line.split()
        row = {}
        for key, value in zip(parts[::2], parts[1::2]):
            try:
                row[key] = float(value)
            except ValueError:
                continue   # the time stamp
        rows.append(row)
    return rows


def plot_train_log(log_path: Path, svg_path: Path | None = None) -> Path:
    """Draw loss against tokens from train_log.txt as an SVG (no plotting library needed)."""
    rows = [r for r in read_train_log(log_path) if "tokens" in r and "loss" in r]
    svg_path = Path(svg_path) if svg_path is not None else Path(log_path).with_suffix(".svg")
    W, H, pad = 640, 400, 50
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{W / 2}" y="20" text-anchor="middle">loss per mini-epoch: {Path(log_path).parent.name}</text>']
    if rows:
        xs, ys = [r["tokens"] for r in rows], [r["loss"] for r in rows]
        x0, x1 = 0.0, max(xs)
        y0, y1 = min(ys), max(ys)
        y0, y1 = (y0 - 0.5, y1 + 0.5) if y1 - y0 < 1e-9 else (y0, y1)

        def px(x: float) -> float:
            return pad + (x - x0) / max(x1 - x0, 1e-9) * (W - 2 * pad)

        def py(y: float) -> float:
            return H - pad - (y - y0) / (y1 - y0) * (H - 2 * pad)

        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
        parts += [f'<polyline fill="none" stroke="steelblue" stroke-width="2" points="{points}"/>',
                  f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="black"/>',
                  f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="black"/>',
                  f'<text x="{pad}" y="{H - pad + 16}">0</text>',
                  f'<text x="{W - pad}" y="{H - pad + 16}" text-anchor="end">{x1:.4g} tokens</text>',
                  f'<text x="{pad - 4}" y="{py(y1) + 4:.1f}" text-anchor="end">{y1:.3f}</text>',
                  f'<text x="{pad - 4}" y="{py(y0) + 4:.1f}" text-anchor="end">{y0:.3f}</text>']
    parts.append("</svg>\n")
    tmp = svg_path.with_name(f".{svg_path.name}.tmp{os.getpid()}")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, svg_path)
    return svg_path


def plot_main(argv: list[str]) -> int:
    """`python -m src.trainer out/L8-D512-x070/train_log.txt ...`: write train_log.svg beside each log."""
    usage = "usage: python -m src.trainer PROJ_DIR/train_log.txt ... (writes train_log.svg beside each)"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    for arg in argv:
        path = Path(arg)
        if path.is_dir():   # a run's proj_dir: its log
            path = path / "train_log.txt"
        if not path.is_file():
            print(f"error: {path}: no such file (give a run's train_log.txt or its proj_dir)", file=sys.stderr)
            return 2
        if not read_train_log(path):
            print(f"error: {path} has no mini-epoch lines ('epoch N loss ...'): not a train_log.txt, or the "
                  "run has not finished a mini-epoch yet", file=sys.stderr)
            return 2
        print(plot_train_log(path))
    return 0


if __name__ == "__main__":
    sys.exit(plot_main(sys.argv[1:]))
