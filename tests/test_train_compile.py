"""--compile 1: the compiled time/channel mixes train the same model as eager ones (CPU; one GPU test).

Compilation of the tiny model takes ~30-60 s on a 2-core machine; the speed gain is measured in
benchmarks/bench_train.py, not here.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import train
from src.model import RWKV, ModelConfig
from src.trainer import TrainingError
from tests.test_train_run import MODEL, Recorder, as_flags, one_thread, tiny_flags, write_progressions  # noqa: F401

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="torch.compile on CPU needs a C++ compiler")


def test_compiled_model_trains_like_eager(tmp_path: Path) -> None:
    data = tmp_path / "prog"
    n = write_progressions(data, seed=5)
    init = tmp_path / "init"
    assert train.main(["--train_stage", "1", "--proj_dir", str(init), "--precision", "fp32", "--random_seed", "4",
                       *as_flags(MODEL)]) == 0
    runs = {}
    for compile_flag in (0, 1):
        rec = Recorder()
        proj = tmp_path / f"c{compile_flag}"
        flags = tiny_flags(data, n, proj, load_model=init / "rwkv-init.pth", epoch_count=2, epoch_save=0,
                           compile=compile_flag)
        assert train.main(flags, callbacks=[rec]) == 0
        runs[compile_flag] = ([r["loss"] for r in rec.rows],
                              torch.load(proj / "rwkv-final.pth", weights_only=True))
    (eager_loss, eager_sd), (comp_loss, comp_sd) = runs[0], runs[1]
    assert len(comp_loss) == len(eager_loss) == 8
    # Same batches, same init: the fused kernels only reorder float32 rounding.
    assert comp_loss == pytest.approx(eager_loss, rel=2e-4), (comp_loss, eager_loss)
    assert comp_loss[-1] < comp_loss[0] - 0.3            # and it did learn
    assert list(comp_sd) == list(eager_sd)               # SPEC's key names, untouched by compiling
    worst = max(float((comp_sd[k] - eager_sd[k]).abs().max()) for k in eager_sd)
    moved = max(float((eager_sd[k] - torch.load(init / "rwkv-init.pth", weights_only=True)[k]).abs().max())
                for k in eager_sd)
    assert worst < 1e-3 * moved + 1e-6, (worst, moved)


def test_compiled_model_keeps_state_dict_and_outputs() -> None:
    """ModelConfig(compile=1): same keys, same logits as eager (float64 check), and the layers share
    their compiled graphs (two variants of the time-mix projection, one readout, one channel mix;
    WKV7 is not compiled)."""
    torch.manual_seed(0)
    cfg = dict(n_layer=3, n_embd=64, head_size=32, vocab_size=97)
    eager = RWKV(ModelConfig(**cfg)).double()
    comp = RWKV(ModelConfig(**cfg, compile=1), init_weights=False).double()
    comp.load_state_dict(eager.state_dict())
    assert list(comp.state_dict()) == list(eager.state_dict())
    x = torch.randint(0, 97, (2, 32))
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        assert torch.allclose(comp(x), eager(x), rtol=1e-9, atol=1e-9)
    assert 0 < counters["stats"]["unique_graphs"] - graphs <= 4   # compiled, not once per layer


def test_compile_flag_checks_for_a_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    args = train.parse_args(["--accelerator", "cpu", "--compile", "1", "--precision", "fp32"])
    with pytest.raises(TrainingError, match="--compile 1 on CPU needs a C\\+\\+ compiler"):
        train.check_machine(args)


@pytest.mark.parametrize("accelerator", ["cpu", "gpu"])
def test_compile_flag_checks_for_the_python_headers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     accelerator: str) -> None:
    """A system Python without its -dev package: the compile would fail in the C compiler at the first
    step; train.py says so before anything starts (triton's presence is not this test's business)."""
    import importlib.util
    import sysconfig

    assert (Path(sysconfig.get_path("include")) / "Python.h").is_file()   # this venv has them: no error
    train.check_machine(train.parse_args(["--accelerator", "cpu", "--compile", "1", "--precision", "fp32"]))
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *a, **k: str(tmp_path) if name == "include" else None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())      # "triton is installed"
    monkeypatch.setattr(train, "toolchain_problem", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)                   # for the gpu case
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    args = train.parse_args(["--accelerator", accelerator, "--compile", "1", "--precision", "fp32"])
    with pytest.raises(TrainingError, match=f"--compile 1 needs the Python headers, and {tmp_path}/Python.h is "
                                            r"missing: install them for Python 3\.\d+ \(e\.g\. apt-get install python3"):
        train.check_machine(args)


def test_compiled_bf16_gradients_are_finite_and_match_eager() -> None:
    """bf16 autocast (--precision bf16 on CPU) with compiling on, at T >= 128 (where inductor once
    produced NaN gradients when WKV7 was compiled too): gradients finite and close to eager ones."""
    torch.manual_seed(1)
    cfg = dict(n_layer=1, n_embd=128, head_size=64, vocab_size=97)
    eager = RWKV(ModelConfig(**cfg))
    comp = RWKV(ModelConfig(**cfg, compile=1), init_weights=False)
    comp.load_state_dict(eager.state_dict())
    x, y = torch.randint(0, 97, (2, 128)), torch.randint(0, 97, (2, 128))
    grads = []
    for model in (eager, comp):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[1].items():
        assert torch.isfinite(g).all(), name
        ref = grads[0][name]
        assert (g - ref).norm() <= 0.05 * ref.norm() + 1e-6, name   # bf16 rounding, not a wrong formula


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")
@pytest.mark.parametrize("precision", ["bf16-autocast", "bf16-weights"])
def test_compiled_model_on_the_gpu_matches_eager(precision: str) -> None:
    """--compile 1 on a GPU (Triton kernels around the WKV7 CUDA kernel), as Lightning's bf16-mixed
    (autocast) and as DeepSpeed's bf16 (bf16 weights) run it: logits and every gradient close to eager."""
    from src.wkv7.kernel import kernel_available

    torch.manual_seed(2)
    cfg = dict(n_layer=2, n_embd=128, head_size=64, vocab_size=97, wkv_impl="cuda" if kernel_available("cuda") else "torch")
    eager = RWKV(ModelConfig(**cfg)).cuda()
    comp = RWKV(ModelConfig(**cfg, compile=1), init_weights=False).cuda()
    comp.load_state_dict(eager.state_dict())
    if precision == "bf16-weights":
        eager, comp = eager.bfloat16(), comp.bfloat16()
    x, y = (torch.randint(0, 97, (4, 128), device="cuda") for _ in range(2))
    outs, grads = [], []
    for model in (eager, comp):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            logits = model(x)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        outs.append(logits.float())
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    assert (outs[1] - outs[0]).norm() <= 0.02 * outs[0].norm()
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[1].items():
        assert torch.isfinite(g).all(), name
        ref = grads[0][name]
        assert (g - ref).norm() <= 0.05 * ref.norm() + 1e-6, name
