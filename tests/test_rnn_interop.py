"""Checkpoint-format interop: the RWKV ecosystem's pip package (`rwkv`, RWKV_V7_ON=1) loads a
state_dict saved by src.model and gives the same logits and state as src.rnn.

The package reads RWKV_V7_ON at import, so it runs in a subprocess with that variable set; it is a
dev/test dependency only (requirements-dev.txt), never imported by the project itself.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from src.model import ModelConfig
from src.rnn import RWKV_RNN
from tests.test_rnn import perturbed_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("rwkv") is None,
                                reason="the rwkv pip package is not installed (pip install -r requirements-dev.txt)")

PIP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from rwkv.model import RWKV
    name, prompt_file, out_file = sys.argv[1:4]
    prompt = torch.load(prompt_file)
    model = RWKV(name, strategy="cpu fp32")
    full, state = model.forward(prompt["prefill"], None, full_output=True)
    steps = []
    for t in prompt["decode"]:
        logits, state = model.forward(t, state)
        steps.append(logits.clone())
    torch.save({"prefill": full, "decode": torch.stack(steps), "state": [s.clone() for s in state]}, out_file)
""")


def test_rwkv_pip_package_gives_our_logits(tmp_path: Path):
    cfg = ModelConfig(vocab_size=211, n_layer=3, n_embd=128, head_size=64)
    model = perturbed_model(cfg, seed=99)
    ckpt = tmp_path / "rwkv-interop.pth"
    torch.save(model.state_dict(), ckpt)
    g = torch.Generator().manual_seed(5)
    prompt = {"prefill": torch.randint(0, cfg.vocab_size, (23,), generator=g).tolist(),
              "decode": torch.randint(0, cfg.vocab_size, (4,), generator=g).tolist()}
    torch.save(prompt, tmp_path / "prompt.pt")

    env = dict(os.environ, RWKV_V7_ON="1", RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
    run = subprocess.run([sys.executable, "-c", PIP_SCRIPT, str(ckpt)[:-len(".pth")],
                          str(tmp_path / "prompt.pt"), str(tmp_path / "theirs.pt")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"rwkv pip package failed on our checkpoint:\n{run.stderr[-3000:]}"
    theirs = torch.load(tmp_path / "theirs.pt")

    rnn = RWKV_RNN(ckpt)
    full, state = rnn.forward(prompt["prefill"], None, full_output=True)
    steps = []
    for t in prompt["decode"]:
        logits, state = rnn.forward(t, state)
        steps.append(logits)
    scale = full.abs().max().item()
    assert scale > 1.0
    # Both run float32; the package's decay uses the constant 0.606531 for exp(-0.5) (rel. 6e-7).
    tol = dict(rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(full, theirs["prefill"], **tol)
    torch.testing.assert_close(torch.stack(steps), theirs["decode"], **tol)
    assert len(state) == len(theirs["state"]) == 3 * cfg.n_layer
    for i, (a, b) in enumerate(zip(state, theirs["state"])):
        assert a.shape == b.shape and a.dtype == b.dtype, f"state[{i}]: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"state[{i}]")
