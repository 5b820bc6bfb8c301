"""Chunked WKV7 in pure PyTorch: the path for CPUs and any device without the CUDA/HIP kernel.

Why chunks: the per-step recurrence is T tiny matrix-vector products; here the sequence is cut into
chunks of L steps, everything inside a chunk becomes a few (L x N) matrix products batched over all
chunks at once, and only an N x N state hand-off remains sequential (T/L steps).

Derivation (per batch, head; S is N x N, rows = values i, columns = keys j; within one chunk, t = 1..L,
S_0 the state entering the chunk, G_t = prod_{s<=t} d_s elementwise over keys):
    u_t := S_{t-1} a_t,        S_t = S_{t-1} diag(d_t) + u_t b_t^T + v_t k_t^T
    S_t = S_0 diag(G_t) + sum_{s<=t} (u_s b_s^T + v_s k_s^T) diag(G_t / G_s)
Write a~_t = a_t G_{t-1}, r~_t = r_t G_t, b^_s = b_s / G_s, k^_s = k_s / G_s. Then, with U, V, Y the
(L x N) matrices of the u_t, v_t, y_t as rows,
    U = A~ S_0^T + Mb U + Mk V,   Mb = tril_(-1)(A~ B^^T), Mk = tril_(-1)(A~ K^^T)   (unit-lower-triangular)
    Y = R~ S_0^T + Qb U + Qk V,   Qb = tril_(0)(R~ B^^T),  Qk = tril_(0)(R~ K^^T)
    S_L = S_0 diag(G_L) + U^T B' + V^T K',   B' = B^ G_L, K' = K^ G_L
Solving U = P S_0^T + W0 with P = (I - Mb)^-1 A~, W0 = (I - Mb)^-1 Mk V (independent of S_0) is done for
every chunk in parallel; the sequential part is then, per chunk, U = P S_0^T + W0 and the S_L above:
two (L x N) x (N x N) matrix products. Y follows for all chunks at once.

Backward: written out by hand (_ChunkedWKV7.backward), see the class docstring for why.

Range: the factors 1/G_s grow like exp(L * max|log d|). With the model's decays (d >= exp(-e^-0.5)
= 0.545, |log d| <= 0.61) and L = 32 that is at most ~3e8, far inside float32; decays much
stronger than the model can produce need float64 or a shorter `chunk_len`.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK_LEN = 32


def _step(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
          S: Tensor) -> tuple[Tensor, Tensor]:
    """One recurrence step on (B,H,N) inputs; the cheap path for T == 1 (RNN decode)."""
    d = torch.exp(-torch.exp(w))                                            # (B,H,N)
    sa = (S @ a.unsqueeze(-1))                                              # (B,H,N,1)
    S = S * d.unsqueeze(-2) + sa * b.unsqueeze(-2) + v.unsqueeze(-1) * k.unsqueeze(-2)
    y = (S @ r.unsqueeze(-1)).squeeze(-1)                                   # (B,H,N)
    return y, S


def wkv7_chunked(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                 state: Tensor | None = None, chunk_len: int = DEFAULT_CHUNK_LEN) -> tuple[Tensor, Tensor]:
    """WKV7 over (B,T,H,N) inputs, any T, differentiable; see the module docstring.

    Computes in float64 for float64 inputs and in float32 otherwise (bf16/fp16 inputs are upcast,
    the output is cast back). Returns (y (B,T,H,N) in the input dtype, final state (B,H,N,N) in the
    compute dtype). Never compiled (train.py --compile 1 leaves it eager): with the backward written
    by hand, torch.compile made it no faster on CPU (B=4 T=512 H=8 N=64 fp32, 2 threads: ~60 ms
    compiled vs ~55 ms eager forward+backward) and took ~40 s to compile at T=512, more at longer T.
    """
    B, T, H, N = r.shape
    cdt = torch.float64 if r.dtype == torch.float64 else torch.float32
    # Autocast off: it would run the matmuls below in bf16/fp16, whose 8/11-bit mantissas cannot hold
    # products of factors up to ~3e8 (see Range); under torch.compile that even produced NaN gradients.
    with torch.autocast(r.device.type, enabled=False):
        S = r.new_zeros(B, H, N, N, dtype=cdt) if state is None else state.to(cdt)
        if T == 1:
            y, S = _step(*(t[:, 0].to(cdt) for t in (r, w, k, v, a, b)), S)
            return y.unsqueeze(1).to(r.dtype), S
        L = min(chunk_len, T)
        pad = (-T) % L
        if pad:
            # Padded steps have d = 1 (w = -inf) and k = v = a = b = r = 0: they leave S unchanged.
            r, k, v, a, b = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (r, k, v, a, b))
            w = F.pad(w, (0, 0, 0, 0, 0, pad), value=-math.inf)
        # The inputs stay in their dtype: the Function casts them while moving them to its layout.
        y, S = _ChunkedWKV7.apply(r, w, k, v, a, b, S, L)
    return y[:, :T], S


class _ChunkedWKV7(torch.autograd.Function):
    """The chunk algebra of the module docstring, with its backward written out by hand.

    Why by hand: autograd's backward of the same forward spent most of its time in memory-bound
    passes over (B,H,C,L,N) tensors (each elementwise op's backward, the zero fills and copies behind
    slicing, cat and pad, gradient sums). Here each input is cast and moved to the chunk layout in one
    copy, sums are accumulated inside the matrix products (baddbmm_), and the decay gradient is
    gathered in one expression.
    Chunk tensors are (K,L,N), K = C*B*H chunks ordered (C,B,H): chunk c of every (B,H) is one
    contiguous block for the sequential loop, e.g. U.view(C, B*H, L, N)[c].
    """

    @staticmethod
    def forward(ctx, r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Tensor,
                L: int) -> tuple[Tensor, Tensor]:
        B, T, H, N = r.shape                                                # T a multiple of L
        C = T // L
        K = C * B * H
        cdt = s0.dtype
        new = functools.partial(torch.empty, dtype=cdt, device=r.device)

        def load(t: Tensor) -> Tensor:                                      # (B,T,H,N) -> (K,L,N) in cdt
            out = new(K, L, N)
            out.view(C, B, H, L, N).copy_(t.view(B, C, L, H, N).permute(1, 0, 3, 2, 4))
            return out

        logd = load(w).exp_().neg_()                                        # log d = -exp(w)
        g_all = new(K, L + 1, N)                                            # G_0 = 1, G_1 .. G_L
        g_all[:, 0] = 1
        g_all[:, 1:] = torch.cumsum(logd, 1).exp_()
        G, G_prev, G_L = g_all[:, 1:], g_all[:, :-1], g_all[:, L:]          # (K,L,N), (K,L,N), (K,1,N)
        A, R = load(a).mul_(G_prev), load(r).mul_(G)                        # a~ = a G_{t-1}, r~ = r G_t
        Bh, Kh = load(b).div_(G), load(k).div_(G)                           # b^ = b / G, k^ = k / G
        V = load(v)
        Be, Ke = Bh * G_L, Kh * G_L                                         # B', K'

        strict, incl = _masks(L, cdt, r.device)
        Mb = torch.bmm(A, Bh.mT).mul_(strict)                               # (K,L,L)
        Mk = torch.bmm(A, Kh.mT).mul_(strict)
        Qb = torch.bmm(R, Bh.mT).mul_(incl)
        Qk = torch.bmm(R, Kh.mT).mul_(incl)
        # (I - Mb)^-1 once (unit diagonal: the solve ignores Mb's zero diagonal), so that the
        # backward's transposed solves are matrix products too.
        eye = torch.eye(L, dtype=cdt, device=r.device).expand(K, L, L)
        inv = torch.linalg.solve_triangular(Mb.neg(), eye, upper=False, unitriangular=True)
        P = torch.bmm(inv, A)                                               # U = P S_0^T + W0
        W0 = torch.bmm(inv, torch.bmm(Mk, V))
        KV = torch.bmm(V.mT, Ke)                                            # V^T K'  (K,N,N)

        # The only sequential part. S[c] is the state entering chunk c.
        BH = B * H
        S, U = new(C, BH, N, N), new(C, BH, L, N)
        S[0] = s0.reshape(BH, N, N)
        G_L4, Be4, KV4, P4, W04 = (t.view(C, BH, *t.shape[1:]) for t in (G_L, Be, KV, P, W0))
        for c in range(C):
            U[c] = torch.baddbmm(W04[c], P4[c], S[c].mT)
            s_next = torch.addcmul(KV4[c], S[c], G_L4[c]).baddbmm_(U[c].mT, Be4[c])
            if c + 1 < C:
                S[c + 1] = s_next
        S, U = S.view(K, N, N), U.view(K, L, N)
        y = torch.bmm(R, S.mT).baddbmm_(Qb, U).baddbmm_(Qk, V)               # (K,L,N)
        y_out = r.new_empty(B, T, H, N)
        y_out.view(B, C, L, H, N).permute(1, 0, 3, 2, 4).copy_(y.view(C, B, H, L, N))

        ctx.save_for_backward(logd, g_all, A, R, Bh, Kh, Be, Ke, V, Mk, Qb, Qk, inv, P, W0, U, S)
        ctx.dtypes = tuple(t.dtype for t in (r, w, k, v, a, b))
        return y_out, s_next.view(B, H, N, N)

    @staticmethod
    @once_differentiable   # its saved tensors carry no graph: a second derivative must fail, not come out wrong
    def backward(ctx, dy: Tensor, ds: Tensor) -> tuple[Tensor | None, ...]:
        logd, g_all, A, R, Bh, Kh, Be, Ke, V, Mk, Qb, Qk, inv, P, W0, U, S = ctx.saved_tensors
        B, T, H, N = dy.shape
        K, L, _ = A.shape
        C = T // L
        BH = B * H
        cdt = A.dtype
        G, G_prev, G_L = g_all[:, 1:], g_all[:, :-1], g_all[:, L:]

        def chunks(t: Tensor) -> Tensor:                                    # (B,T,H,N) -> view (C,B,H,L,N)
            return t.view(B, C, L, H, N).permute(1, 0, 3, 2, 4)

        def blocks(t: Tensor) -> Tensor:                                    # (K,L,N) -> view (C,B,H,L,N)
            return t.view(C, B, H, L, N)

        dY = torch.empty(K, L, N, dtype=cdt, device=A.device)
        blocks(dY).copy_(chunks(dy))
        # y = R~ S^T + Qb U + Qk V
        dR = torch.bmm(dY, S)
        dS_y = torch.bmm(dY.mT, R).view(C, BH, N, N)
        dU = torch.bmm(Qb.mT, dY)                                           # completed in the loop
        # Back through S_next = S diag(G_L) + U^T B' + V^T K' and U = P S^T + W0, chunk by chunk;
        # dS_next[c] is the gradient of the state leaving chunk c.
        dS_next = torch.empty(C, BH, N, N, dtype=cdt, device=A.device)
        dS_next[C - 1] = ds.reshape(BH, N, N)
        G_L4, Be4, P4, dU4 = (t.view(C, BH, *t.shape[1:]) for t in (G_L, Be, P, dU))
        for c in range(C - 1, -1, -1):
            dU4[c].baddbmm_(Be4[c], dS_next[c].mT)
            dS = torch.addcmul(dS_y[c], dS_next[c], G_L4[c]).baddbmm_(dU4[c].mT, P4[c])
            if c > 0:
                dS_next[c - 1] = dS
        dS_next = dS_next.view(K, N, N)
        dG_L = (S * dS_next).sum(1, keepdim=True)                           # (K,1,N)
        dBe, dKe = torch.bmm(U, dS_next), torch.bmm(V, dS_next)
        dP = torch.bmm(dU, S)                                               # and dW0 = dU

        # Through [P, W0] = (I - Mb)^-1 [A~, Mk V]: dZ = (I - Mb)^-T [dP, dW0], dMb = dZ [P, W0]^T.
        strict, incl = _masks(L, cdt, A.device)
        dZp, dZw = torch.bmm(inv.mT, dP), torch.bmm(inv.mT, dU)
        dMb = torch.bmm(dZp, P.mT).baddbmm_(dZw, W0.mT).mul_(strict)
        dMk = torch.bmm(dZw, V.mT).mul_(strict)
        dQb = torch.bmm(dY, U.mT).mul_(incl)
        dQk = torch.bmm(dY, V.mT).mul_(incl)
        dV = torch.bmm(Qk.mT, dY).baddbmm_(Mk.mT, dZw).baddbmm_(Ke, dS_next.mT)
        dA = dZp.baddbmm_(dMb, Bh).baddbmm_(dMk, Kh)
        dR.baddbmm_(dQb, Bh).baddbmm_(dQk, Kh)
        dBh = torch.bmm(dMb.mT, A).baddbmm_(dQb.mT, R)
        dKh = torch.bmm(dMk.mT, A).baddbmm_(dQk.mT, R)

        # Decay gradient. A decayed tensor X = x exp(+-log G) adds +-dX*X to the gradient of log G
        # (B', K' and diag(G_L) add to log G_L too); log G_t sums log d_s over s <= t, log G_{t-1}
        # over s < t. So, with Z = dR R + dA A - dBh Bh - dKh Kh - dB' B' - dK' K' (all (K,L,N)):
        #   dlogd_t = sum_{s>=t} Z_s - (dA A)_t + sum_s (dB' B' + dK' K')_s + G_L dG_L
        dA_A = dA * A
        X = (dBe * Be).addcmul_(dKe, Ke)
        Z = (dR * R).add_(dA_A).addcmul_(dBh, Bh, value=-1).addcmul_(dKh, Kh, value=-1).sub_(X)
        rest = X.sum(1, keepdim=True).addcmul_(G_L, dG_L).sub(dA_A)
        upper = torch.ones(L, L, dtype=cdt, device=A.device).triu()         # upper @ Z sums over s >= t
        dlogd = torch.baddbmm(rest, upper.expand(K, L, L), Z)

        # The input gradients, cast and moved back to (B,T,H,N) in one copy each.
        grads = (dR.mul_(G), dlogd.mul_(logd), dKh.addcmul_(dKe, G_L).div_(G), dV,  # d log d / dw = log d
                 dA.mul_(G_prev), dBh.addcmul_(dBe, G_L).div_(G))
        outs = []
        for g, dt in zip(grads, ctx.dtypes):
            out = torch.empty(B, T, H, N, dtype=dt, device=A.device)
            chunks(out).copy_(blocks(g))
            outs.append(out)
        return *outs, dS.view(B, H, N, N), None


def _masks(L: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """(L,L) 0/1 masks: strictly lower (s < t) and lower including the diagonal (s <= t)."""
    ones = torch.ones(L, L, dtype=dtype, device=device)
    return ones.tril(-1), ones.tril(0)
