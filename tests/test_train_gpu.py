"""train.py on one GPU with DeepSpeed ZeRO-2 in bf16 (the published setting): learns, saves, resumes exactly.

Skipped without a CUDA/ROCm device. Tiny model (L2-D128, head size 64 for the kernel) at ctx 32.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from src.model import RWKV, ModelConfig
from src.trainer import read_train_log
from tests.test_train_run import CTX, largest_magic_prime, run_cli, write_progressions

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")]
GPU_MODEL = dict(n_layer=2, n_embd=128, head_size=64, vocab_size=64)


def gpu_flags(data: Path, n: int, proj: Path, **over: object) -> list[str]:
    flags: dict[str, object] = dict(
        proj_dir=proj, data_file=data, ctx_len=CTX, micro_bsz=8, epoch_steps=5, epoch_count=3, my_exit_tokens=0,
        magic_prime=largest_magic_prime(n, CTX), lr_init=3e-3, lr_final=3e-4, warmup_steps=3, precision="bf16",
        accelerator="gpu", strategy="deepspeed_stage_2", ds_bucket_mb=2, enable_progress_bar="False", **GPU_MODEL)
    flags.update(over)
    return [s for k, v in flags.items() for s in (f"--{k}", str(v))]


def test_deepspeed_bf16_trains_saves_and_resumes_exactly(tmp_path: Path) -> None:
    data, full, resumed = tmp_path / "prog", tmp_path / "full", tmp_path / "resumed"
    n = write_progressions(data, n_docs=600, seed=21)
    r = run_cli(["--train_stage", "1", "--proj_dir", str(full), "--precision", "bf16",
                 *[s for k, v in GPU_MODEL.items() for s in (f"--{k}", str(v))]])
    assert r.returncode == 0, r.stderr
    r = run_cli(gpu_flags(data, n, full))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = read_train_log(full / "train_log.txt")
    assert len(rows) == 3 and rows[-1]["loss"] < rows[0]["loss"] - 0.5, rows

    # weights: SPEC keys, bf16 as DeepSpeed trains them; the optimizer state is DeepSpeed's own folder
    sd = torch.load(full / "rwkv-final.pth", weights_only=True)
    model = RWKV(ModelConfig(**GPU_MODEL))
    assert list(sd) == list(model.state_dict()) and all(v.dtype == torch.bfloat16 for v in sd.values())
    assert (full / "rwkv-0.ds").is_dir() and torch.load(full / "rwkv-0.state.pth")["deepspeed_dir"] == "rwkv-0.ds"

    # the state after mini-epoch 0 alone (as a killed run leaves it) resumes to the same losses
    resumed.mkdir()
    for name in ("rwkv-0.pth", "rwkv-0.state.pth"):
        shutil.copy(full / name, resumed / name)
    shutil.copytree(full / "rwkv-0.ds", resumed / "rwkv-0.ds")
    r = run_cli(gpu_flags(data, n, resumed))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "exact resume with optimizer state rwkv-0.state.pth" in (resumed / "train_log.txt").read_text()
    again = read_train_log(resumed / "train_log.txt")
    assert [int(x["epoch"]) for x in again] == [1, 2]
    for a, b in zip(rows[1:], again):
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-3)


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
