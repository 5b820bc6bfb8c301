"""src/trainer.py pieces on their own: LR schedule values, checkpoint discovery, atomic saves, spikes, plot."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from src.trainer import (RunPlan, Schedule, StepLoss, TrainingError, TrainingMonitor, _remove_older_states,
                         find_resume_checkpoint, load_resume_state, plot_main, plot_train_log, read_train_log,
                         remove_stale_temporaries, save_atomic, state_path)


def schedule(**over: float) -> Schedule:
    kw = dict(lr_init=1e-3, lr_final=1e-4, warmup_steps=10, tokens_per_step=1000, exit_tokens=110_000)
    kw.update(over)
    return Schedule(**kw)


def test_schedule_at_known_points() -> None:
    s = schedule()
    # warmup: 0.01 + 0.99 * k / 10 of the cosine value, which is still lr_init (progress 0 until warmup ends)
    assert s.lr(0, 0) == pytest.approx(1e-5, rel=1e-12)
    assert s.lr(5, 5) == pytest.approx(1e-3 * 0.505, rel=1e-12)
    assert s.lr(10, 10) == pytest.approx(1e-3, rel=1e-12)
    # cosine in tokens over (110000 - 10000): half way the mean of the two rates, at the end lr_final
    assert s.lr(60, 60) == pytest.approx(5.5e-4, rel=1e-12)
    assert s.lr(35, 35) == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-12)
    assert s.lr(110, 110) == pytest.approx(1e-4, rel=1e-12)
    assert s.lr(500, 500) == pytest.approx(1e-4, rel=1e-12)           # clipped past the end
    # the warmup follows the optimizer's own steps: a weights-only restart at step 60 warms up again
    assert s.lr(60, 0) == pytest.approx(5.5e-4 * 0.01, rel=1e-12)
    assert s.lr(60, 9) == pytest.approx(5.5e-4 * (0.01 + 0.99 * 0.9), rel=1e-12)


def test_schedule_edge_cases() -> None:
    assert schedule(lr_final=1e-3).lr(77, 77) == pytest.approx(1e-3, rel=1e-12)      # constant
    assert schedule(warmup_steps=0).lr(0, 0) == pytest.approx(1e-3, rel=1e-12)        # no warmup
    assert schedule(lr_final=0.0).lr(110, 110) == 0.0
    # a run shorter than its warmup sits at lr_final (times the warmup factor)
    assert schedule(exit_tokens=5000).lr(3, 3) == pytest.approx(1e-4 * (0.01 + 0.99 * 0.3), rel=1e-12)
    # a run exactly as long as its warmup (10 steps x 1000 tokens): no cosine span, lr_final, no division by zero
    assert schedule(exit_tokens=10_000).lr(10, 10) == pytest.approx(1e-4, rel=1e-12)
    assert schedule(exit_tokens=10_000).lr(4, 4) == pytest.approx(1e-4 * (0.01 + 0.99 * 0.4), rel=1e-12)


def test_find_resume_checkpoint_picks_the_highest_number(tmp_path: Path) -> None:
    assert find_resume_checkpoint(tmp_path / "missing") == (None, -1)
    assert find_resume_checkpoint(tmp_path) == (None, -1)
    (tmp_path / "rwkv-init.pth").write_bytes(b"x")
    assert find_resume_checkpoint(tmp_path) == (tmp_path / "rwkv-init.pth", -1)
    for name in ("rwkv-2.pth", "rwkv-10.pth", "rwkv-9.pth", "rwkv-final.pth", "rwkv-11.state.pth",
                 ".rwkv-12.pth.tmp4242", "rwkv-13.pth.bak", "rwkv-x.pth"):
        (tmp_path / name).write_bytes(b"x")
    assert find_resume_checkpoint(tmp_path) == (tmp_path / "rwkv-10.pth", 10)   # numeric, not 9 > 10 as text


def test_save_atomic_never_leaves_a_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "rwkv-3.pth"
    save_atomic({"a": torch.arange(3)}, path)
    with pytest.raises(Exception):
        save_atomic({"a": lambda: 0}, path)           # cannot be pickled: fails half way
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rwkv-3.pth"]


def test_save_atomic_writers_of_one_file_do_not_mix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes with the same pid (the first process of each node in identical containers) saving
    the same checkpoint at once: simulated by a second save starting inside the first one's torch.save."""
    path = tmp_path / "rwkv-final.pth"
    monkeypatch.setattr(os, "getpid", lambda: 1)
    real_save = torch.save
    inner_done = []

    def save_with_a_second_writer(obj, f, *a, **k):
        if not inner_done:
            inner_done.append(True)
            save_atomic({"w": torch.full((4,), 2.0)}, path)   # the other node, same pid, same file
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_with_a_second_writer)
    save_atomic({"w": torch.full((4,), 1.0)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.full((4,), 1.0))   # whole, the last one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rwkv-final.pth"]


def test_save_atomic_gives_checkpoints_the_usual_permissions(tmp_path: Path) -> None:
    """Mode 0o666 less the umask, as a plain open() gives (readable by the group on a shared project
    folder), not tempfile.mkstemp's owner-only 0o600."""
    old = os.umask(0o022)
    try:
        save_atomic({"w": torch.zeros(2)}, tmp_path / "rwkv-0.pth")
    finally:
        os.umask(old)
    assert (tmp_path / "rwkv-0.pth").stat().st_mode & 0o777 == 0o644


def test_temporaries_of_killed_saves_are_removed_and_nothing_else(tmp_path: Path) -> None:
    """A save killed before os.replace leaves save_atomic's temporary: found by its name and age only."""
    stale = [tmp_path / ".rwkv-3.pth.0123456789abcdef.tmp", tmp_path / ".rwkv-3.state.pth.fedcba9876543210.tmp",
             tmp_path / ".rwkv-final.pth.00000000ffffffff.tmp"]
    kept = [tmp_path / "rwkv-3.pth", tmp_path / "rwkv-3.state.pth", tmp_path / "train_log.txt",
            tmp_path / ".rwkv-4.pth.0123456789abcdef.tmp",    # being written right now: too young
            tmp_path / ".rwkv-3.pth.0123.tmp", tmp_path / "notes.rwkv-3.pth.0123456789abcdef.tmp",
            tmp_path / ".train_log.svg.tmp123"]
    old = time.time() - 600
    for p in stale + kept:
        p.write_bytes(b"x")
        if p.name != ".rwkv-4.pth.0123456789abcdef.tmp":
            os.utime(p, (old, old))
    (tmp_path / ".rwkv-5.pth.0123456789abcdef.tmp").mkdir()   # a folder is not ours
    os.utime(tmp_path / ".rwkv-5.pth.0123456789abcdef.tmp", (old, old))
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in kept] +
                                                                [".rwkv-5.pth.0123456789abcdef.tmp"])
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_resume_state_must_fit_the_run(tmp_path: Path) -> None:
    plan = RunPlan(proj_dir=tmp_path, ctx_len=32, real_bsz=4, world_size=1, epoch_steps=5, start_step=10, total_steps=50,
                   epoch_save=1)
    weights = tmp_path / "rwkv-1.pth"
    assert load_resume_state(weights, plan) == (None, "rwkv-1.state.pth not found")
    state = {"format": 1, "step": 10, "warm_step": 10, "plan": plan.resume_key(), "world_size": 2,
             "optimizer": {}, "deepspeed_dir": None}
    save_atomic(state, state_path(weights))
    assert load_resume_state(weights, plan)[0] == state
    # the weights it was saved with: a rwkv-N.pth copied in from another run does not get this run's moments
    save_atomic({**state, "weights": (0.25, 3.0)}, state_path(weights))
    assert load_resume_state(weights, plan, fingerprint=(0.25 + 1e-13, 3.0))[0] is not None
    assert load_resume_state(weights, plan, fingerprint=(0.25, 3.0001)) == (
        None, "rwkv-1.state.pth was saved with other weights than rwkv-1.pth (copied from another run?)")
    save_atomic(state, state_path(weights))
    assert load_resume_state(weights, plan, fingerprint=(0.25, 3.0))[0] == state   # states saved before: no check
    # another batch size with mini-epochs of the same samples (the default epoch_steps, 40320 // real_bsz): the
    # run continues at the right sample, with weights only
    save_atomic({**state, "plan": {**plan.resume_key(), "real_bsz": 8, "epoch_steps": 5}}, state_path(weights))
    halved = dataclasses.replace(plan, epoch_steps=10, start_step=20)
    got, why = load_resume_state(weights, halved)
    assert got is None and "'real_bsz': 8" in why and "'real_bsz': 4" in why
    # a batch size or mini-epoch length that moves the mini-epoch boundaries would skip or repeat data: refused
    with pytest.raises(TrainingError, match=r"rwkv-1.pth was saved after 80 samples \(10 steps of 8\), but these flags "
                                            r"make mini-epochs of 5 steps of 4, so the run would continue at sample 40 "
                                            r"and skip or repeat data. Keep its mini-epochs of 40 samples "
                                            r"\(--epoch_steps 10\), or start another --proj_dir with --load_model"):
        load_resume_state(weights, plan)
    save_atomic(state, state_path(weights))
    with pytest.raises(TrainingError, match=r"after 40 samples .* mini-epochs of 2 steps of 4, so the run would "
                                            r"continue at sample 16 .* \(--epoch_steps 5\)"):
        load_resume_state(weights, dataclasses.replace(plan, epoch_steps=2, start_step=4))
    # the same data type on another file: a note; another data type: refused (an SFT command in a pretrain folder)
    save_atomic({**state, "data": ["/d/pretrain", "binidx"]}, state_path(weights))
    assert load_resume_state(weights, dataclasses.replace(plan, data=("/d/pretrain", "binidx")))[0] is not None
    with pytest.warns(UserWarning, match="rwkv-1.pth was trained on /d/pretrain; its run continues on /d/more"):
        assert load_resume_state(weights, dataclasses.replace(plan, data=("/d/more", "binidx")))[0] is not None
    with pytest.raises(TrainingError, match=rf"{tmp_path} holds a run on binidx data \(/d/pretrain\); this command "
                                            r"trains on sft data \(/d/sft\)\. Continue that run with its own data"):
        load_resume_state(weights, dataclasses.replace(plan, data=("/d/sft", "sft")))
    save_atomic(state, state_path(weights))
    # a state file that cannot be read (cut short) or holds something else: weights only, saying why
    state_path(weights).write_bytes(b"PK\x03\x04 cut short")
    got, why = load_resume_state(weights, plan)
    assert got is None and why.startswith("rwkv-1.state.pth cannot be read (")
    state_path(weights).write_bytes(b"")   # torch.load raises EOFError with an empty message here
    assert load_resume_state(weights, plan) == (None, "rwkv-1.state.pth cannot be read (EOFError: )")
    save_atomic([1, 2], state_path(weights))
    assert load_resume_state(weights, plan) == (None, "rwkv-1.state.pth has format list, this code reads 1")
    # a state file of another format version is not read
    save_atomic({**state, "format": 2}, state_path(weights))
    assert load_resume_state(weights, plan) == (None, "rwkv-1.state.pth has format 2, this code reads 1")
    save_atomic({**state, "step": 15}, state_path(weights))
    assert load_resume_state(weights, plan) == (None, "rwkv-1.state.pth is at step 15, rwkv-1.pth ends at step 10")
    # DeepSpeed's optimizer state and torch's are not interchangeable: weights only, either way
    ds_plan = dataclasses.replace(plan, deepspeed=True)
    save_atomic(state, state_path(weights))
    assert load_resume_state(weights, ds_plan) == (
        None, "rwkv-1.state.pth holds the optimizer state of a run without DeepSpeed, this run is with it")
    save_atomic({**state, "deepspeed_dir": "rwkv-1.ds"}, state_path(weights))
    assert load_resume_state(weights, plan) == (
        None, "rwkv-1.state.pth holds the optimizer state of a run with DeepSpeed, this run is without it")
    # DeepSpeed's shards belong to their world size (a torch optimizer's state above did not care: 2 vs 1)
    assert load_resume_state(weights, ds_plan) == (None, "its DeepSpeed folder rwkv-1.ds is missing")
    (tmp_path / "rwkv-1.ds").mkdir()
    assert load_resume_state(weights, ds_plan) == (
        None, "its DeepSpeed optimizer shards come from 2 processes, this run has 1")
    # ... in either direction: fewer processes than this run's are no better
    assert load_resume_state(weights, dataclasses.replace(ds_plan, world_size=4)) == (
        None, "its DeepSpeed optimizer shards come from 2 processes, this run has 4")
    assert load_resume_state(weights, dataclasses.replace(ds_plan, world_size=2))[0] == {**state, "deepspeed_dir": "rwkv-1.ds"}


def feed(monitor: TrainingMonitor, losses: list[float]) -> list[str]:
    """Track one step per loss (lr 0) as the training loop would; returns the spike warnings."""
    with pytest.warns(UserWarning) as caught:
        for loss in losses:
            monitor.step += 1
            monitor.run_steps += 1
            monitor._track(StepLoss.start(monitor.step, monitor.run_steps, 0.0, torch.tensor(loss)))
    return [str(w.message) for w in caught if "spike" in str(w.message)]


def test_spikes_are_reported_with_their_step(tmp_path: Path) -> None:
    plan = RunPlan(proj_dir=tmp_path, ctx_len=8, real_bsz=2, world_size=1, epoch_steps=1000, start_step=0, total_steps=10_000,
                   epoch_save=1)
    monitor = TrainingMonitor(plan, schedule(), header=[])
    gen = torch.Generator().manual_seed(0)
    losses = (2.0 + 0.2 * torch.rand(150, generator=gen)).tolist() + [5.0, 2.1, 2.05]
    spikes = feed(monitor, losses)
    ema = losses[0]
    for loss in losses[1:150]:
        ema = 0.99 * ema + 0.01 * loss      # the running mean: ~100 steps
    assert spikes == [f"loss spike at step 151: 5.0000 vs running mean {ema:.4f} (lr 0.000e+00)"]
    assert monitor.epoch.spikes == 1 and monitor.epoch.steps == len(losses)
    assert monitor.progress["loss"] == pytest.approx(sum(losses) / len(losses))


def test_no_spike_warning_before_the_running_mean_has_its_steps(tmp_path: Path) -> None:
    """A loss of 3x the running mean is a spike only after SPIKE_MIN_STEPS (100) steps of this run."""
    plan = RunPlan(proj_dir=tmp_path, ctx_len=8, real_bsz=2, world_size=1, epoch_steps=1000, start_step=500,
                   total_steps=10_000, epoch_save=1)
    monitor = TrainingMonitor(plan, schedule(), header=[])
    losses = [1.0] * 99 + [3.0, 3.0]     # run steps 100 (too early to judge) and 101 (judged)
    spikes = feed(monitor, losses)
    assert spikes == ["loss spike at step 601: 3.0000 vs running mean 1.0200 (lr 0.000e+00)"]
    assert monitor.epoch.spikes == 1


def test_older_resume_states_are_removed_but_their_weights_stay(tmp_path: Path) -> None:
    """After rwkv-3.pth and its state are saved: older .state.pth files and DeepSpeed .ds folders go,
    every rwkv-N.pth, rwkv-init/final and anything not named like a state stays."""
    for name in ("rwkv-init.pth", "rwkv-0.pth", "rwkv-0.state.pth", "rwkv-2.pth", "rwkv-2.state.pth",
                 "rwkv-3.pth", "rwkv-3.state.pth", "rwkv-12.state.pth", "rwkv-final.pth", "rwkv-1.state.pth.bak",
                 "train_log.txt"):
        (tmp_path / name).write_bytes(b"x")
    for folder in ("rwkv-0.ds", "rwkv-2.ds", "rwkv-3.ds"):
        (tmp_path / folder / "state").mkdir(parents=True)
        (tmp_path / folder / "state" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    _remove_older_states(tmp_path / "rwkv-3.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["rwkv-init.pth", "rwkv-0.pth", "rwkv-2.pth", "rwkv-3.pth", "rwkv-3.state.pth", "rwkv-3.ds",
         "rwkv-12.state.pth", "rwkv-final.pth", "rwkv-1.state.pth.bak", "train_log.txt"])
    assert (tmp_path / "rwkv-3.ds" / "state" / "mp_rank_00_model_states.pt").is_file()


def test_loss_curve_svg(tmp_path: Path) -> None:
    log = tmp_path / "train_log.txt"
    log.write_text("# run header\n#   lr_init = 0.001\n"
                   "epoch 0 loss 4.000000 ppl 54.5982 lr 1e-03 time 2026-01-01T00:00:00+00:00 elapsed 1.0 steps 10 "
                   "tokens 1000 kt/s 1.00 spikes 0\n"
                   "epoch 1 loss 3.000000 ppl 20.0855 lr 9e-04 time 2026-01-01T00:00:01+00:00 elapsed 1.0 steps 20 "
                   "tokens 2000 kt/s 1.00 spikes 0\n"
                   "epoch 2 loss 2.500000 ppl 12.1825 lr 5e-04 time 2026-01-01T00:00:02+00:00 elapsed 1.0 steps 25 "
                   "tokens 2500 kt/s 1.00 spikes 0 partial 1\n")
    rows = read_train_log(log)
    assert [r["loss"] for r in rows] == [4.0, 3.0, 2.5] and rows[2]["partial"] == 1.0
    svg = plot_train_log(log).read_text()
    points = [tuple(map(float, p.split(","))) for p in re.search(r'points="([^"]+)"', svg).group(1).split()]
    assert len(points) == 3
    xs, ys = zip(*points)
    assert xs[0] < xs[1] < xs[2] and ys[0] < ys[1] < ys[2]   # later = right, lower loss = further down
    assert "2500 tokens" in svg and "4.000" in svg and "2.500" in svg


def test_ctrl_c_says_where_a_rerun_continues(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plan = RunPlan(proj_dir=tmp_path, ctx_len=8, real_bsz=2, world_size=1, epoch_steps=50, start_step=0,
                   total_steps=1000, epoch_save=1)
    monitor = TrainingMonitor(plan, schedule(), header=[])
    monitor.step = 132
    rank0 = SimpleNamespace(is_global_zero=True)
    (tmp_path / "rwkv-init.pth").write_bytes(b"x")
    monitor.on_exception(rank0, None, KeyboardInterrupt())
    assert "interrupted at step 132; rerun the same command and it starts again (nothing was saved in this run yet)" in capsys.readouterr().out
    (tmp_path / "rwkv-0.pth").write_bytes(b"x")
    (tmp_path / "rwkv-1.pth").write_bytes(b"x")
    monitor.on_exception(rank0, None, KeyboardInterrupt())
    assert f"rerun the same command and it continues from {tmp_path / 'rwkv-1.pth'} (step 100)" in capsys.readouterr().out
    monitor.on_exception(SimpleNamespace(is_global_zero=False), None, KeyboardInterrupt())   # other ranks: quiet
    monitor.on_exception(rank0, None, ValueError("x"))                                      # errors speak for themselves
    assert capsys.readouterr().out == ""


def test_plot_command_names_a_wrong_file_instead_of_a_traceback(tmp_path, capsys):
    """`python -m src.trainer FILE`, as README gives it: a missing file was a traceback, a file that is not a
    train_log.txt silently became an empty plot."""
    assert plot_main([str(tmp_path / "nope.txt")]) == 2 and "nope.txt: no such file" in capsys.readouterr().err
    (tmp_path / "data.jsonl").write_text('{"text": "x"}\n')
    assert plot_main([str(tmp_path / "data.jsonl")]) == 2 and "no mini-epoch lines" in capsys.readouterr().err
    assert not (tmp_path / "data.svg").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.txt").write_text("# run header\nepoch 0 loss 5.0 ppl 148.4 lr 1e-3 time t elapsed 1 tokens 100\n"
                                       "epoch 1 loss 4.0 ppl 54.6 lr 9e-4 time t elapsed 1 tokens 200\n")
    assert plot_main([str(run)]) == 0 and (run / "train_log.svg").is_file()   # a proj_dir works too
    capsys.readouterr()
    assert plot_main(["--help"]) == 0 and capsys.readouterr().out.startswith("usage: python -m src.trainer")
    assert plot_main([]) == 2 and capsys.readouterr().err.startswith("usage: python -m src.trainer")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_loss_stops_training_at_its_step(tmp_path: Path, bad: float) -> None:
    """NaN and +-inf alike (an fp16 overflow gives inf): TrainingError naming the step, its mini-epoch and lr."""
    plan = RunPlan(proj_dir=tmp_path, ctx_len=8, real_bsz=2, world_size=1, epoch_steps=4, start_step=8,
                   total_steps=40, epoch_save=1)
    monitor = TrainingMonitor(plan, schedule(), header=[])
    monitor._track(StepLoss.start(9, 1, 2e-4, torch.tensor([2.5, 0.0])))
    with pytest.raises(TrainingError, match=rf"loss is {bad} at step 10 \(mini-epoch 2, lr 3\.000e-04\); nothing "
                                            "was saved after it"):
        monitor._track(StepLoss.start(10, 2, 3e-4, torch.tensor([bad, 0.0])))
    assert monitor.epoch.steps == 1 and monitor.epoch.loss_sum == 2.5   # the bad loss is not averaged in


def test_stop_request_of_any_rank_is_seen_in_the_rank_mean(tmp_path: Path) -> None:
    """The stop flag travels as the rank mean of 0/1 flags: a SIGTERM to one rank of four gives 0.25,
    which must stop every rank (at the step it arrived with), as a signal to all of them does."""
    assert not StepLoss.start(3, 3, 0.0, torch.tensor([2.0])).stop_requested()      # no flag at all
    assert not StepLoss.start(3, 3, 0.0, torch.tensor([2.0, 0.0])).stop_requested()
    for mean in (0.25, 0.5, 1.0):
        assert StepLoss.start(3, 3, 0.0, torch.tensor([2.0, mean])).stop_requested(), mean
    plan = RunPlan(proj_dir=tmp_path, ctx_len=8, real_bsz=2, world_size=4, epoch_steps=4, start_step=0,
                   total_steps=40, epoch_save=1)
    monitor = TrainingMonitor(plan, schedule(), header=[])
    monitor._track(StepLoss.start(5, 5, 0.0, torch.tensor([2.0, 0.0])))
    monitor._track(StepLoss.start(6, 6, 0.0, torch.tensor([2.0, 0.25])))
    monitor._track(StepLoss.start(7, 7, 0.0, torch.tensor([2.0, 1.0])))
    assert monitor._stop_at == 6


def test_ranks_that_would_resume_differently_refuse_to_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank reads its own resume state: two ranks at the same step whose Adam moments are at another
    warmup step (or one of them without moments at all) would train on different learning rates; the
    start check compares those too, not only steps and batch sizes."""
    plan = RunPlan(proj_dir=tmp_path, ctx_len=8, real_bsz=4, world_size=2, epoch_steps=4, start_step=8,
                   total_steps=40, epoch_save=1)
    state = {"format": 1, "step": 8, "warm_step": 8, "plan": plan.resume_key(), "world_size": 2,
             "optimizer": {}, "deepspeed_dir": None}
    monitor = TrainingMonitor(plan, schedule(), header=[], resume=state)
    dist = torch.distributed
    others: list[list[int]] = []

    def all_gather(out: list[torch.Tensor], mine: torch.Tensor) -> None:
        out[0].copy_(mine)
        out[1].copy_(torch.tensor(others[-1], dtype=mine.dtype))

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    rank0 = SimpleNamespace(device=torch.device("cpu"))
    others.append([8, 40, 4, 4, 8, 8, 1])            # the same start: fine
    monitor._check_ranks_agree(None, rank0)
    others.append([8, 40, 4, 4, 8, 5, 1])            # another warmup step
    with pytest.raises(TrainingError, match=r"rank 0 at step 8 of 40 \(exact resume, warmup step 8\).*rank 1 at "
                                            r"step 8 of 40 \(exact resume, warmup step 5\)"):
        monitor._check_ranks_agree(None, rank0)
    others.append([8, 40, 4, 4, 8, 8, 0])            # no optimizer state on rank 1
    with pytest.raises(TrainingError, match=r"rank 1 at step 8 of 40 \(weights only, warmup step 8\)"):
        monitor._check_ranks_agree(None, rank0)
