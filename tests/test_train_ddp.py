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
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

import train
from tests.test_train_run import (CTX, MICRO_BSZ, MODEL, as_flags, largest_magic_prime, tiny_flags,
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
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))

    def on_exception(self, trainer, pl_module, exception) -> None:   # a stopped run: what it trained
        self.on_train_end(trainer, pl_module)


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
                       env={**os.environ, "MASTER_PORT": str(20000 + os.getpid() % 20000)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    ranks = [json.loads((rec / f"rank{k}.json").read_text()) for k in (0, 1)]
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

    env = {**os.environ, "MASTER_PORT": str(20000 + (os.getpid() + 1) % 20000)}
    r = subprocess.run(command(tmp_path / "a", tmp_path / "rec_a"), cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    full = [json.loads((tmp_path / "rec_a" / f"rank{k}.json").read_text())["rows"] for k in (0, 1)]

    proj = tmp_path / "b"
    with open(tmp_path / "b.out", "w") as out:   # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(command(proj, tmp_path / "rec_b"), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)   # its own process group: both ranks
        try:
            while not (proj / "rwkv-1.pth").exists() and proc.poll() is None:
                time.sleep(0.005)
            os.killpg(proc.pid, signal.SIGTERM)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:   # hung: end both ranks (this test's own process group)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    said = (tmp_path / "b.out").read_text()
    assert rc == 128 + signal.SIGTERM, said[-3000:]
    assert "stopped by SIGTERM at step" in said and "rerun the same command and it continues from" in said
    stopped = [json.loads((tmp_path / "rec_b" / f"rank{k}.json").read_text())["rows"] for k in (0, 1)]
    assert 8 <= len(stopped[0]) == len(stopped[1]) < epochs * EPOCH_STEPS    # the same step on both ranks
    assert not (proj / "rwkv-final.pth").exists()
    last = max(int(p.stem.split("-")[1]) for p in proj.glob("rwkv-[0-9]*.pth") if ".state" not in p.name)

    r = subprocess.run(command(proj, tmp_path / "rec_c"), cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"exact resume with optimizer state rwkv-{last}.state.pth" in (proj / "train_log.txt").read_text()
    done = (last + 1) * EPOCH_STEPS
    for k in (0, 1):
        again = json.loads((tmp_path / "rec_c" / f"rank{k}.json").read_text())["rows"]
        assert len(again) == epochs * EPOCH_STEPS - done
        assert [row["x"] for row in again] == [row["x"] for row in full[k][done:]]
        assert [row["loss"] for row in again] == [row["loss"] for row in full[k][done:]]   # bit for bit


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
    port = 20000 + (os.getpid() + 2) % 20000

    def flags(proj: Path) -> list[str]:
        return tiny_flags(data, n, proj, num_nodes=2, devices=1, strategy="ddp", epoch_steps=EPOCH_STEPS,
                          epoch_count=2, load_model=init / "rwkv-init.pth")

    shared = tmp_path / "shared"
    for rc, said in run_two_nodes(tmp_path, flags(shared), port):
        assert rc == 0, said[-3000:]
    rows = read_train_log(shared / "train_log.txt")
    assert [r["tokens"] for r in rows] == [(e + 1) * EPOCH_STEPS * 2 * MICRO_BSZ * CTX for e in range(2)]

    # a relative --proj_dir on each node's own disk: node 0 holds rwkv-0.pth from an earlier run, node 1 nothing
    (tmp_path / "node0" / "local").mkdir()
    (tmp_path / "node0" / "local" / "rwkv-0.pth").write_bytes((shared / "rwkv-0.pth").read_bytes())
    for rc, said in run_two_nodes(tmp_path, flags(Path("local")), port + 1):
        assert rc == 2, said[-3000:]
        assert (f"error: the ranks do not agree where this run starts: rank 0 at step {EPOCH_STEPS} of "
                f"{2 * EPOCH_STEPS} (weights only" in said and "shared filesystem" in said), said[-3000:]
    assert not (tmp_path / "node0" / "local" / "rwkv-final.pth").exists()


if __name__ == "__main__":
    sys.exit(train.cli(sys.argv[2:], callbacks=[RankRecorder(Path(sys.argv[1]))]))
