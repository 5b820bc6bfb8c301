"""RWKV_RNN (src/rnn.py): parallel prefill and one-token decode against the parallel model.

The model is randomly initialised per SPEC and then every parameter gets random noise: SPEC's init
zeroes several matrices (att.output, ffn.value, the LoRA w1/a1/v1/g1), which would hide mistakes in
the terms they multiply.
"""
from __future__ import annotations

import argparse
import re
import warnings
from pathlib import Path

import pytest
import torch

from src.model import RWKV, ModelConfig
from src.rnn import CheckpointError, RWKV_RNN, prefill_pieces

CFG = dict(vocab_size=97, n_layer=3, n_embd=64, head_size=16)


def perturbed_model(cfg: ModelConfig, seed: int) -> RWKV:
    """SPEC init plus noise on every parameter (vectors 0.2, matrices 0.5/sqrt(fan_in))."""
    torch.manual_seed(seed)
    model = RWKV(cfg)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.5 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.2
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RWKV]:
    """(path of the saved state_dict, the same model in float64)."""
    model = perturbed_model(ModelConfig(**CFG), seed=1234)
    path = tmp_path_factory.mktemp("rnn") / "rwkv-test.pth"
    torch.save(model.state_dict(), path)
    return path, model.double()


def ref_logits(model64: RWKV, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model64(torch.tensor([ids]))[0]                                  # (T,V) float64


def decode_all(rnn: RWKV_RNN, ids: list[int], state=None) -> tuple[torch.Tensor, list]:
    out = []
    for t in ids:
        logits, state = rnn.forward(t, state)
        out.append(logits)
    return torch.stack(out), state


@pytest.mark.parametrize("T", [1, 15, 16, 17, 300])
def test_prefill_decode_and_parallel_model_agree_fp32(ckpt, T):
    path, model64 = ckpt
    ids = torch.randint(0, CFG["vocab_size"], (T,), generator=torch.Generator().manual_seed(T)).tolist()
    ref = ref_logits(model64, ids)
    scale = ref.abs().max().item()
    assert scale > 1.0, "the perturbed model should give non-trivial logits"
    tol = dict(rtol=0, atol=5e-6 * scale)

    rnn = RWKV_RNN(path, prefill_chunk=128)             # 300 tokens = 3 chunks: state hand-over tested
    prefill, state_p = rnn.forward(ids, None, full_output=True)
    last, _ = rnn.forward(ids, None)
    decoded, state_d = decode_all(rnn, ids)
    with torch.no_grad():
        parallel32 = RWKV(ModelConfig(**CFG)).eval()
        parallel32.load_state_dict(torch.load(path))
        par = parallel32(torch.tensor([ids]))[0]

    assert prefill.dtype == decoded.dtype == torch.float32
    assert prefill.shape == decoded.shape == (T, CFG["vocab_size"])
    torch.testing.assert_close(prefill.double(), ref, **tol)
    torch.testing.assert_close(decoded.double(), ref, **tol)
    torch.testing.assert_close(par.double(), ref, **tol)
    torch.testing.assert_close(last, prefill[-1])
    for i, (a, b) in enumerate(zip(state_p, state_d)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"state[{i}] prefill vs decode")


@pytest.mark.parametrize("T", [1, 17, 40])
def test_float64_paths_match_to_float64_rounding(ckpt, T):
    """In float64 any difference left is a math difference, not rounding: tolerance 1e-11."""
    path, model64 = ckpt
    ids = torch.randint(0, CFG["vocab_size"], (T,), generator=torch.Generator().manual_seed(7 + T)).tolist()
    ref = ref_logits(model64, ids)
    rnn = RWKV_RNN(path, dtype=torch.float64, prefill_chunk=16)
    prefill, _ = rnn.forward(ids, None, full_output=True)
    decoded, _ = decode_all(rnn, ids)
    torch.testing.assert_close(prefill, ref, rtol=0, atol=1e-11)
    torch.testing.assert_close(decoded, ref, rtol=0, atol=1e-11)


def test_state_carries_across_calls_and_is_not_modified(ckpt):
    path, model64 = ckpt
    rnn = RWKV_RNN(path, dtype=torch.float64)
    ids = torch.randint(0, CFG["vocab_size"], (50,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = ref_logits(model64, ids)
    # prefill 20, decode 3, prefill 27: the same logits as one pass over all 50 tokens
    a, state = rnn.forward(ids[:20], None, full_output=True)
    kept = [s.clone() for s in state]
    b, state2 = decode_all(rnn, ids[20:23], state)
    c, _ = rnn.forward(ids[23:], state2, full_output=True)
    torch.testing.assert_close(torch.cat([a, b, c]), ref, rtol=0, atol=1e-11)
    for s, k in zip(state, kept):
        assert torch.equal(s, k), "forward() must not modify the state passed in"
    # reusing the kept state gives the same continuation again
    b2, _ = decode_all(rnn, ids[20:23], state)
    assert torch.equal(b, b2)
    # a state in another dtype (e.g. from an fp32 run) is converted, not rejected
    f32 = [s.float() for s in state]
    b3, _ = decode_all(rnn, ids[20:23], f32)
    torch.testing.assert_close(b3, b, rtol=0, atol=1e-4)
    assert all(s.dtype == torch.float32 for s in f32), "the caller's list must not be converted in place"


def test_state_layout_matches_model_forward_with_state(ckpt):
    path, model64 = ckpt
    rnn = RWKV_RNN(path, dtype=torch.float64)
    ids = [5, 9, 11, 3]
    _, state = rnn.forward(ids, None)
    with torch.no_grad():
        _, model_state = model64.forward_with_state(torch.tensor([ids]), None)
    C, H, N = CFG["n_embd"], CFG["n_embd"] // CFG["head_size"], CFG["head_size"]
    assert len(state) == 3 * CFG["n_layer"]
    for i, (s, ms) in enumerate(zip(state, model_state)):
        assert s.shape == ((H, N, N) if i % 3 == 1 else (C,))
        torch.testing.assert_close(s, ms[0], rtol=0, atol=1e-11)
    zero = rnn.empty_state()
    assert [z.shape for z in zero] == [s.shape for s in state]
    assert all(not z.any() for z in zero)
    fp32 = RWKV_RNN(path).empty_state()
    assert [z.dtype for z in fp32[:3]] == [torch.float32] * 3


def test_config_is_inferred_and_bf16_checkpoints_load(ckpt, tmp_path):
    path, _ = ckpt
    sd = torch.load(path)
    bf16 = tmp_path / "rwkv-init.pth"
    torch.save({k: v.bfloat16() for k, v in sd.items()}, bf16)
    rnn = RWKV_RNN(bf16)                       # SPEC: stage 1 writes bf16 when precision is bf16
    assert (rnn.n_layer, rnn.n_embd, rnn.head_size, rnn.vocab_size) == (3, 64, 16, 97)
    assert rnn.model.emb.weight.dtype == torch.float32
    torch.testing.assert_close(rnn.model.head.weight, sd["head.weight"].bfloat16().float())
    # the rwkv pip package's way of naming a model: the path without .pth
    assert RWKV_RNN(str(path)[:-4]).path == path


def _save(tmp_path: Path, obj, name: str = "bad.pth") -> Path:
    p = tmp_path / name
    torch.save(obj, p)
    return p


def test_bad_checkpoints_name_the_problem(ckpt, tmp_path):
    path, _ = ckpt
    sd = torch.load(path)
    with pytest.raises(CheckpointError, match="not found"):
        RWKV_RNN(tmp_path / "nope.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(CheckpointError, match="cannot read") as e:
        RWKV_RNN(tmp_path / "text.pth")
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)   # one line, no unsafe advice
    # the wrong files a user is likely to give: torch's text for these starts with the unsafe advice
    (tmp_path / "data.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "data.idx").write_bytes(b"MMIDIDX\x00\x00" + bytes(40))
    torch.save({"args": argparse.Namespace(lr=1.0)}, tmp_path / "objects.pth")
    for name, cause in (("data.jsonl", "Unsupported operand"), ("data.idx", "Unsupported operand"),
                        ("objects.pth", "Unsupported global: GLOBAL argparse.Namespace")):
        with pytest.raises(CheckpointError, match=f"cannot read .*{name} as a PyTorch checkpoint") as e:
            RWKV_RNN(tmp_path / name)
        msg = str(e.value)
        assert cause in msg and "\n" not in msg and "weights_only" not in msg and "\x1b" not in msg, msg
    # a run's folder instead of one of its checkpoints
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match="run is a folder: .*it holds no rwkv-"):
        RWKV_RNN(run)
    torch.save(sd, run / "rwkv-final.pth")
    torch.save({"optimizer": {}, "plan": {}}, run / "rwkv-0.state.pth")
    with pytest.raises(CheckpointError, match=r"run is a folder: give the path of one of its checkpoints \(rwkv-final\.pth\)"):
        RWKV_RNN(run)
    # the resume state the trainer writes beside rwkv-N.pth is not weights
    with pytest.raises(CheckpointError, match=r"rwkv-3\.state\.pth is a training run's resume state .* "
                                              r"give rwkv-3\.pth or rwkv-final\.pth"):
        RWKV_RNN(_save(tmp_path, {"format": 1, "step": 30, "plan": {}, "optimizer": {}}, "rwkv-3.state.pth"))
    with pytest.raises(CheckpointError, match="not a state_dict"):
        RWKV_RNN(_save(tmp_path, [1, 2]))
    with pytest.raises(CheckpointError, match="training checkpoint.*'state_dict'"):
        RWKV_RNN(_save(tmp_path, {"state_dict": sd, "epoch": 3}))

    missing = {k: v for k, v in sd.items() if k != "blocks.1.att.k_a"}
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.1\.att\.k_a'"):
        RWKV_RNN(_save(tmp_path, missing))
    extra = dict(sd, **{"blocks.0.ffn.s_emb.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match=r"unexpected key 'blocks\.0\.ffn\.s_emb\.weight'"):
        RWKV_RNN(_save(tmp_path, extra))
    shaped = dict(sd, **{"blocks.2.att.w1": torch.zeros(64, 40)})
    with pytest.raises(CheckpointError, match=r"blocks\.2\.att\.w1 has shape \[64, 40\], expected \[64, 32\]"):
        RWKV_RNN(_save(tmp_path, shaped))
    listed = dict(sd, **{"emb.weight": sd["emb.weight"].tolist()})
    with pytest.raises(CheckpointError, match=r"entry 'emb\.weight' is a list, expected str -> Tensor"):
        RWKV_RNN(_save(tmp_path, listed))
    ints = dict(sd, **{"head.weight": sd["head.weight"].long()})
    with pytest.raises(CheckpointError, match=r"head\.weight has dtype torch\.int64, expected a floating point"):
        RWKV_RNN(_save(tmp_path, ints))
    heads = dict(sd, **{"blocks.0.att.r_k": torch.zeros(4, 32)})    # 4 heads of 32 = 128, but n_embd is 64
    with pytest.raises(CheckpointError, match=r"blocks\.0\.att\.r_k is \[4, 32\] but emb\.weight says n_embd=64"):
        RWKV_RNN(_save(tmp_path, heads))
    v6 = {k.replace("att.x_r", "att.time_maa_r"): v for k, v in sd.items() if "r_k" not in k}
    with pytest.raises(CheckpointError, match="RWKV-4/5/6"):
        RWKV_RNN(_save(tmp_path, v6))
    with pytest.raises(ValueError, match="wkv_impl"):
        RWKV_RNN(path, wkv_impl="fast")
    with pytest.raises(ValueError, match="WKV7 kernel: needs a CUDA/ROCm device, got cpu.*--wkv_impl torch"):
        RWKV_RNN(path, wkv_impl="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only torch stops right after the warning")
def test_gpu_chat_without_the_kernel_toolchain_warns(ckpt, monkeypatch):
    """On a GPU without nvcc/ninja, "auto" prefills on PyTorch: said once, at load, naming what is missing."""
    import src.rnn as rnn_module

    path, _ = ckpt
    monkeypatch.setattr(rnn_module, "toolchain_problem", lambda: "nvcc (CUDA toolkit) was not found")
    with pytest.warns(UserWarning, match=r"WKV7 kernel unavailable \(nvcc \(CUDA toolkit\) was not found\): prompts "
                                         r"are prefilled on the PyTorch path"):
        with pytest.raises((AssertionError, RuntimeError)):   # this torch has no CUDA: the weights cannot move
            RWKV_RNN(path, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RWKV_RNN(path, device="cpu")                          # nothing to say on a CPU


def test_checkpoint_with_other_lora_widths_loads(tmp_path):
    """Checkpoints made elsewhere may have LoRA widths other than SPEC's formula (e.g. 96/96/64/256 at
    C=2048): they are read from the shapes, and the model computes with them."""
    cfg = ModelConfig(**CFG, d_decay_lora=48, d_aaa_lora=40, d_mv_lora=24, d_gate_lora=72)
    model = perturbed_model(cfg, seed=7)
    path = tmp_path / "rwkv-widths.pth"
    torch.save(model.state_dict(), path)
    rnn = RWKV_RNN(path)
    assert (rnn.cfg.d_decay_lora, rnn.cfg.d_aaa_lora, rnn.cfg.d_mv_lora, rnn.cfg.d_gate_lora) == (48, 40, 24, 72)
    ids = torch.randint(0, CFG["vocab_size"], (20,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = ref_logits(model.double(), ids)
    prefill, _ = rnn.forward(ids, None, full_output=True)
    decoded, _ = decode_all(rnn, ids)
    tol = dict(rtol=0, atol=5e-6 * ref.abs().max().item())
    torch.testing.assert_close(prefill.double(), ref, **tol)
    torch.testing.assert_close(decoded.double(), ref, **tol)
    # widths must agree across layers: block 1 with another width is named
    sd = model.state_dict()
    sd["blocks.1.att.g1"], sd["blocks.1.att.g2"] = torch.zeros(64, 80), torch.zeros(80, 64)
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.att\.g1 has shape \[64, 80\], expected \[64, 72\]"):
        RWKV_RNN(path)


def test_prefill_pieces_cover_the_prompt():
    assert prefill_pieces(300, 128, False) == [(0, 128), (128, 128), (256, 44)]
    assert prefill_pieces(300, 128, True) == [(0, 128), (128, 128), (256, 32), (288, 12)]
    assert prefill_pieces(15, 512, True) == [(0, 15)]
    assert prefill_pieces(16, 512, True) == [(0, 16)]
    for T in range(1, 80):
        for chunk in (16, 32, 48):
            pieces = prefill_pieces(T, chunk, True)
            assert [s for s, _ in pieces] == [sum(n for _, n in pieces[:i]) for i in range(len(pieces))]
            assert sum(n for _, n in pieces) == T and all(0 < n <= chunk for _, n in pieces)
            assert all(n % 16 == 0 for _, n in pieces[:-1])


def test_bad_tokens_and_states_are_rejected(ckpt):
    rnn = RWKV_RNN(ckpt[0])
    with pytest.raises(ValueError, match="token id 97 is outside"):
        rnn.forward([1, 97], None)
    with pytest.raises(ValueError, match="token id -1 is outside"):
        rnn.forward(-1, None)
    with pytest.raises(ValueError, match="token id -1 is outside"):
        rnn.forward([5, -1], None)
    with pytest.raises(ValueError, match="no tokens"):
        rnn.forward([], None)
    with pytest.raises(ValueError, match="state has 2 tensors"):
        rnn.forward(1, rnn.empty_state()[:2])
    for i, shape in ((4, (4, 16, 17)), (0, (65,)), (8, (1, 64))):
        bad = rnn.empty_state()
        bad[i] = torch.zeros(shape)
        for tokens in (1, [1, 2]):
            with pytest.raises(ValueError, match=rf"state\[{i}\] has shape {re.escape(str(shape))}, expected"):
                rnn.forward(tokens, bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_the_wkv_state_in_float32(ckpt, dtype):
    """The half-precision paths (here on the CPU): x_prev in the model dtype, the wkv state float32."""
    path, model64 = ckpt
    ids = torch.randint(0, CFG["vocab_size"], (33,), generator=torch.Generator().manual_seed(33)).tolist()
    ref = ref_logits(model64, ids)
    rnn = RWKV_RNN(path, dtype=dtype)
    assert [s.dtype for s in rnn.empty_state()[:3]] == [dtype, torch.float32, dtype]
    prefill, state_p = rnn.forward(ids, None, full_output=True)
    decoded, state_d = decode_all(rnn, ids)
    assert prefill.dtype == decoded.dtype == dtype
    for state in (state_p, state_d):
        assert [s.dtype for s in state] == [dtype, torch.float32, dtype] * CFG["n_layer"]
    tol = dict(rtol=0, atol=(0.03 if dtype == torch.bfloat16 else 0.01) * ref.abs().max().item())
    torch.testing.assert_close(prefill.double(), ref, **tol)
    torch.testing.assert_close(decoded.double(), ref, **tol)
    torch.testing.assert_close(state_d[1], state_p[1], rtol=0, atol=0.03 * state_p[1].abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device")
@pytest.mark.parametrize("T", [20, 37])
def test_gpu_prefill_with_the_kernel_asked_for(ckpt, T):
    """wkv_impl="cuda" (API_DEMO_CHAT.py --wkv_impl cuda): prompts whose length is not a multiple of
    16 run their last < 16 tokens on PyTorch; the result equals the PyTorch-only prefill."""
    path, model64 = ckpt
    ids = torch.randint(0, CFG["vocab_size"], (T,), generator=torch.Generator().manual_seed(T)).tolist()
    ref = ref_logits(model64, ids)
    kern, state_k = RWKV_RNN(path, device="cuda", wkv_impl="cuda").forward(ids, None, full_output=True)
    torch_, state_t = RWKV_RNN(path, device="cuda", wkv_impl="torch").forward(ids, None, full_output=True)
    tol = dict(rtol=0, atol=2e-3 * ref.abs().max().item())   # the kernel uses fast-math exp
    torch.testing.assert_close(kern.double().cpu(), ref, **tol)
    torch.testing.assert_close(torch_.double().cpu(), ref, **tol)
    torch.testing.assert_close(state_k[1], state_t[1], rtol=0, atol=2e-3 * state_t[1].abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [16, 33])
def test_gpu_half_precision_paths_agree(ckpt, dtype, T):
    path, model64 = ckpt
    ids = torch.randint(0, CFG["vocab_size"], (T,), generator=torch.Generator().manual_seed(T)).tolist()
    ref = ref_logits(model64, ids)
    rnn = RWKV_RNN(path, device="cuda", dtype=dtype)
    prefill, state_p = rnn.forward(ids, None, full_output=True)
    decoded, state_d = decode_all(rnn, ids)
    assert prefill.dtype == dtype and state_p[1].dtype == torch.float32
    # half precision: ~3 significant digits; the math errors this guards against are O(scale)
    tol = dict(rtol=0, atol=(0.03 if dtype == torch.bfloat16 else 0.01) * ref.abs().max().item())
    torch.testing.assert_close(prefill.double().cpu(), ref, **tol)
    torch.testing.assert_close(decoded.double().cpu(), ref, **tol)
