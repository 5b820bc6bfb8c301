"""train.py on one GPU with DeepSpeed ZeRO-2 in bf16 (the published setting): learns, saves, resumes exactly;
ZeRO-3 and the CPU-offload variants train like it.

Skipped without a CUDA/ROCm device. Tiny model (L2-D128, head size 64 for the kernel) at ctx 32.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from src.model import RWKV, ModelConfig
from src.trainer import read_train_log
from tests.test_train_run import CTX, as_flags, largest_magic_prime, run_and_kill, run_cli, write_progressions

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")]
GPU_MODEL = dict(n_layer=2, n_embd=128, head_size=64, vocab_size=64)
EPOCHS = 8   # mini-epochs of 5 steps: long enough to kill a run between its saves


def gpu_flags(data: Path, n: int, proj: Path, **over: object) -> list[str]:
    flags: dict[str, object] = dict(
        proj_dir=proj, data_file=data, ctx_len=CTX, micro_bsz=8, epoch_steps=5, epoch_count=EPOCHS, my_exit_tokens=0,
        magic_prime=largest_magic_prime(n, CTX), lr_init=3e-3, lr_final=3e-4, warmup_steps=3, precision="bf16",
        accelerator="gpu", strategy="deepspeed_stage_2", ds_bucket_mb=2, enable_progress_bar="False", **GPU_MODEL)
    flags.update(over)
    return as_flags(flags)


@pytest.fixture(scope="module")
def zero2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, Path, list[dict[str, float]]]:
    """The data, its token count, proj_dir and train_log rows of an uninterrupted ZeRO-2 bf16 run from
    rwkv-init.pth: the reference the other strategies and the resumed run are held to."""
    tmp = tmp_path_factory.mktemp("zero2")
    data, full = tmp / "prog", tmp / "full"
    n = write_progressions(data, n_docs=600, seed=21)
    r = run_cli(["--train_stage", "1", "--proj_dir", str(full), "--precision", "bf16",
                 *as_flags(GPU_MODEL)])
    assert r.returncode == 0, r.stderr
    r = run_cli(gpu_flags(data, n, full))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = read_train_log(full / "train_log.txt")
    assert len(rows) == EPOCHS and rows[-1]["loss"] < rows[0]["loss"] - 0.5, rows
    return data, n, full, rows


def test_deepspeed_bf16_trains_saves_and_resumes_exactly(zero2, tmp_path: Path) -> None:
    data, n, full, rows = zero2
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(full / "rwkv-init.pth", killed / "rwkv-init.pth")

    # weights: SPEC keys, bf16 as DeepSpeed trains them; the optimizer state is DeepSpeed's own folder,
    # and only the newest one is kept
    sd = torch.load(full / "rwkv-final.pth", weights_only=True)
    model = RWKV(ModelConfig(**GPU_MODEL))
    assert list(sd) == list(model.state_dict()) and all(v.dtype == torch.bfloat16 for v in sd.values())
    last = EPOCHS - 1
    assert torch.load(full / f"rwkv-{last}.state.pth")["deepspeed_dir"] == f"rwkv-{last}.ds"
    assert sorted(p.name for p in full.iterdir() if p.name.endswith((".ds", ".state.pth"))) == \
        [f"rwkv-{last}.ds", f"rwkv-{last}.state.pth"]

    # the same run killed (SIGKILL: no cleanup) once rwkv-1.pth exists resumes from its newest state
    # to the uninterrupted run's numbers
    run_and_kill(gpu_flags(data, n, killed), killed / "rwkv-1.pth")
    # resume goes on from the highest rwkv-N.pth, whose state is kept until a newer rwkv-N.pth is written
    newest = max(int(p.stem.split("-")[1]) for p in killed.glob("rwkv-[0-9]*.pth") if ".state" not in p.name)
    assert 1 <= newest < EPOCHS - 1 and (killed / f"rwkv-{newest}.ds").is_dir(), newest
    r = run_cli(gpu_flags(data, n, killed))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert f"exact resume with optimizer state rwkv-{newest}.state.pth" in (killed / "train_log.txt").read_text()
    again = read_train_log(killed / "train_log.txt")[-(EPOCHS - 1 - newest):]   # the resumed run's lines
    assert [int(x["epoch"]) for x in again] == list(range(newest + 1, EPOCHS))
    for a, b in zip(rows[newest + 1:], again):
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-3)


@pytest.mark.parametrize("strategy", ["deepspeed_stage_3", "deepspeed_stage_2_offload", "deepspeed_stage_3_offload"])
def test_zero3_and_offload_train_like_zero2(zero2, strategy: str, tmp_path: Path) -> None:
    """ZeRO-3 (parameters partitioned: the saved weights must be gathered) and the CPU-offload variants
    (DeepSpeedCPUAdam) do the same training as ZeRO-2: the same losses up to bf16 rounding, and
    complete, finite checkpoints in SPEC's keys and shapes."""
    data, n, full, rows = zero2
    proj = tmp_path / strategy
    proj.mkdir()
    shutil.copy(full / "rwkv-init.pth", proj / "rwkv-init.pth")
    r = run_cli(gpu_flags(data, n, proj, strategy=strategy))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    got = read_train_log(proj / "train_log.txt")
    assert len(got) == EPOCHS
    for a, b in zip(rows, got):
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)
        assert b["loss"] == pytest.approx(a["loss"], abs=0.05), (rows, got)
    reference = RWKV(ModelConfig(**GPU_MODEL)).state_dict()
    init = torch.load(proj / "rwkv-init.pth", weights_only=True)
    for name in ("rwkv-1.pth", "rwkv-final.pth"):
        sd = torch.load(proj / name, weights_only=True)
        assert list(sd) == list(reference), name
        for k, v in sd.items():
            assert v.shape == reference[k].shape, (name, k, tuple(v.shape))   # gathered, not a ZeRO-3 shard
            assert torch.isfinite(v.float()).all(), (name, k)
    final = torch.load(proj / "rwkv-final.pth", weights_only=True)
    assert not torch.equal(final["blocks.0.att.receptance.weight"].float(), init["blocks.0.att.receptance.weight"].float())


def test_step_loss_is_read_without_waiting_for_later_work() -> None:
    """TrainingMonitor reads a step's loss one step late; the read must wait for that loss only, not
    for the next step already queued on the stream (else the CPU could not run ahead)."""
    from src.trainer import StepLoss

    x = torch.randn(1024, device="cuda")
    entry = StepLoss.start(step=1, run_step=1, lr=1e-3, loss=(x * x).mean())
    expected = float((x.double() ** 2).mean())
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU work queued after the loss
    assert entry.value() == pytest.approx(expected, rel=1e-5)
    assert not torch.cuda.current_stream().query(), "value() waited for work queued after the loss"
    torch.cuda.synchronize()
