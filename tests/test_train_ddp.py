"""Two CPU processes (DDP over gloo) launched by Lightning from train.py's own code path.

The test runs this file as a program (`python -m tests.test_train_ddp RECORD_DIR TRAIN_FLAGS...`);
Lightning starts the second rank by running the same command again. Each rank records the batches it
trained on, and the test checks them against SPEC's sampler written out independently here.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

import train
from tests.test_train_run import (CTX, MICRO_BSZ, MODEL, as_flags, largest_magic_prime, tiny_flags, wait_for_file,
                                  write_progressions)
from tests.test_train_run import one_thread  # noqa: F401  (autouse fixture)
from src.trainer import read_train_log

REPO = Path(__file__).resolve().parents[1]
EPOCH_STEPS, EPOCH_COUNT = 4, 3


class RankRecorder(pl.Callback):
    """Writes RECORD_DIR/rank<R>.json: every batch's x and loss, the world size, a weight checksum and
    how many broadcasts the training steps made (Lightning polls for SIGTERM with one per step)."""

    def __init__(self, out: Path):
        self.out, self.rows, self.broadcasts = out, [], 0

    def on_train_start(self, trainer, pl_module) -> None:
        real = torch.distributed.broadcast

        def counted(*args, **kwargs):
            self.broadcasts += 1
            return real(*args, **kwargs)

        torch.distributed.broadcast = counted   # this program's own process, ended by the test

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append({"x": batch[0].tolist(), "loss": float(outputs["loss"])})

    def on_train_end(self, trainer, pl_module) -> None:
        record = {"rank": trainer.global_rank, "world": trainer.world_size, "rows": self.rows,
                  "head_sum": float(pl_module.head.weight.double().sum()), "broadcasts": self.broadcasts}
        path = self.out / f"rank{trainer.global_rank}.json"
        path.with_suffix(".tmp").write_text(json.dumps(record))
        os.replace(path.with_suffix(".tmp"), path)   # whole or absent for `read_record`

    def on_exception(self, trainer, pl_module, exception) -> None:   # a stopped run: what it trained
        self.on_train_end(trainer, pl_module)
        if trainer.global_rank == 0 and os.environ.get("RANK0_OUTLIVES_RANK1"):
            # Leave the stopped fit only after rank 1 has exited (with 143) and Lightning's child
            # observer in this process, polling every 5 s, has seen that: it must not take the stop for
            # a crash and SIGKILL this process (train._stop_aware_child_observer). Left to chance, rank 1
            # was out first in 7 of 12 runs on a loaded 2-core machine, by 12-509 ms: exit -9 about 1
            # run in 60 with Lightning's own observer.
            for child in trainer.strategy.launcher.procs:
                child.wait(timeout=120)
            time.sleep(6)


def read_record(rec: Path, rank: int, timeout: float = 120) -> dict:
    """RANK's record. The launching process (rank 0) does not wait for the rank it started: rank 1 may
    still be writing its record when the command has returned."""
    path = rec / f"rank{rank}.json"
    wait_for_file(path, None, timeout)
    return json.loads(path.read_text())


def free_port() -> int:
    """A TCP port that no socket holds now, picked by the OS. (A port computed from the pid clashed
    with anything else on the machine that held it: another test session, a service.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_start(p: int, step: int, m: int, rank: int, world: int) -> int:
    """SPEC section 3: item i = step * micro_bsz + m of `rank`; mini-epoch and index from the per-rank count."""
    samples_per_epoch = EPOCH_STEPS * MICRO_BSZ * world
    per_rank = samples_per_epoch // world
    i = step * MICRO_BSZ + m
    e, idx = i // per_rank, i % per_rank
    ii = 1 + e * samples_per_epoch + idx * world + rank
    factor = int(p * (math.sqrt(5) - 1) / 2)
    return (factor * ii ** 3 % p) * CTX


@pytest.mark.slow
def test_two_process_ddp_ranks_see_disjoint_samples_and_stop_together(tmp_path: Path) -> None:
    data, proj, rec = tmp_path / "prog", tmp_path / "proj", tmp_path / "rec"
    rec.mkdir()
    n = write_progressions(data, seed=11)
    p = largest_magic_prime(n, CTX)
    assert train.main(["--train_stage", "1", "--proj_dir", str(proj), "--precision", "fp32",
                       *as_flags(MODEL)]) == 0
    flags = tiny_flags(data, n, proj, devices=2, strategy="ddp", epoch_steps=EPOCH_STEPS, epoch_count=EPOCH_COUNT)
    r = subprocess.run([sys.executable, "-m", "tests.test_train_ddp", str(rec), *flags], cwd=REPO,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "MASTER_PORT": str(free_port())})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    ranks = [read_record(rec, k) for k in (0, 1)]
    assert [(d["rank"], d["world"]) for d in ranks] == [(0, 2), (1, 2)]
    steps = EPOCH_STEPS * EPOCH_COUNT
    assert [len(d["rows"]) for d in ranks] == [steps, steps]             # both stopped at the same step
    assert [d["broadcasts"] for d in ranks] == [0, 0]   # no per-step SIGTERM poll (a host sync on GPUs)
    tokens = np.fromfile(f"{data}.bin", dtype=np.uint16)
    starts: list[list[int]] = [[], []]
    for d in ranks:
        for s, row in enumerate(d["rows"]):
            for m, x in enumerate(row["x"]):
                start = expected_start(p, s, m, d["rank"], 2)
                assert x == tokens[start:start + CTX].tolist(), (d["rank"], s, m)
                starts[d["rank"]].append(start)
    assert not set(starts[0]) & set(starts[1])                                   # disjoint
    assert len(set(starts[0]) | set(starts[1])) == 2 * steps * MICRO_BSZ        # no window twice in the run
    assert ranks[0]["head_sum"] == ranks[1]["head_sum"]                    # gradients were averaged

    # rank 0 alone writes the log: one line per mini-epoch, its loss the mean over steps and ranks
    rows = read_train_log(proj / "train_log.txt")
    assert [int(x["epoch"]) for x in rows] == list(range(EPOCH_COUNT))
    for e, row in enumerate(rows):
        span = slice(e * EPOCH_STEPS, (e + 1) * EPOCH_STEPS)
        both = [(a["loss"] + b["loss"]) / 2 for a, b in zip(ranks[0]["rows"][span], ranks[1]["rows"][span])]
        assert row["loss"] == pytest.approx(sum(both) / len(both), abs=2e-6)
        assert row["tokens"] == (e + 1) * EPOCH_STEPS * 2 * MICRO_BSZ * CTX
    assert (proj / "rwkv-final.pth").is_file() and (proj / f"rwkv-{EPOCH_COUNT - 1}.state.pth").is_file()
    assert (proj / "train_log.txt").read_text().count("# run ") == 1


@pytest.mark.slow
def test_sigterm_stops_both_ranks_together_and_the_rerun_resumes_exactly(tmp_path: Path) -> None:
    """SIGTERM to the process group (as a scheduler's cancel or preemption sends it to every rank):
    both ranks stop at the same step, the run exits with 143 (not 0: it has not finished) instead of
    hanging in mismatched collectives, and rerunning the command continues from the newest rwkv-N.pth
    with the uninterrupted run's samples and losses on both ranks."""
    data = tmp_path / "prog"
    n = write_progressions(data, seed=12)
    init = tmp_path / "init"
    assert train.main(["--train_stage", "1", "--proj_dir", str(init), "--precision", "fp32", "--random_seed", "3",
                       *as_flags(MODEL)]) == 0
    epochs = 10

    def command(proj: Path, rec: Path) -> list[str]:
        rec.mkdir()
        return [sys.executable, "-m", "tests.test_train_ddp", str(rec),
                *tiny_flags(data, n, proj, devices=2, strategy="ddp", epoch_steps=EPOCH_STEPS, epoch_count=epochs,
                            load_model=init / "rwkv-init.pth")]

    env = {**os.environ, "MASTER_PORT": str(free_port())}
    r = subprocess.run(command(tmp_path / "a", tmp_path / "rec_a"), cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    full = [read_record(tmp_path / "rec_a", k)["rows"] for k in (0, 1)]

    proj = tmp_path / "b"
    with open(tmp_path / "b.out", "w") as out:   # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(command(proj, tmp_path / "rec_b"), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**env, "RANK0_OUTLIVES_RANK1": "1"},
                                start_new_session=True)   # its own process group: both ranks
        try:
            wait_for_file(proj / "rwkv-1.pth", proc)
            os.killpg(proc.pid, signal.SIGTERM)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:   # hung: end both ranks (this test's own process group)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    said = (tmp_path / "b.out").read_text()
    assert rc == 128 + signal.SIGTERM, said[-3000:]
    assert "stopped by SIGTERM at step" in said and "rerun the same command and it continues from" in said
    stopped = [read_record(tmp_path / "rec_b", k)["rows"] for k in (0, 1)]
    assert 8 <= len(stopped[0]) == len(stopped[1]) < epochs * EPOCH_STEPS    # the same step on both ranks
    assert not (proj / "rwkv-final.pth").exists()
    last = max(int(p.stem.split("-")[1]) for p in proj.glob("rwkv-[0-9]*.pth") if ".state" not in p.name)

    r = subprocess.run(command(proj, tmp_path / "rec_c"), cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"exact resume with optimizer state rwkv-{last}.state.pth" in (proj / "train_log.txt").read_text()
    done = (last + 1) * EPOCH_STEPS
    for k in (0, 1):
        again = read_record(tmp_path / "rec_c", k)["rows"]
        assert len(again) == epochs * EPOCH_STEPS - done
        assert [row["x"] for row in again] == [row["x"] for row in full[k][done:]]
        assert [row["loss"] for row in again] == [row["loss"] for row in full[k][done:]]   # bit for bit


class FakeChild:
    """A launched rank as Lightning's child observer sees it: poll() gives its exit status (None: running)."""

    def __init__(self, status: int | None):
        self.returncode, self.pid, self.signals = status, 0, []

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)


def test_child_observer_takes_a_sigterm_stop_for_an_end_and_a_crash_for_a_crash() -> None:
    """Rank 0's watch over the ranks it launched (every 5 s): a child out with 143 (TrainingStopped,
    which every rank raises at the same step) must not get rank 0 SIGKILLed while rank 0 is still
    leaving; a child that crashed still ends every rank. A sleeping process stands in for rank 0."""
    from lightning_fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
    from pytorch_lightning.strategies.launchers import subprocess_script as launcher

    observer = train._stop_aware_child_observer()
    assert observer is not None, "the installed Lightning has no child observer to replace"
    train._watch_child_ranks_but_not_their_stop()
    assert getattr(launcher._launch_process_observer, "stop_aware", False)   # what the DDP launcher starts

    def rank0() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])

    main = rank0()
    try:
        def run(cls: type, *statuses: int | None) -> tuple[bool, list[FakeChild]]:
            children = [FakeChild(s) for s in statuses]
            return cls(child_processes=children, main_pid=main.pid)._run(), children

        stopped = 128 + signal.SIGTERM
        assert run(observer, stopped, None)[0] is False and main.poll() is None    # rank 2 still leaving
        assert run(observer, stopped, 0)[0] is True and main.poll() is None        # all out: watch ends
        assert run(observer, None, None)[0] is False and main.poll() is None
        done, children = run(observer, stopped, 1)                                 # and a crash beside it
        assert done and main.wait(timeout=60) == -signal.SIGKILL
        assert [c.signals for c in children] == [[signal.SIGKILL]] * 2
        # the control: Lightning's own observer takes the stop for a crash and kills rank 0
        main = rank0()
        done, _ = run(_ChildProcessObserver, stopped, None)
        assert done and main.wait(timeout=60) == -signal.SIGKILL
    finally:
        main.kill()
        main.wait()


def run_two_nodes(tmp_path: Path, flags: list[str], port: int) -> list[tuple[int | None, str]]:
    """The same train.py command as NODE_RANK 0 and 1 (one process each, --num_nodes 2), each in its
    own working folder (so a relative --proj_dir is node-local); (exit status or None if hung, output)."""
    procs = []
    for node in (0, 1):
        where = tmp_path / f"node{node}"
        where.mkdir(exist_ok=True)
        out = open(where / "out.txt", "w")
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node)}
        procs.append((subprocess.Popen([sys.executable, str(REPO / "train.py"), *flags], cwd=where, stdout=out,
                                       stderr=subprocess.STDOUT, env=env), out))
    result = []
    for node, (proc, out) in enumerate(procs):
        try:
            rc = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            rc = None
            proc.kill()
            proc.wait()
        out.close()
        result.append((rc, (tmp_path / f"node{node}" / "out.txt").read_text()))
    return result


@pytest.mark.slow
def test_two_nodes_need_the_same_start_and_stop_at_once_when_they_differ(tmp_path: Path) -> None:
    """--num_nodes 2 (NODE_RANK 0 and 1, one process each): real_bsz counts both nodes. Each node
    finds its start in its own --proj_dir; where that is not the shared folder, the nodes start from
    different files: both stop with one message at once, instead of training different samples
    from different steps and hanging in a collective when the first one ends."""
    data = tmp_path / "prog"
    n = write_progressions(data, seed=13)
    init = tmp_path / "init"
    assert train.main(["--train_stage", "1", "--proj_dir", str(init), "--precision", "fp32",
                       *as_flags(MODEL)]) == 0

    def flags(proj: Path) -> list[str]:
        return tiny_flags(data, n, proj, num_nodes=2, devices=1, strategy="ddp", epoch_steps=EPOCH_STEPS,
                          epoch_count=2, load_model=init / "rwkv-init.pth")

    shared = tmp_path / "shared"
    for rc, said in run_two_nodes(tmp_path, flags(shared), free_port()):
        assert rc == 0, said[-3000:]
    rows = read_train_log(shared / "train_log.txt")
    assert [r["tokens"] for r in rows] == [(e + 1) * EPOCH_STEPS * 2 * MICRO_BSZ * CTX for e in range(2)]

    # a relative --proj_dir on each node's own disk: node 0 holds rwkv-0.pth from an earlier run, node 1 nothing
    (tmp_path / "node0" / "local").mkdir()
    (tmp_path / "node0" / "local" / "rwkv-0.pth").write_bytes((shared / "rwkv-0.pth").read_bytes())
    for rc, said in run_two_nodes(tmp_path, flags(Path("local")), free_port()):
        assert rc == 2, said[-3000:]
        assert (f"error: the ranks do not agree where this run starts: rank 0 at step {EPOCH_STEPS} of "
                f"{2 * EPOCH_STEPS} (weights only" in said and "shared filesystem" in said), said[-3000:]
    assert not (tmp_path / "node0" / "local" / "rwkv-final.pth").exists()


if __name__ == "__main__":
    sys.exit(train.cli(sys.argv[2:], callbacks=[RankRecorder(Path(sys.argv[1]))]))
