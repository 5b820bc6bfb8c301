"""WKV7: the chunked PyTorch path against the per-step float64 reference, forward and backward."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from src.wkv7 import wkv7
from src.wkv7.reference import wkv7_sequential
from src.wkv7.torch_impl import wkv7_chunked

D_MIN = math.exp(-math.exp(-0.5))  # smallest per-step decay the model can produce (~0.545)


def random_inputs(B: int, T: int, H: int, N: int, dtype: torch.dtype = torch.float64,
                  seed: int = 0) -> list[torch.Tensor]:
    """Fresh inputs shaped like the model's: decays spread over [0.545, 1), a = -kk, b = kk * rate."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, H, N, generator=g, dtype=dtype)
    k = torch.randn(B, T, H, N, generator=g, dtype=dtype) * 0.5
    v = torch.randn(B, T, H, N, generator=g, dtype=dtype)
    d = D_MIN + (1 - D_MIN - 1e-4) * torch.rand(B, T, H, N, generator=g, dtype=dtype)
    w = torch.log(-torch.log(d))                                   # so that exp(-exp(w)) = d
    kk = F.normalize(torch.randn(B, T, H, N, generator=g, dtype=dtype), dim=-1)
    rate = torch.rand(B, T, H, N, generator=g, dtype=dtype)
    return [r, w, k, v, -kk, kk * rate]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("T,chunk_len", [(1, 32), (5, 32), (16, 16), (47, 16), (64, 32), (100, 32)])
def test_chunked_forward_and_state_match_reference(T: int, chunk_len: int) -> None:
    ins = random_inputs(2, T, 3, 16, seed=T)
    s0 = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    y_ref, s_ref = wkv7_sequential(*ins, state=s0)
    y, s = wkv7_chunked(*ins, state=s0, chunk_len=chunk_len)
    assert rel_err(y, y_ref) < 1e-12
    assert rel_err(s, s_ref) < 1e-12


def test_chunked_gradients_match_reference() -> None:
    """All six input gradients and the state gradient, through y and the final state, with T not a
    multiple of the chunk length."""
    ins = random_inputs(2, 40, 2, 8, seed=1)
    s0 = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    gy = torch.randn(2, 40, 2, 8, dtype=torch.float64)
    gs = torch.randn(2, 2, 8, 8, dtype=torch.float64)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in ins + [s0]]
        y, s = fn(*leaves[:6], state=leaves[6])
        ((y * gy).sum() + (s * gs).sum()).backward()
        return [t.grad for t in leaves]

    ref = grads(wkv7_sequential)
    got = grads(lambda *a, state: wkv7_chunked(*a, state=state, chunk_len=16))
    for name, g, gr in zip(["r", "w", "k", "v", "a", "b", "state"], got, ref):
        assert rel_err(g, gr) < 1e-10, name


@pytest.mark.parametrize("T,with_state", [(12, True), (10, False)])
def test_chunked_backward_passes_gradcheck(T: int, with_state: bool) -> None:
    """The hand-written backward against finite differences (float64), three chunks of 4 steps, the
    last one padded when T = 10."""
    ins = [t.requires_grad_() for t in random_inputs(1, T, 2, 3, seed=T)]
    s0 = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True) if with_state else None
    fn = lambda *x: wkv7_chunked(*x[:6], state=x[6] if with_state else None, chunk_len=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*ins, s0) if with_state else tuple(ins))


def test_chunked_second_derivative_fails_instead_of_being_wrong() -> None:
    """The hand-written backward is not itself differentiable (its saved tensors carry no graph):
    create_graph=True through it must raise, not return a Hessian that misses the decay terms."""
    r, w, k, v, a, b = [t.requires_grad_() for t in random_inputs(1, 8, 1, 4, seed=1)]
    y, _ = wkv7_chunked(r, w, k, v, a, b, chunk_len=4)
    (gw,) = torch.autograd.grad(y.square().sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|marked with @once_differentiable"):
        gw.sum().backward()


def test_reference_is_the_spec_recurrence() -> None:
    """Elementwise SPEC formula, written out with explicit loops on a tiny case."""
    r, w, k, v, a, b = (t[0, :, 0] for t in random_inputs(1, 4, 1, 3, seed=2))  # (T,N)
    d = torch.exp(-torch.exp(w))
    S = torch.zeros(3, 3, dtype=torch.float64)
    ys = []
    for t in range(4):
        sa = [sum(S[i, m] * a[t, m] for m in range(3)) for i in range(3)]
        S = torch.stack([torch.stack([S[i, j] * d[t, j] + sa[i] * b[t, j] + v[t, i] * k[t, j]
                                      for j in range(3)]) for i in range(3)])
        ys.append(torch.stack([sum(S[i, j] * r[t, j] for j in range(3)) for i in range(3)]))
    y_ref, s_ref = wkv7_sequential(*(t[None, :, None] for t in (r, w, k, v, a, b)))
    assert torch.allclose(y_ref[0, :, 0], torch.stack(ys), atol=1e-14)
    assert torch.allclose(s_ref[0, 0], S, atol=1e-14)


def test_a_wrong_term_is_detected() -> None:
    """Guard against a test that cannot fail: dropping the a/b term changes y far beyond tolerance."""
    r, w, k, v, a, b = random_inputs(1, 32, 2, 8, seed=3)
    y, _ = wkv7_chunked(r, w, k, v, a, b)
    y_wrong, _ = wkv7_sequential(r, w, k, v, a, torch.zeros_like(b))
    assert rel_err(y_wrong, y) > 1e-3
    y_sign, _ = wkv7_sequential(r, w, k, v, -a, b)
    assert rel_err(y_sign, y) > 1e-3


def test_two_decay_forms_agree() -> None:
    """exp(-exp(-softplus(-x) - 0.5)) == exp(-e^-0.5 * sigmoid(x)) (SPEC step 4), and d lies in (0.545, 1)."""
    x = torch.linspace(-30, 30, 10001, dtype=torch.float64)
    w = -F.softplus(-x) - 0.5
    d1 = torch.exp(-torch.exp(w))
    d2 = torch.exp(-math.exp(-0.5) * torch.sigmoid(x))
    assert torch.allclose(d1, d2, rtol=0, atol=1e-15)
    assert d1.min() >= D_MIN - 1e-15 and d1.max() < 1


def test_float32_and_bf16_paths() -> None:
    ins = random_inputs(1, 96, 2, 64, seed=4)
    y_ref, _ = wkv7_sequential(*ins)
    y32, s32 = wkv7(*(t.float() for t in ins), impl="torch")
    assert y32.dtype == torch.float32 and s32.dtype == torch.float32
    assert rel_err(y32.double(), y_ref) < 1e-4
    y16, s16 = wkv7(*(t.bfloat16() for t in ins))
    assert y16.dtype == torch.bfloat16 and s16.dtype == torch.float32
    assert rel_err(y16.double(), y_ref) < 5e-2


def test_chunked_prompt_equals_whole_prompt() -> None:
    """Splitting a sequence and carrying the state gives the same outputs (chat prefill relies on it)."""
    ins = random_inputs(1, 50, 2, 8, seed=5)
    y, s = wkv7(*ins)
    y1, s1 = wkv7(*(t[:, :17] for t in ins))
    y2, s2 = wkv7(*(t[:, 17:] for t in ins), state=s1)
    assert rel_err(torch.cat([y1, y2], 1), y) < 1e-12 and rel_err(s2, s) < 1e-12


def test_bad_input_messages() -> None:
    r, w, k, v, a, b = random_inputs(1, 8, 2, 4)
    with pytest.raises(ValueError, match="k has shape"):
        wkv7(r, w, k[:, :4], v, a, b)
    with pytest.raises(ValueError, match=r"must be \(B,T,H,N\)"):
        wkv7(r[0], w[0], k[0], v[0], a[0], b[0])
    with pytest.raises(ValueError, match="state has shape"):
        wkv7(r, w, k, v, a, b, state=torch.zeros(1, 2, 4, 3))
    with pytest.raises(ValueError, match="impl="):
        wkv7(r, w, k, v, a, b, impl="triton")
    with pytest.raises(TypeError, match="floating point"):
        wkv7(*(t.long() for t in (r, w, k, v, a, b)))


def test_chunked_ignores_autocast() -> None:
    """Under bf16 autocast (how bf16-mixed training calls it) the chunked path still computes in
    float32: its products span factors up to ~3e8, which bf16 matmuls would round to ~1e-2 errors."""
    ins64 = random_inputs(1, 96, 2, 64, seed=7)
    y_ref, s_ref = wkv7_sequential(*ins64)
    ins32 = [t.float() for t in ins64]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = wkv7_chunked(*ins32)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert rel_err(y.double(), y_ref) < 1e-4 and rel_err(s.double(), s_ref) < 1e-4
