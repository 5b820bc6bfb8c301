"""train.py end to end on CPU with a tiny model: learning, files, exact resume after a kill, NaN handling.

The data is fresh synthetic binidx (arithmetic progressions of token ids, one document each): a
2-layer model learns it within a few dozen steps, so a falling loss is a real signal. The helpers
here (`write_progressions`, `tiny_flags`, `one_thread`, ...) are reused by the other test_train_* files.
"""
from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

import train
from src.binidx import MMapIndexedDatasetBuilder
from src.model import RWKV, ModelConfig, lm_loss
from src.trainer import TrainingError

REPO = Path(__file__).resolve().parents[1]
VOCAB, CTX, MICRO_BSZ = 64, 32, 4
MODEL = dict(n_layer=2, n_embd=64, head_size=32, vocab_size=VOCAB)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """One torch thread here and in the subprocesses: on a busy 2-core machine torch's thread pool makes
    these tiny models ~20x slower (threads wait on each other), and equal thread counts keep runs bit-exact."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def progressions(n_docs: int, seed: int) -> list[np.ndarray]:
    """Documents start, start+d, start+2d, ... (mod VOCAB-3, shifted past the 3 special ids), then 0."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        start, step, n = rng.integers(0, VOCAB - 3), rng.integers(1, 4), rng.integers(20, 80)
        docs.append(np.append((start + step * np.arange(n)) % (VOCAB - 3) + 3, 0).astype(np.uint16))
    return docs


def write_progressions(prefix: Path, n_docs: int = 300, seed: int = 0) -> int:
    """Write PREFIX.bin/.idx with the data helper's writer; returns the token count."""
    docs = progressions(n_docs, seed)
    with MMapIndexedDatasetBuilder(prefix, np.uint16) as b:
        for d in docs:
            b.add_document(d)
    return sum(len(d) for d in docs)


def largest_magic_prime(n_tokens: int, ctx_len: int) -> int:
    """SPEC: largest prime p, p % 3 == 2, p <= n_tokens // ctx_len - 1 (trial division, independent of src)."""
    p = n_tokens // ctx_len - 1
    while not (p % 3 == 2 and all(p % q for q in range(2, math.isqrt(p) + 1))):
        p -= 1
    return p


def as_flags(values: Mapping[str, object]) -> list[str]:
    """{"n_layer": 2, ...} -> ["--n_layer", "2", ...]: train.py's command line."""
    return [s for k, v in values.items() for s in (f"--{k}", str(v))]


def tiny_flags(data: Path, n_tokens: int, proj: Path, **over: object) -> list[str]:
    flags: dict[str, object] = dict(
        proj_dir=proj, data_file=data, ctx_len=CTX, micro_bsz=MICRO_BSZ, epoch_steps=4, epoch_count=4,
        my_exit_tokens=0, magic_prime=largest_magic_prime(n_tokens, CTX), lr_init=3e-3, lr_final=3e-4,
        warmup_steps=3, precision="fp32", accelerator="cpu", strategy="auto", enable_progress_bar="False",
        **MODEL)
    flags.update(over)
    return as_flags(flags)


class Recorder(pl.Callback):
    """Per step: loss, the schedule's lr (group lr / my_lr_scale) of every group, and the batch's x."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        groups = trainer.optimizers[0].param_groups
        self.rows.append({"loss": float(outputs["loss"]), "lr": [g["lr"] / g["my_lr_scale"] for g in groups],
                          "scale": [g["my_lr_scale"] for g in groups], "x": batch[0].tolist(),
                          "fused": [g["fused"] for g in groups]})


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def wait_for_file(path: Path, proc: subprocess.Popen | None, timeout: float = 300) -> None:
    """Poll until `path` exists or `proc` (if given) has ended; a run that hangs fails the test instead of
    stalling it."""
    deadline = time.monotonic() + timeout
    while not path.exists() and (proc is None or proc.poll() is None):
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.005)


def run_and_kill(args: list[str], when: Path, timeout: float = 300) -> None:
    """Run train.py with `args` in its own process and SIGKILL it (no clean-up at all) once `when` exists."""
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_file(when, proc, timeout)
    finally:
        proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"


def epoch_lines(proj: Path) -> list[dict[str, float]]:
    from src.trainer import read_train_log
    return read_train_log(proj / "train_log.txt")


def hand_lr(step: int, warm_step: int, lr_init: float, lr_final: float, warmup: int, tokens_per_step: int,
            exit_tokens: int) -> float:
    """SPEC section 4 written out again."""
    progress = (step * tokens_per_step - warmup * tokens_per_step) / (exit_tokens - warmup * tokens_per_step)
    progress = min(1.0, max(0.0, progress))
    f = lr_final / lr_init
    lr = lr_init * ((1 + f) / 2 + (1 - f) / 2 * math.cos(math.pi * progress))
    return lr * (0.01 + 0.99 * warm_step / warmup) if warm_step < warmup else lr


def mean_loss(model: RWKV, docs: list[np.ndarray]) -> float:
    """Mean next-token loss over CTX+1-token windows cut from `docs` (concatenated)."""
    stream = torch.from_numpy(np.concatenate(docs).astype(np.int64))
    n = (len(stream) - 1) // CTX
    x = stream[: n * CTX].view(n, CTX)
    y = stream[1: n * CTX + 1].view(n, CTX)
    with torch.no_grad():
        return float(lm_loss(model.float()(x), y))


def test_training_learns_and_writes_its_files(tmp_path: Path) -> None:
    """Stage 1 then stage 3 through the command line: loss falls, held-out loss falls, every file is right."""
    data, proj = tmp_path / "prog", tmp_path / "proj"
    n = write_progressions(data, seed=1)
    r = run_cli(["--train_stage", "1", "--proj_dir", str(proj), "--precision", "fp32",
                 *as_flags(MODEL)])
    assert r.returncode == 0, r.stderr
    r = run_cli(tiny_flags(data, n, proj, epoch_steps=5, epoch_count=6, epoch_save=3, wandb="rwkv-test"),
                env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stderr[-3000:]

    rows = epoch_lines(proj)
    assert [int(x["epoch"]) for x in rows] == list(range(6))
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], rows
    assert rows[-1]["tokens"] == 6 * 5 * MICRO_BSZ * CTX and rows[-1]["steps"] == 30
    header = (proj / "train_log.txt").read_text()
    assert "#   lr_init = 0.003" in header and "from " + str(proj / "rwkv-init.pth") in header
    assert (proj / "train_log.svg").read_text().count(",") >= 6   # 6 points on the curve

    # epoch_save 3: mini-epochs 0 and 3 with their resume state; the final weights once training ends
    names = sorted(p.name for p in proj.iterdir() if p.suffix == ".pth")
    # (resume reads only the newest optimizer state: rwkv-0.state.pth went when rwkv-3's was saved)
    assert names == sorted(["rwkv-init.pth", "rwkv-final.pth", "rwkv-0.pth", "rwkv-3.pth", "rwkv-3.state.pth"])
    cfg = ModelConfig(**MODEL)
    init, final = RWKV(cfg), RWKV(cfg)
    init.load_state_dict(torch.load(proj / "rwkv-init.pth", weights_only=True))
    sd = torch.load(proj / "rwkv-final.pth", weights_only=True)
    assert list(sd) == list(final.state_dict()) and all(v.dtype == torch.float32 for v in sd.values())
    final.load_state_dict(sd)
    held_out = progressions(40, seed=99)  # documents the run never saw
    assert mean_loss(final, held_out) < mean_loss(init, held_out) - 1.5

    # wandb (offline): one run whose history holds every step's numbers
    runs = list((proj / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list((proj / "wandb").rglob("*"))[:20]
    steps = [h for h in wandb_history(runs[0]) if "tokens" in h]
    assert [h["_step"] for h in steps] == list(range(1, 31))
    assert all(h["tokens"] == h["_step"] * MICRO_BSZ * CTX and h["loss"] > 0 and h["kt/s"] > 0 for h in steps)
    want_lr = hand_lr(29, 29, 3e-3, 3e-4, 3, MICRO_BSZ * CTX, 30 * MICRO_BSZ * CTX)
    assert steps[-1]["lr"] == pytest.approx(want_lr, rel=1e-9)
    assert [h["epoch_loss"] for h in wandb_history(runs[0]) if "epoch_loss" in h] == \
        pytest.approx([r["loss"] for r in rows], abs=1e-6)


def wandb_history(path: Path) -> list[dict]:
    """History rows of an offline .wandb file (a LevelDB-style log of 32 KiB blocks holding protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, block, buf, rows = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:        # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):                 # FULL or LAST fragment: a whole Record
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_resume_after_kill_continues_exactly(tmp_path: Path) -> None:
    """Kill a run once rwkv-1.pth exists; resuming gives the uninterrupted run's losses and lrs step for step."""
    data = tmp_path / "prog"
    n = write_progressions(data, seed=2)
    init = tmp_path / "init"
    assert train.main(["--train_stage", "1", "--proj_dir", str(init), "--precision", "fp32", "--random_seed", "3",
                       *as_flags(MODEL)]) == 0
    flags = dict(load_model=init / "rwkv-init.pth", epoch_count=10)  # B must still run when killed

    # A: uninterrupted, in this process
    rec_a = Recorder()
    assert train.main(tiny_flags(data, n, tmp_path / "a", **flags), callbacks=[rec_a]) == 0
    steps = 10 * 4
    assert len(rec_a.rows) == steps
    # the schedule the optimizer really used: SPEC's formula, warmup from the fresh optimizer, x2 on att.w0
    for s, row in enumerate(rec_a.rows):
        want = hand_lr(s, s, 3e-3, 3e-4, 3, MICRO_BSZ * CTX, steps * MICRO_BSZ * CTX)
        assert row["lr"] == pytest.approx([want] * len(row["lr"]), rel=1e-12)
    assert sorted(rec_a.rows[0]["scale"]) == [1.0, 1.0, 2.0]

    # B: the same run as its own process, killed (SIGKILL: no cleanup) as soon as rwkv-1.pth appears
    proj_b = tmp_path / "b"
    run_and_kill(tiny_flags(data, n, proj_b, **flags), proj_b / "rwkv-1.pth")
    assert not (proj_b / "rwkv-final.pth").exists()
    last = max(int(p.stem.split("-")[1]) for p in proj_b.glob("rwkv-[0-9]*.pth") if ".state" not in p.name)
    assert last >= 1

    # An optimizer state as saved before AdamW was fused: its groups say how to step (fused None,
    # foreach False); the resumed run must still step fused, as this code builds it.
    state_file = proj_b / f"rwkv-{last}.state.pth"
    state = torch.load(state_file, weights_only=True)
    for g in state["optimizer"]["param_groups"]:
        g.update(fused=None, foreach=False)
    torch.save(state, state_file)

    # what a kill during a save leaves (here planted, as the kill's timing is not ours): the rerun removes it
    stale = proj_b / f".rwkv-{last + 1}.state.pth.0123456789abcdef.tmp"
    stale.write_bytes(state_file.read_bytes()[:1000])
    os.utime(stale, (time.time() - 3600,) * 2)

    # B': rerun the same command; it resumes from rwkv-<last>.pth with its optimizer state
    rec_b = Recorder()
    assert train.main(tiny_flags(data, n, proj_b, **flags), callbacks=[rec_b]) == 0
    done = (last + 1) * 4
    assert len(rec_b.rows) == steps - done
    for a, b in zip(rec_a.rows[done:], rec_b.rows):
        assert b["x"] == a["x"]                                   # the same next samples
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)      # the same schedule position, no new warmup
        assert b["loss"] == a["loss"]                              # bit for bit (same threads, same ops)
        assert b["fused"] == a["fused"] == [True] * 3
    assert f"exact resume with optimizer state rwkv-{last}.state.pth" in (proj_b / "train_log.txt").read_text()
    assert not stale.exists()

    # control: the same weights without their optimizer state resume weights-only and drift apart
    proj_c = tmp_path / "c"
    proj_c.mkdir()
    (proj_c / f"rwkv-{last}.pth").write_bytes((proj_b / f"rwkv-{last}.pth").read_bytes())
    rec_c = Recorder()
    assert train.main(tiny_flags(data, n, proj_c, **flags), callbacks=[rec_c]) == 0
    assert rec_c.rows[0]["loss"] == pytest.approx(rec_b.rows[0]["loss"], rel=1e-6)   # same weights, same sample
    assert rec_c.rows[0]["lr"][0] == pytest.approx(0.01 * rec_b.rows[0]["lr"][0], rel=1e-9)  # warms up again
    assert max(abs(c["loss"] - b["loss"]) for b, c in zip(rec_b.rows[1:], rec_c.rows[1:])) > 1e-3


def test_sigterm_stops_with_exit_status_143_and_says_where_it_continues(tmp_path: Path) -> None:
    """SIGTERM (a scheduler's cancel, `timeout`, `kill`) ends an unfinished run: a failure status
    (128 + 15, as the signal itself would give) so that a script does not go on to the next stage,
    and a line that says which checkpoint a rerun continues from."""
    data, proj = tmp_path / "prog", tmp_path / "proj"
    n = write_progressions(data, seed=2)
    assert train.main(["--train_stage", "1", "--proj_dir", str(proj), "--precision", "fp32",
                       *as_flags(MODEL)]) == 0
    proc = subprocess.Popen([sys.executable, "train.py", *tiny_flags(data, n, proj, epoch_count=10)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(proj / "rwkv-1.pth", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    last = max(int(p.stem.split("-")[1]) for p in proj.glob("rwkv-[0-9]*.pth") if ".state" not in p.name)
    assert f"rerun the same command and it continues from {proj / f'rwkv-{last}.pth'}" in err
    assert not (proj / "rwkv-final.pth").exists()


# train.py with the GPU's DataLoader worker (num_workers=1, persistent) on the CPU
WITH_A_WORKER = """
import sys
import train
from torch.utils.data import DataLoader
class WithAWorker(DataLoader):
    def __init__(self, *a, **k):
        super().__init__(*a, **{**k, "num_workers": 1, "persistent_workers": True})
train.DataLoader = WithAWorker
sys.exit(train.cli(sys.argv[1:]))
"""


def test_sigterm_to_the_process_group_with_a_dataloader_worker(tmp_path: Path) -> None:
    """SIGTERM to the whole process group (scancel, `timeout`, kill -- -PGID) reaches the DataLoader
    worker too (GPU runs have one): the worker must not die of it, or its rank raises "DataLoader
    worker ... is killed by signal: Terminated" mid-step (exit 1) instead of stopping with 143."""
    data, proj = tmp_path / "prog", tmp_path / "proj"
    n = write_progressions(data, seed=2)
    assert train.main(["--train_stage", "1", "--proj_dir", str(proj), "--precision", "fp32",
                       *as_flags(MODEL)]) == 0
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", WITH_A_WORKER, *tiny_flags(data, n, proj, epoch_count=10)],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_file(proj / "rwkv-1.pth", proc)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    said = (tmp_path / "out.txt").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, said[-3000:]
    assert "stopped by SIGTERM at step" in said and "killed by signal" not in said


# train.py receiving SIGTERM while Lightning sets up the data: after fit installed Lightning's handler,
# before TrainingMonitor.on_train_start installs its own
TERM_IN_SETUP = """
import os, signal, sys
import train
setup = train.TrainData.train_dataloader
def term_then_setup(self):
    os.kill(os.getpid(), signal.SIGTERM)
    return setup(self)
train.TrainData.train_dataloader = term_then_setup
sys.exit(train.cli(sys.argv[1:]))
"""


def test_sigterm_while_fit_sets_up_still_exits_143(tmp_path: Path) -> None:
    """A SIGTERM caught by Lightning's handler just before training starts must not end the run with
    Lightning's SystemExit(0) after its first step: the same stop with 143 as one during training."""
    data, proj = tmp_path / "prog", tmp_path / "proj"
    n = write_progressions(data, seed=2)
    assert train.main(["--train_stage", "1", "--proj_dir", str(proj), "--precision", "fp32",
                       *as_flags(MODEL)]) == 0
    r = subprocess.run([sys.executable, "-c", TERM_IN_SETUP, *tiny_flags(data, n, proj, epoch_count=10)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 128 + signal.SIGTERM, r.stdout[-3000:] + r.stderr[-3000:]
    assert "stopped by SIGTERM at step" in r.stderr and "and it starts again (nothing was saved in this run yet)" in r.stderr


def test_exact_resume_of_a_new_start_continues_its_warmup(tmp_path: Path) -> None:
    """A --load_model start at mini-epoch 1 warms up from its fresh optimizer (warm_step 0 at step 4);
    the state it saves keeps that count, so an exact resume continues the same warmup, not one counted
    from step 0."""
    data = tmp_path / "prog"
    n = write_progressions(data, seed=6)
    init = tmp_path / "init"
    assert train.main(["--train_stage", "1", "--proj_dir", str(init), "--precision", "fp32", "--random_seed", "3",
                       *as_flags(MODEL)]) == 0
    proj = tmp_path / "proj"
    flags = dict(load_model=init / "rwkv-init.pth", epoch_begin=1, warmup_steps=20)
    rec = Recorder()
    assert train.main(tiny_flags(data, n, proj, epoch_count=3, **flags), callbacks=[rec]) == 0   # steps 4..11
    tps = MICRO_BSZ * CTX
    for k, row in enumerate(rec.rows):
        assert row["lr"][0] == pytest.approx(hand_lr(4 + k, k, 3e-3, 3e-4, 20, tps, 12 * tps), rel=1e-12)
    state = torch.load(proj / "rwkv-2.state.pth", weights_only=True)
    assert (state["step"], state["warm_step"]) == (12, 8)
    # the log counts steps and tokens from the start of training (mini-epoch 0), not of this run
    assert [(r["epoch"], r["steps"], r["tokens"]) for r in epoch_lines(proj)] == [(1, 8, 8 * tps), (2, 12, 12 * tps)]

    # one more mini-epoch of the same run: it resumes exactly from rwkv-2 with 8 warmup steps taken
    (proj / "rwkv-final.pth").unlink()
    rec = Recorder()
    assert train.main(tiny_flags(data, n, proj, epoch_count=4, **flags), callbacks=[rec]) == 0   # steps 12..15
    assert "exact resume with optimizer state rwkv-2.state.pth" in (proj / "train_log.txt").read_text()
    assert len(rec.rows) == 4
    for k, row in enumerate(rec.rows):
        assert row["lr"][0] == pytest.approx(hand_lr(12 + k, 8 + k, 3e-3, 3e-4, 20, tps, 16 * tps), rel=1e-12)
    assert [(r["epoch"], r["steps"], r["tokens"]) for r in epoch_lines(proj)][-1] == (3, 16, 16 * tps)


class PoisonWeights(pl.Callback):
    """Before step `at` (0-based, counted in this run), set a parameter to NaN."""

    def __init__(self, at: int, name: str):
        self.at, self.name = at, name

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.at:
            with torch.no_grad():
                dict(pl_module.named_parameters())[self.name].fill_(float("nan"))


@pytest.mark.parametrize("poison_at", [4, 5])
def test_nan_loss_stops_with_the_step_and_saves_nothing_after_it(tmp_path: Path, poison_at: int) -> None:
    """Step 5 opens mini-epoch 2 (its loss is read one step late), step 6 closes it (read at once)."""
    data, proj = tmp_path / "prog", tmp_path / "proj"
    n = write_progressions(data, seed=4)
    train.main(["--train_stage", "1", "--proj_dir", str(proj), "--precision", "fp32",
                *as_flags(MODEL)])
    with pytest.raises(TrainingError, match=rf"loss is nan at step {poison_at + 1} \(mini-epoch 2,.*nothing was saved after it"):
        train.main(tiny_flags(data, n, proj, epoch_steps=2), callbacks=[PoisonWeights(poison_at, "head.weight")])
    assert {p.name for p in proj.glob("rwkv-[0-9]*")} == {"rwkv-0.pth", "rwkv-1.pth", "rwkv-1.state.pth"}
    assert "epoch 2" not in (proj / "train_log.txt").read_text()


def test_nan_weights_with_finite_loss_are_not_saved(tmp_path: Path) -> None:
    """Layer 0 never uses att.v0 (SPEC), so a NaN there leaves the loss finite: the save must still refuse."""
    data, proj = tmp_path / "prog", tmp_path / "proj"
    n = write_progressions(data, seed=5)
    train.main(["--train_stage", "1", "--proj_dir", str(proj), "--precision", "fp32",
                *as_flags(MODEL)])
    with pytest.raises(TrainingError, match=r"weights hold NaN/inf after step 2; rwkv-0.pth was not written"):
        train.main(tiny_flags(data, n, proj, epoch_steps=2), callbacks=[PoisonWeights(1, "blocks.0.att.v0")])
    assert not list(proj.glob("rwkv-[0-9]*"))


class BatchCount(pl.Callback):
    def __init__(self) -> None:
        self.total, self.steps = -1, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.total = trainer.num_training_batches     # the progress bar's total

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1


def test_run_ending_inside_a_mini_epoch_loads_exactly_its_steps(tmp_path: Path) -> None:
    """--my_exit_tokens = the data's tokens ends partway through a mini-epoch: the loader holds exactly
    the run's batches (so the progress bar ends at 100 %), and the last log line is marked partial."""
    data, proj = tmp_path / "prog", tmp_path / "proj"
    n = write_progressions(data, n_docs=120, seed=9)
    train.main(["--train_stage", "1", "--proj_dir", str(proj), "--precision", "fp32",
                *as_flags(MODEL)])
    steps = math.ceil(n / (MICRO_BSZ * CTX))
    assert steps % 4, "the data should end inside a 4-step mini-epoch"
    count, rec = BatchCount(), Recorder()
    assert train.main(tiny_flags(data, n, proj, my_exit_tokens=n, epoch_count=0), callbacks=[count, rec]) == 0
    assert count.total == count.steps == steps
    assert epoch_lines(proj)[-1]["steps"] == steps
    # the partial mini-epoch's loss: the mean over the steps it has, not over a whole mini-epoch's 4
    tail = [r["loss"] for r in rec.rows[-(steps % 4):]]
    assert epoch_lines(proj)[-1]["loss"] == pytest.approx(sum(tail) / len(tail), abs=2e-6)
    assert (proj / "train_log.txt").read_text().rstrip().endswith("partial 1")
    assert (proj / "rwkv-final.pth").is_file()           # the run ended: its weights are saved, partial or not


def test_progress_bar_shows_the_monitors_numbers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The bar shows the mini-epoch's mean loss, the step's lr and kt/s, and nothing goes through
    LightningModule.log (whose float-to-device copies would make the CPU wait for a GPU every step)."""
    data = tmp_path / "prog"
    n = write_progressions(data, seed=4)
    shown: dict = {}

    class Peek(pl.Callback):
        def on_train_end(self, trainer, pl_module) -> None:
            shown.update(bar=trainer.progress_bar_callback.get_metrics(trainer, pl_module),
                         logged=dict(trainer.progress_bar_metrics), lr=trainer.optimizers[0].param_groups[0]["lr"])

    proj = tmp_path / "proj"
    assert train.main(["--train_stage", "1", "--proj_dir", str(proj), "--precision", "fp32",
                       *as_flags(MODEL)]) == 0
    rec = Recorder()
    flags = tiny_flags(data, n, proj, epoch_count=2, enable_progress_bar="True")
    assert train.main(flags, callbacks=[rec, Peek()]) == 0
    bar = shown["bar"]
    assert set(bar) == {"mini-epoch", "loss", "lr", "kt/s"} and shown["logged"] == {}
    assert bar["mini-epoch"] == 1                                     # epoch_count 2: the last one is 1
    assert bar["loss"] == pytest.approx(sum(r["loss"] for r in rec.rows[-4:]) / 4, rel=1e-6)  # epoch_steps 4
    assert bar["lr"] == pytest.approx(rec.rows[-1]["lr"][0], rel=1e-12) and bar["kt/s"] > 0
    out = capsys.readouterr().out   # Lightning's tqdm bar writes to stdout
    assert "training: 100%" in out and "kt/s=" in out   # ("Epoch 0" shows only while Lightning sets the bar up)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gradients_are_clipped_with_the_fused_optimizer(precision: str) -> None:
    """--grad_clip reaches the optimizer: the global gradient norm at each optimizer step is the clip
    value whenever the backward's norm was larger (fused AdamW, which Lightning's bf16 plugin will not clip)."""
    args = train.parse_args(["--accelerator", "cpu", "--precision", precision, "--grad_clip", "0.05",
                             "--micro_bsz", "2", "--ctx_len", str(CTX), "--proj_dir", "unused",
                             "--enable_progress_bar", "False", *as_flags(MODEL)])
    model = train.build_model(args)
    norms: dict[str, list[float]] = {"backward": [], "step": []}

    def global_norm(params) -> float:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params if p.grad is not None])))

    class Norms(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            opt = trainer.optimizers[0]
            assert opt.defaults["fused"]
            # after the step: Lightning runs forward, backward and clipping inside optimizer.step (a closure)
            opt.register_step_post_hook(lambda o, *_: norms["step"].append(
                global_norm([p for g in o.param_groups for p in g["params"]])))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:   # before clipping
            norms["backward"].append(global_norm(pl_module.parameters()))

    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (6, CTX + 1), generator=gen)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=2)
    train.build_trainer(args, 3, [Norms()]).fit(model, train_dataloaders=data)
    assert len(norms["step"]) == 3 and all(b > 0.05 for b in norms["backward"]), norms
    assert norms["step"] == pytest.approx([0.05] * 3, rel=1e-4)


def test_killed_after_the_last_save_finishes_with_those_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Killed after the last mini-epoch's rwkv-N.pth, before rwkv-final.pth: rerunning trains no step and
    writes those weights as rwkv-final.pth (the SFT stage and the chat demo look for it)."""
    data, proj = tmp_path / "prog", tmp_path / "proj"
    n = write_progressions(data, seed=8)
    assert train.main(["--train_stage", "1", "--proj_dir", str(proj), "--precision", "fp32", "--random_seed", "4",
                       *as_flags(MODEL)]) == 0
    (proj / "rwkv-init.pth").rename(proj / "rwkv-3.pth")   # mini-epoch 3 ends a 4 x 4-step run
    rec = Recorder()
    assert train.main(tiny_flags(data, n, proj), callbacks=[rec]) == 0
    assert rec.rows == []
    assert f"is at step 16 of 16; {proj / 'rwkv-final.pth'} holds the result" in capsys.readouterr().out
    last = torch.load(proj / "rwkv-3.pth", weights_only=True)
    final = torch.load(proj / "rwkv-final.pth", weights_only=True)
    assert list(final) == list(last) and all(torch.equal(final[k], last[k]) for k in last)


def test_each_resume_state_is_written_before_its_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill between two writes of a save must never leave an rwkv-N.pth without its state: resume picks
    the highest rwkv-N.pth and would continue weights-only. Files in the order they were complete on disk."""
    import src.trainer
    data, proj = tmp_path / "prog", tmp_path / "proj"
    n = write_progressions(data, seed=10)
    assert train.main(["--train_stage", "1", "--proj_dir", str(proj), "--precision", "fp32", *as_flags(MODEL)]) == 0
    written: list[str] = []
    real_save = src.trainer.save_atomic

    def save_and_note(obj, path):
        real_save(obj, path)
        written.append(Path(path).name)

    monkeypatch.setattr(src.trainer, "save_atomic", save_and_note)
    assert train.main(tiny_flags(data, n, proj, epoch_count=3, epoch_save=2)) == 0
    assert written == ["rwkv-0.state.pth", "rwkv-0.pth", "rwkv-2.state.pth", "rwkv-2.pth", "rwkv-final.pth"]


class TermAt(pl.Callback):
    """SIGTERM to this process as the batch `at` (0-based, of this run) starts."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_the_last_step_lets_the_run_finish(tmp_path: Path) -> None:
    """The stop request travels with a step's loss: one that arrives with the run's last step finds the run
    finished (rwkv-final.pth written), which then ends normally, not as stopped (143). Earlier, it stops at
    the step after the one it came with (whose loss is read one step late)."""
    from src.trainer import TrainingStopped
    data, proj = tmp_path / "prog", tmp_path / "proj"
    n = write_progressions(data, seed=11)
    assert train.main(["--train_stage", "1", "--proj_dir", str(proj), "--precision", "fp32", *as_flags(MODEL)]) == 0
    with pytest.raises(TrainingStopped, match=r"stopped by SIGTERM at step 7;"):
        train.main(tiny_flags(data, n, proj, epoch_count=2), callbacks=[TermAt(5)])
    assert not (proj / "rwkv-final.pth").exists()
    (proj / "rwkv-0.pth").unlink()
    (proj / "rwkv-0.state.pth").unlink()
    assert train.main(tiny_flags(data, n, proj, epoch_count=2), callbacks=[TermAt(7)]) == 0
    assert (proj / "rwkv-final.pth").is_file() and (proj / "rwkv-1.pth").is_file()
