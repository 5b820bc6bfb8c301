"""Per-time-step WKV7 reference: the literal recurrence of SPEC section 1, one Python step per token.

Kept for tests (float64 ground truth) and benchmarks (the baseline the chunked path is measured
against). It is deliberately simple and slow; nothing in training or chat calls it.
"""
from __future__ import annotations

import torch
from torch import Tensor


def wkv7_sequential(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                    state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """y_t = S_t r_t with S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T, d = exp(-exp(w)).

    Inputs (B,T,H,N); state (B,H,N,N), rows = value index, columns = key index.
    Computes in float64 when the inputs are float64, else float32. Returns (y in the input dtype,
    final state in the compute dtype).
    """
    B, T, H, N = r.shape
    in_dtype = r.dtype
    cdt = torch.float64 if r.dtype == torch.float64 else torch.float32
    r, w, k, v, a, b = (t.to(cdt) for t in (r, w, k, v, a, b))
    d = torch.exp(-torch.exp(w))                                    # (B,T,H,N)
    S = r.new_zeros(B, H, N, N) if state is None else state.to(cdt).clone()
    ys = []
    for t in range(T):
        sa = S @ a[:, t, :, :, None]                                # (B,H,N,1) = S a
        S = (S * d[:, t, :, None, :] + sa * b[:, t, :, None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])           # (B,H,N,N)
        ys.append((S @ r[:, t, :, :, None]).squeeze(-1))            # (B,H,N)
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, N)   # (B,T,H,N)
    return y.to(in_dtype), S
