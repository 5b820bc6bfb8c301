"""The RWKV-7 ("x070") language model: modules, initialisation, loss and optimizer groups.

Parameter names and shapes are the RWKV ecosystem's x070 checkpoint format (SPEC section 1), so a
`state_dict()` of this model loads in other x070 tools and theirs loads here. Notation: B batch,
T time, C = n_embd, H heads, N = head_size, V = vocab_size, L = n_layer.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import pytorch_lightning as pl
from pytorch_lightning.strategies import DeepSpeedStrategy
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from src.wkv7 import IMPLS, wkv7

LN_X_EPS = 64e-5  # ln_x GroupNorm eps = 1e-5 * head_size_divisor(8)**2 (SPEC)
State = list[Tensor]  # 3 per layer: att x_prev (B,C), wkv (B,H,N,N) fp32, ffn x_prev (B,C)


@dataclass
class ModelConfig:
    """Everything the model needs; built explicitly (from train.py's arguments or by hand)."""
    vocab_size: int = 6400
    n_layer: int = 8
    n_embd: int = 512
    head_size: int = 64
    dim_att: int = 0            # 0 -> n_embd (x070 needs dim_att == n_embd)
    dim_ffn: int = 0            # 0 -> 4 * n_embd
    # LoRA widths (w1/a1/v1/g1 columns); 0 -> SPEC's formula (lora_dims). Checkpoints made elsewhere
    # may use other widths (SPEC quotes 96/96/64/256 for C=2048, where the formula gives
    # 128/128/64/224): src.rnn.config_from_state_dict reads them from the shapes.
    d_decay_lora: int = 0
    d_aaa_lora: int = 0
    d_mv_lora: int = 0
    d_gate_lora: int = 0
    grad_cp: int = 0            # 1: recompute each block in backward (less memory, ~30% slower)
    wkv_impl: str = "auto"      # auto | cuda | torch (see src.wkv7)
    compile: int = 0            # 1: torch.compile the time/channel mixes (compiles on first step; for fixed shapes, i.e. training)
    lr_init: float = 6e-4       # the optimizer's initial lr (train.py's schedule sets every step's)
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-18
    weight_decay: float = 0.001

    def __post_init__(self) -> None:
        if self.dim_att <= 0:
            self.dim_att = self.n_embd
        if self.dim_ffn <= 0:
            self.dim_ffn = 4 * self.n_embd
        for name in ("decay", "aaa", "mv", "gate"):
            if getattr(self, f"d_{name}_lora") < 0:
                raise ValueError(f"--d_{name}_lora {getattr(self, f'd_{name}_lora')} must be >= 0 (0 = SPEC's formula)")
        spec = lora_dims(self.n_embd, self.head_size)
        self.d_decay_lora = self.d_decay_lora or spec["decay"]
        self.d_aaa_lora = self.d_aaa_lora or spec["aaa"]
        self.d_mv_lora = self.d_mv_lora or spec["mv"]
        self.d_gate_lora = self.d_gate_lora or spec["gate"]
        if self.dim_att != self.n_embd:
            raise ValueError(f"--dim_att {self.dim_att} != --n_embd {self.n_embd}: x070 mixes time in the "
                             "model width (w0/a0/v0 are [1,1,n_embd]); leave --dim_att at 0")
        if self.n_embd % self.head_size != 0:
            raise ValueError(f"--n_embd {self.n_embd} is not a multiple of --head_size {self.head_size}")
        if self.dim_ffn % 32 != 0:
            raise ValueError(f"--dim_ffn {self.dim_ffn} must be a multiple of 32")
        if self.wkv_impl not in IMPLS:
            raise ValueError(f"--wkv_impl {self.wkv_impl!r} must be one of {IMPLS}")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @classmethod
    def from_namespace(cls, ns: Any) -> "ModelConfig":
        """Take the fields this dataclass has from an argparse namespace (others are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names})


def lora_dims(n_embd: int, head_size: int = 64) -> dict[str, int]:
    """LoRA widths of SPEC section 1: decay, in-context rate (aaa), value mix (mv), gate."""
    C, f = n_embd, head_size / 64

    def width(scale: float, exponent_scale: float) -> int:
        return max(32, round(scale * math.sqrt(C) * exponent_scale / 32) * 32)

    return {"decay": width(2.5, f), "aaa": width(2.5, f), "mv": width(1.7, f), "gate": width(5.0, 1.0)}


def token_shift(x: Tensor, prev: Tensor | None) -> Tensor:
    """shift(x)_t = x_{t-1}, with x_{-1} = prev (the carried RNN state) or zeros.  (B,T,C)"""
    first = torch.zeros_like(x[:, :1]) if prev is None else prev.unsqueeze(1).to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


class TimeMix(nn.Module):
    """RWKV-7 attention replacement (SPEC steps 1-12)."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        D = {"decay": cfg.d_decay_lora, "aaa": cfg.d_aaa_lora, "mv": cfg.d_mv_lora, "gate": cfg.d_gate_lora}
        self.layer_id, self.n_head, self.head_size, self.wkv_impl = layer_id, H, N, cfg.wkv_impl
        self.compiled = bool(cfg.compile)

        def vec() -> nn.Parameter:
            return nn.Parameter(torch.empty(1, 1, C))

        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (vec() for _ in range(6))
        self.w0, self.w1, self.w2 = vec(), nn.Parameter(torch.empty(C, D["decay"])), nn.Parameter(torch.empty(D["decay"], C))
        self.a0, self.a1, self.a2 = vec(), nn.Parameter(torch.empty(C, D["aaa"])), nn.Parameter(torch.empty(D["aaa"], C))
        # v0/v1/v2 exist in every layer (checkpoint format) but layer 0 does not use them: frozen there,
        # so optimizers skip them and DDP does not wait for gradients that never come.
        self.v0, self.v1, self.v2 = vec(), nn.Parameter(torch.empty(C, D["mv"])), nn.Parameter(torch.empty(D["mv"], C))
        if layer_id == 0:
            for p in (self.v0, self.v1, self.v2):
                p.requires_grad_(False)
        self.g1, self.g2 = nn.Parameter(torch.empty(C, D["gate"])), nn.Parameter(torch.empty(D["gate"], C))
        self.k_k, self.k_a, self.r_k = vec(), vec(), nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)

    def forward(self, x: Tensor, v_first: Tensor | None, shift: Tensor | None,
                wkv_state: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (B,T,C) -> (out (B,T,C), v_first (B,T,C), last x (B,C), wkv state (B,H,N,N))."""
        B, T, C = x.shape
        heads = (B, T, self.n_head, self.head_size)
        project, readout = (_project_compiled, _readout_compiled) if self.compiled else (_project, _readout)
        # Layer 0 has no v_first yet: passing None (not the layer index) keeps the compiled variants
        # at two, whatever the depth.
        r, w, k, v, a_in, b_in, g = project(self, x, v_first if self.layer_id > 0 else None, shift)
        y, wkv_state = wkv7(r.view(heads), w.view(heads), k.view(heads), v.view(heads), a_in, b_in,
                            state=wkv_state, impl=self.wkv_impl)  # (B,T,H,N)
        return readout(self, y, r, k, v, g), (v if self.layer_id == 0 else v_first), x[:, -1], wkv_state


# TimeMix's work before and after WKV7, as plain functions so that --compile 1 can compile exactly
# these: every output is a fresh tensor (views and pass-through values are made in the eager
# forward; aliased outputs of compiled graphs crashed torch 2.13's AOTAutograd replay). WKV7 stays
# out of the compiled graphs (see src/wkv7/__init__.py).
def _project(m: TimeMix, x: Tensor, v_first: Tensor | None,
             shift: Tensor | None) -> tuple[Tensor, ...]:
    """SPEC steps 1-9: x (B,T,C) -> r, w, k, v, g (B,T,C) and the WKV7 a, b inputs (B,T,H,N)."""
    B, T, C = x.shape
    H, N = m.n_head, m.head_size
    xx = token_shift(x, shift) - x                                            # (B,T,C)
    xr, xw, xk = x + xx * m.x_r, x + xx * m.x_w, x + xx * m.x_k
    xv, xa, xg = x + xx * m.x_v, x + xx * m.x_a, x + xx * m.x_g

    r = m.receptance(xr)
    w = -F.softplus(-(m.w0 + torch.tanh(xw @ m.w1) @ m.w2)) - 0.5            # log(-log d), <= -0.5
    k = m.key(xk)
    v = m.value(xv)
    if v_first is not None:                                                   # layers 1..L-1
        v = v + (v_first - v) * torch.sigmoid(m.v0 + (xv @ m.v1) @ m.v2)
    a = torch.sigmoid(m.a0 + (xa @ m.a1) @ m.a2)                              # in-context learning rate
    g = torch.sigmoid(xg @ m.g1) @ m.g2

    kk = F.normalize((k * m.k_k).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12)  # (B,T,H,N)
    k = k * (1 + (a - 1) * m.k_a)
    return r, w, k, v, -kk, kk * a.view(B, T, H, N), g


def _readout(m: TimeMix, y: Tensor, r: Tensor, k: Tensor, v: Tensor, g: Tensor) -> Tensor:
    """SPEC steps 10-12: WKV7's y (B,T,H,N) -> GroupNorm, bonus, gate, output projection (B,T,C)."""
    B, T, C = r.shape
    H, N = m.n_head, m.head_size
    y = m.ln_x(y.reshape(B * T, C)).view(B, T, C)
    bonus = (r.view(B, T, H, N) * k.view(B, T, H, N) * m.r_k).sum(dim=-1, keepdim=True) * v.view(B, T, H, N)
    return m.output((y + bonus.view(B, T, C)) * g)


_project_compiled = torch.compile(_project)     # compiles on first call, for --compile 1 only
_readout_compiled = torch.compile(_readout)


class ChannelMix(nn.Module):
    """RWKV-7 feed-forward: squared-ReLU MLP on a token-shifted input."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.x_k = nn.Parameter(torch.empty(1, 1, cfg.n_embd))
        self.key = nn.Linear(cfg.n_embd, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, cfg.n_embd, bias=False)
        self.compiled = bool(cfg.compile)

    def forward(self, x: Tensor, shift: Tensor | None) -> tuple[Tensor, Tensor]:
        """x (B,T,C) -> (out (B,T,C), last x (B,C))."""
        return (_ffn_compiled if self.compiled else _ffn)(self, x, shift), x[:, -1]


def _ffn(m: ChannelMix, x: Tensor, shift: Tensor | None) -> Tensor:
    k = x + (token_shift(x, shift) - x) * m.x_k
    return m.value(torch.relu(m.key(k)) ** 2)


_ffn_compiled = torch.compile(_ffn)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg)

    def forward(self, x: Tensor, v_first: Tensor | None,
                state: tuple[Tensor, Tensor, Tensor] | None) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        att_shift, wkv_state, ffn_shift = state if state is not None else (None, None, None)
        if self.layer_id == 0:
            x = self.ln0(x)
        dx, v_first, att_shift, wkv_state = self.att(self.ln1(x), v_first, att_shift, wkv_state)
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        return x + dx, v_first, (att_shift, wkv_state, ffn_shift)


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; in backward, pushes each counted position's largest logit towards 0.

    The extra gradient is max_logit * 1e-4 / n_positions at the arg-max (SPEC); it keeps logits from
    drifting upward in bf16. It is scaled by the incoming gradient so loss scaling and gradient
    accumulation treat it like the loss itself.
    """

    @staticmethod
    def forward(ctx: Any, loss: Tensor, logits: Tensor, mask: Tensor | None) -> Tensor:
        ctx.save_for_backward(logits, mask)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, Tensor, None]:
        logits, mask = ctx.saved_tensors                                       # (B,T,V), (B,T) or None
        max_logit, ids = torch.max(logits, dim=-1, keepdim=True)               # (B,T,1)
        if mask is None:
            scale = 1e-4 / logits[..., 0].numel()
            push = max_logit * scale
        else:
            scale = 1e-4 / mask.sum().clamp(min=1)
            push = max_logit * scale * mask.unsqueeze(-1).to(logits.dtype)
        # Scaled before the scatter: (B,T,1) values, not another pass over the (B,T,V) gradient.
        grad_logits = torch.zeros_like(logits).scatter_(-1, ids, push * grad_loss)
        return grad_loss, grad_logits, None


def lm_loss(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cross-entropy over all positions, or the mask-weighted mean when a (B,T) mask is given."""
    V = logits.size(-1)
    flat = logits.reshape(-1, V)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # softmax statistics in half precision lose too much
    if mask is None:
        return F.cross_entropy(flat, targets.reshape(-1))
    per_token = F.cross_entropy(flat, targets.reshape(-1), reduction="none")
    m = mask.reshape(-1).to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------
# Initialisation (SPEC section 1). One rule per parameter name (layer index stripped); every
# parameter must match exactly one rule, so a renamed or new parameter cannot go uninitialised.
# ----------------------------------------------------------------------------------------------

def _orthogonal(gain: float, tall_boost: bool = False) -> Callable[[Tensor], Tensor]:
    """Orthogonal init; tall_boost multiplies the gain by sqrt(rows/cols) for tall matrices (SPEC
    asks for it on the LoRA w2/a2/v2/g2 only; the large matrices use their gain as given)."""
    def fill(p: Tensor) -> Tensor:
        rows, cols = p.shape
        g = gain * math.sqrt(rows / cols) if tall_boost and rows > cols else gain
        return nn.init.orthogonal_(torch.empty(p.shape), gain=g)
    return fill


def init_rules(cfg: ModelConfig, layer: int) -> dict[str, Callable[[Tensor], Tensor]]:
    """name-within-block (or top-level name) -> function(param) returning its initial value."""
    C, L, N, V = cfg.n_embd, cfg.n_layer, cfg.head_size, cfg.vocab_size
    r01 = layer / (L - 1) if L > 1 else 0.0       # 0 at the first layer, 1 at the last
    r1 = 1.0 - layer / L                          # 1 at the first layer, 1/L at the last
    n = torch.arange(C, dtype=torch.float64)
    ddd = n / C
    linear = n / (C - 1) - 0.5
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = z * z.abs()
    www = -6 + 6 * (n / (C - 1)) ** (1 + r01 ** 0.3)

    def const(value: float | Tensor) -> Callable[[Tensor], Tensor]:
        return lambda p: torch.as_tensor(value, dtype=torch.float64).expand(p.shape).clone()

    def mix(power: float) -> Callable[[Tensor], Tensor]:
        return const((1 - ddd ** power).view(1, 1, C))

    head_gain = 0.5 * math.sqrt(V / C) if V > C else 0.5
    return {
        "emb.weight": lambda p: torch.empty(p.shape).uniform_(-1e-4, 1e-4),
        "head.weight": _orthogonal(head_gain),
        "ln_out.weight": const(1.0), "ln_out.bias": const(0.0),
        "ln0.weight": const(1.0), "ln0.bias": const(0.0),
        "ln1.weight": const(1.0), "ln1.bias": const(0.0),
        "ln2.weight": const(1.0), "ln2.bias": const(0.0),
        "att.x_r": mix(0.2 * r1), "att.x_w": mix(0.9 * r1), "att.x_k": mix(0.7 * r1),
        "att.x_v": mix(0.7 * r1), "att.x_a": mix(0.9 * r1), "att.x_g": mix(0.2 * r1),
        "att.w0": const((www + 0.5 + 2.5 * zigzag).view(1, 1, C)),
        "att.a0": const((-0.19 + 0.3 * zigzag + 0.4 * linear).view(1, 1, C)),
        "att.v0": const((0.73 - 0.4 * linear).view(1, 1, C)),
        "att.w1": const(0.0), "att.a1": const(0.0), "att.v1": const(0.0), "att.g1": const(0.0),
        "att.w2": _orthogonal(0.1, tall_boost=True), "att.a2": _orthogonal(0.1, tall_boost=True),
        "att.v2": _orthogonal(0.1, tall_boost=True), "att.g2": _orthogonal(0.1, tall_boost=True),
        "att.k_k": const((0.71 - 0.1 * linear).view(1, 1, C)),
        "att.k_a": const(1.02), "att.r_k": const(-0.04),
        "att.receptance.weight": _orthogonal(1.0), "att.key.weight": _orthogonal(0.1),
        "att.value.weight": _orthogonal(1.0), "att.output.weight": const(0.0),
        "att.ln_x.weight": const(((layer + 1) / L) ** 0.7), "att.ln_x.bias": const(0.0),
        "ffn.x_k": mix(r1 ** 4),
        "ffn.key.weight": _orthogonal(1.0), "ffn.value.weight": const(0.0),
    }


class RWKV(pl.LightningModule):
    """RWKV-7 LM. `model(idx)` -> logits (B,T,V); `forward_with_state` carries the RNN state."""

    def __init__(self, cfg: ModelConfig, init_weights: bool = True) -> None:
        """init_weights=False skips SPEC's initialisation (orthogonal QRs, seconds at L8-D512) for
        callers that load a checkpoint right after."""
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if init_weights:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fill every parameter per SPEC (what the init stage saves as rwkv-init.pth)."""
        rules = [init_rules(self.cfg, layer) for layer in range(self.cfg.n_layer)]
        for name, p in self.named_parameters():
            m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
            layer, key = (int(m.group(1)), m.group(2)) if m else (0, name)
            assert key in rules[layer], f"no initialisation rule for parameter {name}: add one to init_rules()"
            p.copy_(rules[layer][key](p).to(p.dtype))

    def empty_state(self, batch: int, device: torch.device | str | None = None) -> State:
        """Zero RNN state: per layer att x_prev (B,C), wkv (B,H,N,N) fp32, ffn x_prev (B,C)."""
        cfg, dt = self.cfg, self.emb.weight.dtype
        device = device if device is not None else self.emb.weight.device
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        state: State = []
        for _ in range(cfg.n_layer):
            state += [torch.zeros(batch, C, dtype=dt, device=device),
                      torch.zeros(batch, H, N, N, dtype=torch.float32, device=device),
                      torch.zeros(batch, C, dtype=dt, device=device)]
        return state

    def forward_with_state(self, idx: Tensor, state: State | None) -> tuple[Tensor, State]:
        """idx (B,T) -> (logits (B,T,V), new state). state None starts from zeros."""
        x = self.emb(idx)                                                      # (B,T,C)
        v_first: Tensor | None = None
        new_state: State = []
        for i, block in enumerate(self.blocks):
            layer_state = None if state is None else (state[3 * i], state[3 * i + 1], state[3 * i + 2])
            if self.cfg.grad_cp and self.training and torch.is_grad_enabled():
                x, v_first, layer_state = checkpoint(block, x, v_first, layer_state, use_reentrant=False)
            else:
                x, v_first, layer_state = block(x, v_first, layer_state)
            new_state += list(layer_state)
        return self.head(self.ln_out(x)), new_state

    def forward(self, idx: Tensor) -> Tensor:
        """idx (B,T) long -> logits (B,T,V)."""
        return self.forward_with_state(idx, None)[0]

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        """batch = (x, y) or (x, y, mask), each (B,T); returns the (masked) mean cross-entropy."""
        x, y = batch[0], batch[1]
        mask = batch[2] if len(batch) > 2 else None
        logits = self(x)
        # Not self.log()'d: src/trainer.py's TrainingMonitor reads the returned loss once per step and
        # shows it (a second logged copy cost Lightning bookkeeping and a GPU sync per step).
        return L2Wrap.apply(lm_loss(logits, y, mask), logits, mask)

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """SPEC's groups: att.w0 at 2x lr, weight decay only on 2-D `.weight` matrices."""
        decay, no_decay, w0 = [], [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith("att.w0"):
                w0.append(p)
            elif p.dim() == 2 and name.endswith(".weight") and self.cfg.weight_decay > 0:
                decay.append(p)
            else:
                no_decay.append(p)
        groups = [
            {"params": no_decay, "weight_decay": 0.0, "my_lr_scale": 1.0},
            {"params": w0, "weight_decay": 0.0, "my_lr_scale": 2.0},
            {"params": decay, "weight_decay": self.cfg.weight_decay, "my_lr_scale": 1.0},
        ]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        groups = self.optimizer_groups()
        kwargs = dict(lr=cfg.lr_init, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
        on_gpu = self.device.type == "cuda"
        if on_gpu and isinstance(self.trainer.strategy, DeepSpeedStrategy):
            zero = self.trainer.strategy.config.get("zero_optimization", {})
            if "offload_optimizer" in zero:  # optimizer steps on the CPU: DeepSpeed requires its CPU Adam
                from deepspeed.ops.adam import DeepSpeedCPUAdam
                return DeepSpeedCPUAdam(groups, bias_correction=True, adamw_mode=True, amsgrad=False, **kwargs)
            from deepspeed.ops.adam import FusedAdam  # GPU-only import, DeepSpeed's fused multi-tensor Adam
            return FusedAdam(groups, bias_correction=True, adam_w_mode=True, amsgrad=False, **kwargs)
        # Decoupled decay (AdamW) as DeepSpeed's adam_w_mode; groups without decay behave as Adam.
        # Fused (one kernel over all tensors; 3x faster than the per-tensor loop on CPU at L8-D512)
        # except under fp16, whose loss scaler must unscale before clipping: a fused optimizer would
        # unscale inside its step instead (see configure_gradient_clipping).
        # (_trainer: configure_optimizers also works on a model not attached to a Trainer, as fp32)
        precision = self._trainer.precision if self._trainer is not None else "32-true"
        fused = precision != "16-mixed" and self.device.type in ("cpu", "cuda")
        return torch.optim.AdamW(groups, fused=fused or None, foreach=None if fused else on_gpu, **kwargs)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip by global norm. Lightning's mixed-precision plugin refuses any fused optimizer (an fp16
        one unscales inside its step); ours is fused only without a loss scaler, so its gradients are
        the true ones and are clipped here directly."""
        if gradient_clip_val and getattr(optimizer, "defaults", {}).get("fused"):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(f"gradient_clip_algorithm {gradient_clip_algorithm!r} is not supported with a fused "
                                 "optimizer: use Trainer(gradient_clip_algorithm='norm') (what train.py passes)")
            torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
