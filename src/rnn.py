"""RNN-mode inference for RWKV-7 (x070) checkpoints: parallel prefill, lean one-token decode.

    from src.rnn import RWKV_RNN
    model = RWKV_RNN("out/rwkv-final.pth", device="cpu", dtype=torch.float32)
    logits, state = model.forward([1, 872, 23], None)        # prompt: parallel prefill
    logits, state = model.forward(token, state)              # then one token at a time

The calling convention is the rwkv pip package's (RWKV_V7_ON=1), so code can switch between them:
`forward(tokens, state, full_output=False)` takes an int or a list of token ids (or a 1-D tensor) and
a state (None = zeros); it returns the logits of the last token (V,) (or of every token (T,V) with
full_output=True) and the new state. The state is a list of 3 * n_layer tensors, per layer l:
[3l+0] att x_prev (C,), [3l+1] wkv state (H,N,N) float32, [3l+2] ffn x_prev (C,), x_prev in the model
dtype. Unlike the pip package, the state passed in is never modified, so a state can be kept and
reused (e.g. after the system prompt) and a failed call leaves the caller's state intact.

Two paths give the same numbers (to float rounding; tests/test_rnn.py):
- several tokens: the blocks of src.model.RWKV (the training model, loaded from the checkpoint)
  run in parallel over chunks of `prefill_chunk` tokens with the state carried in and out through
  src.wkv7 (the GPU kernel where it applies); chunking bounds memory for any prompt length, and the
  head only runs on the positions whose logits are returned.
- one token: a matrix-vector step written for low per-token overhead; it reads the same weight
  matrices as the parallel model (no copies) and updates the wkv state with two rank-1 products.

dtype: float32, float16/bfloat16 (meant for GPUs, also run on CPUs; the wkv state stays float32),
float64 (CPU, for tests: then the wkv state is float64 too).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from src.model import LN_X_EPS, RWKV, ModelConfig
from src.wkv7 import IMPLS
from src.wkv7.kernel import CHUNK_LEN as KERNEL_CHUNK, require_kernel, toolchain_problem

State = list[Tensor]
DEFAULT_PREFILL_CHUNK = 512
LN_EPS = 1e-5        # nn.LayerNorm default, as in src.model
DECAY_SCALE = math.exp(-0.5)
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


class CheckpointError(ValueError):
    """The file is missing, unreadable or not an RWKV-7 (x070) state_dict of SPEC's format."""


_UNPICKLER_CAUSE = "WeightsUnpickler error:"


def load_error(e: BaseException, limit: int = 160) -> str:
    """`Type: cause` of an error from torch.load, one line. A failed weights_only load (a jsonl, a .idx,
    a pickle of other objects) opens with text that suggests weights_only=False (unsafe for a file from
    elsewhere) and filing an issue: only the cause torch names after "WeightsUnpickler error:" is kept."""
    text = str(e).strip()
    if text.startswith("Weights only load failed"):
        cause = text.split(_UNPICKLER_CAUSE, 1)[1].strip() if _UNPICKLER_CAUSE in text else ""
        cause = (cause.splitlines() or [""])[0].split(". ")[0][:limit]
        return f"{type(e).__name__}: not a file of tensors only ({cause or 'unknown content'})"
    first = (text.splitlines() or [""])[0][:limit]
    return f"{type(e).__name__}: {first}"


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], Path]:
    """Load a plain state_dict from `path` (or `path`.pth, as the rwkv pip package names models)."""
    p = Path(path)
    if not p.is_file() and Path(str(p) + ".pth").is_file():
        p = Path(str(p) + ".pth")
    if p.is_dir():
        found = sorted(c.name for c in p.glob("rwkv-*.pth") if not c.name.endswith(".state.pth"))
        raise CheckpointError(f"{p} is a folder: give the path of one of its checkpoints "
                              + (f"({', '.join(found[-4:])})" if found else "(it holds no rwkv-*.pth)"))
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found (give the path of an rwkv-*.pth file)")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises several unrelated types for foreign files
        raise CheckpointError(f"cannot read {p} as a PyTorch checkpoint (.pth): {load_error(e)}; "
                              "give the path of an rwkv-*.pth file") from e
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{p} holds a {type(sd).__name__}, not a state_dict (a dict of tensors)")
    if "optimizer" in sd and "plan" in sd:
        raise CheckpointError(f"{p} is a training run's resume state (optimizer and progress), not weights: "
                              f"give {p.name.replace('.state.pth', '.pth')} or rwkv-final.pth from the same folder")
    for wrapper in ("state_dict", "module", "model"):
        if isinstance(sd.get(wrapper), dict):
            raise CheckpointError(f"{p} is a training checkpoint (its tensors are under {wrapper!r}); "
                                  "give the plain state_dict the trainer saves as rwkv-*.pth")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise CheckpointError(f"{p}: entry {k!r} is a {type(v).__name__}, expected str -> Tensor")
    return sd, p


def config_from_state_dict(sd: dict[str, Tensor], source: str = "checkpoint",
                           wkv_impl: str = "auto") -> ModelConfig:
    """Infer n_layer, n_embd, head_size, vocab_size, dim_ffn and the LoRA widths from the shapes;
    check every key and shape.

    Raises CheckpointError naming the first missing, unexpected or mis-shaped keys.
    """
    lora = {"d_decay_lora": "w1", "d_aaa_lora": "a1", "d_mv_lora": "v1", "d_gate_lora": "g1"}
    for key in ("emb.weight", "blocks.0.att.r_k", "blocks.0.ffn.key.weight",
                *(f"blocks.0.att.{name}" for name in lora.values())):
        if key not in sd:
            hint = ""
            if any(".att.time_" in k or ".att.time_maa" in k for k in sd):
                hint = " (its keys look like RWKV-4/5/6, not RWKV-7 x070)"
            raise CheckpointError(f"{source}: key {key!r} is missing: not an RWKV-7 (x070) checkpoint{hint}")
        if sd[key].dim() != 2:
            raise CheckpointError(f"{source}: {key} has shape {list(sd[key].shape)}, expected 2 dimensions")
    vocab_size, n_embd = sd["emb.weight"].shape
    n_head, head_size = sd["blocks.0.att.r_k"].shape
    dim_ffn = sd["blocks.0.ffn.key.weight"].shape[0]
    n_layer = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k)))
    if n_head * head_size != n_embd:
        raise CheckpointError(f"{source}: blocks.0.att.r_k is {[n_head, head_size]} but emb.weight says "
                              f"n_embd={n_embd}; r_k must be [n_embd/head_size, head_size]")
    try:
        cfg = ModelConfig(vocab_size=int(vocab_size), n_layer=n_layer, n_embd=int(n_embd),
                          head_size=int(head_size), dim_ffn=int(dim_ffn), wkv_impl=wkv_impl,
                          **{field: int(sd[f"blocks.0.att.{name}"].shape[1]) for field, name in lora.items()})
    except ValueError as e:
        raise CheckpointError(f"{source}: unsupported shapes: {e}") from e

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in RWKV(cfg, init_weights=False).state_dict().items()}
    problems = [f"missing key {k!r} (expected shape {list(s)})" for k, s in expected.items() if k not in sd]
    problems += [f"unexpected key {k!r}" for k in sd if k not in expected]
    problems += [f"{k} has shape {list(sd[k].shape)}, expected {list(s)}"
                 for k, s in expected.items() if k in sd and tuple(sd[k].shape) != s]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{source} is not an x070 checkpoint of L{n_layer}-D{n_embd} "
                              f"(head_size {head_size}, vocab {vocab_size}): " + "; ".join(problems[:5]) + more)
    for k, v in sd.items():
        if not v.is_floating_point():
            raise CheckpointError(f"{source}: {k} has dtype {v.dtype}, expected a floating point tensor")
    return cfg


def prefill_pieces(T: int, chunk: int, kernel_sized: bool) -> list[tuple[int, int]]:
    """(start, length) pieces of a T-token prompt, each at most `chunk` long. With kernel_sized (on a
    GPU) a piece whose length is not a multiple of 16 is split so that the WKV7 kernel, which needs
    T % 16 == 0, still takes all but its last < 16 tokens (those run on the PyTorch path)."""
    pieces, start = [], 0
    while start < T:
        n = min(chunk, T - start)
        if kernel_sized and n > KERNEL_CHUNK and n % KERNEL_CHUNK:
            n -= n % KERNEL_CHUNK
        pieces.append((start, n))
        start += n
    return pieces


class RWKV_RNN:
    """An RWKV-7 checkpoint ready for chat: `logits, state = model.forward(tokens, state)`."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, wkv_impl: str = "auto",
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        device = torch.device(device)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"dtype {dtype} is not supported: use float32, float16, bfloat16 (or float64 on CPU)")
        if wkv_impl not in IMPLS:
            raise ValueError(f"wkv_impl={wkv_impl!r} must be one of {IMPLS}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk} must be >= 1")
        sd, self.path = read_state_dict(path)
        cfg = config_from_state_dict(sd, str(self.path), wkv_impl)
        if wkv_impl == "cuda":
            # "cuda": the kernel runs the prefill, or this fails now, saying why. A prompt's pieces are
            # multiples of 16 tokens for it (prefill_pieces) but for a last one of < 16 tokens, which
            # the kernel cannot take: that one runs on PyTorch, as with "auto".
            require_kernel(device, dtype, cfg.head_size)
            cfg = dataclasses.replace(cfg, wkv_impl="auto")
        elif wkv_impl == "auto" and device.type == "cuda" and (problem := toolchain_problem()) is not None:
            warnings.warn(f"WKV7 kernel unavailable ({problem}): prompts are prefilled on the "
                          "PyTorch path (slower on long prompts; decoding is unaffected)", stacklevel=2)
        self.cfg = cfg
        self.device, self.dtype, self.prefill_chunk = device, dtype, prefill_chunk
        self.n_layer, self.n_embd, self.vocab_size = cfg.n_layer, cfg.n_embd, cfg.vocab_size
        self.head_size, self.n_head = cfg.head_size, cfg.n_head
        self.state_dtype = torch.float64 if dtype == torch.float64 else torch.float32

        # The training model's modules hold the weights: built on "meta" (no memory), then assigned.
        with torch.device("meta"):
            model = RWKV(cfg, init_weights=False)
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()},
                              strict=True, assign=True)
        self.model = model.eval().requires_grad_(False)
        self._layers = [self._decode_weights(b) for b in model.blocks]
        self._neg_decay_scale = torch.tensor(-DECAY_SCALE, dtype=self.state_dtype, device=device)

    # ------------------------------------------------------------------ public API
    def empty_state(self) -> State:
        """Zero state: per layer att x_prev (C,), wkv (H,N,N), ffn x_prev (C,)."""
        C, H, N = self.n_embd, self.n_head, self.head_size
        state: State = []
        for _ in range(self.n_layer):
            state += [torch.zeros(C, dtype=self.dtype, device=self.device),
                      torch.zeros(H, N, N, dtype=self.state_dtype, device=self.device),
                      torch.zeros(C, dtype=self.dtype, device=self.device)]
        return state

    def generate_zero_state(self) -> State:
        """Alias of empty_state() under the rwkv pip package's name."""
        return self.empty_state()

    @torch.no_grad()
    def forward(self, tokens: int | Sequence[int] | Tensor, state: State | None = None,
                full_output: bool = False) -> tuple[Tensor, State]:
        """tokens (int, list or 1-D tensor of ids), state (None = zeros) -> (logits, new state).

        logits: (V,) for the last token, or (T,V) for every token when full_output=True; in the
        model dtype. The input state is not modified.
        """
        state = self.empty_state() if state is None else self._check_state(state)
        if isinstance(tokens, int):  # the decode loop's case: no tensor round trip for the id
            logits, state = self._step(self._check_token(tokens), state)
            return (logits.unsqueeze(0) if full_output else logits), state
        ids = self._check_tokens(tokens)
        if ids.numel() == 1:
            logits, state = self._step(int(ids[0]), state)
            return (logits.unsqueeze(0) if full_output else logits), state
        return self._prefill(ids.to(self.device), state, full_output)

    __call__ = forward

    # ------------------------------------------------------------------ checks
    def _check_token(self, token: int) -> int:
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} is outside the model's vocabulary [0, {self.vocab_size}): "
                             "is the tokenizer the one this model was trained with?")
        return token

    def _check_tokens(self, tokens: Sequence[int] | Tensor) -> Tensor:
        ids = torch.as_tensor(tokens, dtype=torch.long, device="cpu").reshape(-1)   # (T,)
        if ids.numel() == 0:
            raise ValueError("forward() got no tokens: give at least one token id")
        lo, hi = int(ids.min()), int(ids.max())
        self._check_token(lo if lo < 0 else hi)
        return ids

    def _check_state(self, state: State) -> State:
        """Check the shapes; a state from elsewhere (another dtype or device) is converted."""
        C, H, N = self.n_embd, self.n_head, self.head_size
        if len(state) != 3 * self.n_layer:
            raise ValueError(f"state has {len(state)} tensors, expected 3 * n_layer = {3 * self.n_layer}")
        out = state
        for i, s in enumerate(state):
            want = (H, N, N) if i % 3 == 1 else (C,)
            if tuple(s.shape) != want:
                raise ValueError(f"state[{i}] has shape {tuple(s.shape)}, expected {want} "
                                 "(per layer: att x_prev (C,), wkv (H,N,N), ffn x_prev (C,))")
            dtype = self.state_dtype if i % 3 == 1 else self.dtype
            if s.dtype != dtype or s.device != self.device:
                out = list(state) if out is state else out
                out[i] = s.to(device=self.device, dtype=dtype)
        return out

    # ------------------------------------------------------------------ parallel prefill
    def _prefill(self, ids: Tensor, state: State, full_output: bool) -> tuple[Tensor, State]:
        m = self.model
        batched = [s.unsqueeze(0) for s in state]                             # (1,C), (1,H,N,N)
        outs = []
        for start, n in prefill_pieces(ids.numel(), self.prefill_chunk, self.device.type == "cuda"):
            x = m.emb(ids[start:start + n].unsqueeze(0))                       # (1,n,C)
            v_first = None
            for i, block in enumerate(m.blocks):
                x, v_first, layer_state = block(x, v_first, tuple(batched[3 * i:3 * i + 3]))
                # x_prev entries are views of (1,T,C) activations: copy them so those can be freed.
                batched[3 * i:3 * i + 3] = [layer_state[0].clone(), layer_state[1], layer_state[2].clone()]
            outs.append(x[0] if full_output else x[0, -1:])
        x = torch.cat(outs) if full_output else outs[-1][0]                   # (T,C) or (C,)
        logits = m.head(m.ln_out(x))
        return logits, [s[0] for s in batched]

    # ------------------------------------------------------------------ one-token decode
    def _decode_weights(self, block: torch.nn.Module) -> tuple[Tensor, ...]:
        """Per-layer tensors in the order _step reads them: views of the model's parameters, except
        a few vectors of size C combined so that _step needs fewer (Python-dispatched) ops."""
        att, ffn = block.att, block.ffn
        C, H, N = self.n_embd, self.n_head, self.head_size
        # One (6,C) tensor so that the six token-shift mixes cost one fused op per token.
        maa = torch.cat([att.x_r, att.x_w, att.x_k, att.x_v, att.x_a, att.x_g]).view(6, C)
        return (block.ln1.weight, block.ln1.bias, maa,
                att.receptance.weight, att.key.weight, att.value.weight,
                att.w0.view(C), att.w1, att.w2.t(), att.a0.view(C), att.a1, att.a2.t(),
                att.v0.view(C), att.v1, att.v2.t(), att.g1, att.g2,
                att.k_k.view(C), att.k_a.view(C), 1 - att.k_a.view(C), att.r_k.view(C),
                att.ln_x.weight.view(H, N), att.ln_x.bias.view(H, N), att.output.weight,
                block.ln2.weight, block.ln2.bias, ffn.x_k.view(C), ffn.key.weight, ffn.value.weight)

    def _step(self, token: int, state: State) -> tuple[Tensor, State]:
        """One token through all layers with matrix-vector products; returns ((V,) logits, new state).

        Same math as src.model (SPEC steps 1-12), regrouped into fewer ops: addmv for "bias + vector
        @ matrix", lerp for the v_first mix, the ln_x GroupNorm as a LayerNorm per head, and the wkv
        update S diag(d) + (S a_in) b_in^T + v k^T as two rank-1 baddbmm on (H,N,N).
        """
        m, C, H, N = self.model, self.n_embd, self.n_head, self.head_size
        sdt = self.state_dtype
        upcast = self.dtype != sdt                      # fp16/bf16 weights: the wkv math runs in fp32
        neg_decay_scale = self._neg_decay_scale         # a 0-dim tensor: a Python float costs a copy per use
        x = m.emb.weight[token]                                                # (C,)
        x = F.layer_norm(x, (C,), m.blocks[0].ln0.weight, m.blocks[0].ln0.bias, LN_EPS)
        v_first = x
        new_state: State = []
        for layer, (ln1_w, ln1_b, maa, Wr, Wk, Wv, w0, w1, w2t, a0, a1, a2t, v0, v1, v2t, g1, g2,
                    k_k, k_a, one_minus_k_a, r_k, lnx_w, lnx_b, Wo,
                    ln2_w, ln2_b, fx_k, Fk, Fv) in enumerate(self._layers):
            xn = F.layer_norm(x, (C,), ln1_w, ln1_b, LN_EPS)
            xr, xw, xk, xv, xa, xg = torch.addcmul(xn, state[3 * layer] - xn, maa).unbind(0)
            r, k, v = torch.mv(Wr, xr), torch.mv(Wk, xk), torch.mv(Wv, xv)
            w = torch.addmv(w0, w2t, torch.tanh(xw @ w1))                      # decay logit
            if layer == 0:
                v_first = v
            else:
                v = torch.lerp(v, v_first, torch.sigmoid(torch.addmv(v0, v2t, xv @ v1)))
            a = torch.sigmoid(torch.addmv(a0, a2t, xa @ a1))
            g = torch.sigmoid(xg @ g1) @ g2
            kk = F.normalize((k * k_k).view(H, N), dim=-1, p=2.0, eps=1e-12)   # (H,N)
            k = k * torch.addcmul(one_minus_k_a, a, k_a)                       # k (1 + (a-1) k_a)
            # S <- S diag(d) + (S a_in) b_in^T + v k^T with a_in = -kk, b_in = kk a: rank-1 updates;
            # d = exp(-exp(-softplus(-w) - 0.5)) = exp(-e^-0.5 sigmoid(w)) (SPEC step 4).
            wkv_in = (w, kk, kk * a.view(H, N), k, v, r)
            if upcast:
                wkv_in = tuple(t.to(sdt) for t in wkv_in)
            w_, kk_, b_, k_, v_, r_ = wkv_in
            S = state[3 * layer + 1]                                           # (H,N,N)
            sa = torch.bmm(S, kk_.view(H, N, 1))                               # S kk = -(S a_in)
            S = S * torch.exp(torch.sigmoid(w_) * neg_decay_scale).view(H, 1, N)  # new tensor
            S.baddbmm_(sa, b_.view(H, 1, N), alpha=-1).baddbmm_(v_.view(H, N, 1), k_.view(H, 1, N))
            y = torch.bmm(S, r_.view(H, N, 1)).view(H, N).to(x.dtype)          # y = S r
            y = torch.addcmul(lnx_b, F.layer_norm(y, (N,), eps=LN_X_EPS), lnx_w)
            y = torch.addcmul(y, (r * k * r_k).view(H, N).sum(-1, keepdim=True), v.view(H, N))
            x = torch.addmv(x, Wo, y.view(C) * g)
            xn2 = F.layer_norm(x, (C,), ln2_w, ln2_b, LN_EPS)
            h = torch.relu(torch.mv(Fk, torch.addcmul(xn2, state[3 * layer + 2] - xn2, fx_k)))
            x = torch.addmv(x, Fv, h * h)
            new_state += (xn, S, xn2)
        x = F.layer_norm(x, (C,), m.ln_out.weight, m.ln_out.bias, LN_EPS)
        return torch.mv(m.head.weight, x), new_state
