"""The x070 model: checkpoint format, initialisation, math against an independent reference, loss."""
from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from src.model import RWKV, L2Wrap, ModelConfig, lm_loss, lora_dims

TINY = dict(vocab_size=97, n_layer=3, n_embd=32, head_size=8)


def perturbed(cfg: ModelConfig, seed: int = 0, scale: float = 0.3) -> RWKV:
    """A float64 model whose every parameter is moved off SPEC's init (which zeroes several matrices,
    so an unperturbed model would hide bugs in the terms they multiply)."""
    torch.manual_seed(seed)
    model = RWKV(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def expected_shapes(V: int, L: int, C: int, N: int) -> dict[str, tuple[int, ...]]:
    """SPEC section 1, written out independently of the model code."""
    H = C // N
    D = {512: (64, 64, 32, 128), 768: (64, 64, 32, 128)}.get(C)
    dd, da, dm, dg = D if D else (lora_dims(C, N)["decay"], lora_dims(C, N)["aaa"],
                                  lora_dims(C, N)["mv"], lora_dims(C, N)["gate"])
    s: dict[str, tuple[int, ...]] = {"emb.weight": (V, C), "ln_out.weight": (C,), "ln_out.bias": (C,),
                                     "head.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    for l in range(L):
        p = f"blocks.{l}."
        s.update({p + "ln1.weight": (C,), p + "ln1.bias": (C,), p + "ln2.weight": (C,), p + "ln2.bias": (C,)})
        for n in ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"]:
            s[p + "att." + n] = (1, 1, C)
        s.update({p + "att.w1": (C, dd), p + "att.w2": (dd, C), p + "att.a1": (C, da), p + "att.a2": (da, C),
                  p + "att.v1": (C, dm), p + "att.v2": (dm, C), p + "att.g1": (C, dg), p + "att.g2": (dg, C),
                  p + "att.r_k": (H, N), p + "att.ln_x.weight": (C,), p + "att.ln_x.bias": (C,)})
        for n in ["receptance", "key", "value", "output"]:
            s[p + f"att.{n}.weight"] = (C, C)
        s.update({p + "ffn.x_k": (1, 1, C), p + "ffn.key.weight": (4 * C, C), p + "ffn.value.weight": (C, 4 * C)})
    return s


def test_default_model_has_spec_keys_shapes_and_count() -> None:
    model = RWKV(ModelConfig(), init_weights=False)
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(6400, 8, 512, 64)
    assert sum(p.numel() for p in model.parameters()) == 34_158_592
    assert sum(p.numel() for p in model.blocks[1].parameters()) == 3_450_368


def test_lora_widths() -> None:
    assert lora_dims(512) == {"decay": 64, "aaa": 64, "mv": 32, "gate": 128}
    assert lora_dims(768) == {"decay": 64, "aaa": 64, "mv": 32, "gate": 128}
    # SPEC's formula at C=2048 (its example line says 96/96/64/256, the widths of models made with
    # older rules: those load through the checkpoint's shapes, tests/test_rnn.py)
    assert lora_dims(2048) == {"decay": 128, "aaa": 128, "mv": 64, "gate": 224}
    assert lora_dims(512, head_size=128) == {"decay": 128, "aaa": 128, "mv": 64, "gate": 128}
    cfg = ModelConfig()
    assert (cfg.d_decay_lora, cfg.d_aaa_lora, cfg.d_mv_lora, cfg.d_gate_lora) == (64, 64, 32, 128)
    att = RWKV(ModelConfig(vocab_size=50, n_layer=1, n_embd=64, head_size=16, d_decay_lora=48,
                           d_aaa_lora=40, d_mv_lora=24, d_gate_lora=72), init_weights=False).blocks[0].att
    assert [tuple(att.get_parameter(n).shape) for n in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")] == \
        [(64, 48), (48, 64), (64, 40), (40, 64), (64, 24), (24, 64), (64, 72), (72, 64)]


def test_initialisation_follows_spec() -> None:
    cfg = ModelConfig(vocab_size=1000, n_layer=4, n_embd=128, head_size=32)
    torch.manual_seed(0)
    sd = RWKV(cfg).state_dict()
    C, L, N = 128, 4, 32
    n = torch.arange(C, dtype=torch.float64)
    for l in range(L):
        p = f"blocks.{l}.att."
        r1, r01 = 1 - l / L, l / (L - 1)
        for mix, power in [("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)]:
            assert torch.allclose(sd[p + mix].double().flatten(), 1 - (n / C) ** (power * r1), atol=1e-6), mix
        assert torch.allclose(sd[f"blocks.{l}.ffn.x_k"].double().flatten(), 1 - (n / C) ** (r1 ** 4), atol=1e-6)
        z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        www = -6 + 6 * (n / (C - 1)) ** (1 + r01 ** 0.3)
        assert torch.allclose(sd[p + "w0"].double().flatten(), www + 0.5 + 2.5 * z * z.abs(), atol=1e-5)
        lin = n / (C - 1) - 0.5
        assert torch.allclose(sd[p + "a0"].double().flatten(), -0.19 + 0.3 * z * z.abs() + 0.4 * lin, atol=1e-6)
        assert torch.allclose(sd[p + "v0"].double().flatten(), 0.73 - 0.4 * lin, atol=1e-6)
        assert torch.allclose(sd[p + "k_k"].double().flatten(), 0.71 - 0.1 * lin, atol=1e-6)
        assert torch.all(sd[p + "k_a"] == 1.02) and torch.all(sd[p + "r_k"] == -0.04)
        assert torch.allclose(sd[p + "ln_x.weight"], torch.full((C,), ((l + 1) / L) ** 0.7))
        for zero in ["w1", "a1", "v1", "g1", "output.weight"]:
            assert torch.all(sd[p + zero] == 0), zero
        assert torch.all(sd[f"blocks.{l}.ffn.value.weight"] == 0)
        for name, gain in [("receptance.weight", 1.0), ("key.weight", 0.1), ("value.weight", 1.0)]:
            W = sd[p + name].double()
            assert torch.allclose(W @ W.T, gain ** 2 * torch.eye(C, dtype=torch.float64), atol=1e-5), name
        for lora in ["w2", "a2", "v2", "g2"]:                      # (D, C), rows < cols: orthonormal rows
            W = sd[p + lora].double()
            assert torch.allclose(W @ W.T, 0.01 * torch.eye(W.shape[0], dtype=torch.float64), atol=1e-6), lora
    W = sd["blocks.0.ffn.key.weight"].double()                      # (4C, C): orthonormal columns
    assert torch.allclose(W.T @ W, torch.eye(C, dtype=torch.float64), atol=1e-5)
    head = sd["head.weight"].double()                               # (V, C), V > C: gain 0.5 sqrt(V/C)
    assert torch.allclose(head.T @ head, 0.25 * (1000 / C) * torch.eye(C, dtype=torch.float64), atol=1e-4)
    assert sd["emb.weight"].abs().max() <= 1e-4 and sd["emb.weight"].std() > 1e-5
    assert torch.all(sd["ln_out.weight"] == 1) and torch.all(sd["blocks.0.ln0.bias"] == 0)
    # V <= C: the head's gain is 0.5 (no sqrt(V/C)), and its rows are the orthogonal ones
    head = RWKV(ModelConfig(vocab_size=100, n_layer=1, n_embd=C, head_size=N)).head.weight.detach().double()
    assert torch.allclose(head @ head.T, 0.25 * torch.eye(100, dtype=torch.float64), atol=1e-5)


def test_initialisation_of_norms_lora_gain_and_one_layer() -> None:
    """The rules test_initialisation_follows_spec leaves out: every LayerNorm/GroupNorm bias 0 and weight 1
    (ln_x.weight aside); the LoRA gain 0.1 * sqrt(rows/cols) of a tall w2/a2/v2/g2 (C = 16 < 32 = D);
    and L = 1, where r01 is 0 (SPEC), so www = -6 + 6 n/(C-1) and the mixes use r1 = 1."""
    C, N = 16, 8
    torch.manual_seed(0)
    sd = RWKV(ModelConfig(vocab_size=40, n_layer=1, n_embd=C, head_size=N)).state_dict()
    norms = [k for k in sd if re.fullmatch(r"(blocks\.\d+\.(ln[012]|att\.ln_x)|ln_out)\.(weight|bias)", k)]
    assert len(norms) == 10
    for k in norms:
        want = 0.0 if k.endswith(".bias") else 1.0      # ln_x.weight = ((0+1)/1)^0.7 = 1 at L = 1
        assert torch.all(sd[k] == want), k
    n = torch.arange(C, dtype=torch.float64)
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    assert torch.allclose(sd["blocks.0.att.w0"].double().flatten(), -6 + 6 * n / (C - 1) + 0.5 + 2.5 * z * z.abs(),
                          atol=1e-5)
    assert torch.allclose(sd["blocks.0.att.x_w"].double().flatten(), 1 - (n / C) ** 0.9, atol=1e-6)
    for lora in ["w2", "a2", "v2", "g2"]:
        W = sd["blocks.0.att." + lora].double()                  # (D, C), D > C: orthogonal columns
        rows, cols = W.shape
        assert rows > cols, lora
        assert torch.allclose(W.T @ W, 0.01 * rows / cols * torch.eye(cols, dtype=torch.float64), atol=1e-6), lora
    # the deeper layers' norms too (ln0 exists in layer 0 only)
    sd = RWKV(ModelConfig(vocab_size=40, n_layer=3, n_embd=C, head_size=N)).state_dict()
    for l in range(3):
        for k in ["ln1.weight", "ln2.weight"]:
            assert torch.all(sd[f"blocks.{l}.{k}"] == 1), (l, k)
        for k in ["ln1.bias", "ln2.bias", "att.ln_x.bias"]:
            assert torch.all(sd[f"blocks.{l}.{k}"] == 0), (l, k)


def reference_logits(sd: dict[str, torch.Tensor], tokens: list[int], L: int, H: int, N: int) -> torch.Tensor:
    """SPEC section 1 in RNN form, one token at a time, straight from the state dict (float64)."""
    C = H * N
    sd = {k: v.double() for k, v in sd.items()}
    att_x = [torch.zeros(C, dtype=torch.float64) for _ in range(L)]
    ffn_x = [torch.zeros(C, dtype=torch.float64) for _ in range(L)]
    S = [torch.zeros(H, N, N, dtype=torch.float64) for _ in range(L)]
    out = []
    for tok in tokens:
        x = sd["emb.weight"][tok]
        x = F.layer_norm(x, (C,), sd["blocks.0.ln0.weight"], sd["blocks.0.ln0.bias"])
        v_first = None
        for l in range(L):
            p = f"blocks.{l}."
            g = lambda n: sd[p + "att." + n].flatten() if sd[p + "att." + n].dim() == 3 else sd[p + "att." + n]
            xa_in = F.layer_norm(x, (C,), sd[p + "ln1.weight"], sd[p + "ln1.bias"])
            xx = att_x[l] - xa_in
            att_x[l] = xa_in
            xr, xw, xk, xv, xa, xg = (xa_in + xx * g(n) for n in ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g"])
            r = sd[p + "att.receptance.weight"] @ xr
            k = sd[p + "att.key.weight"] @ xk
            v = sd[p + "att.value.weight"] @ xv
            d = torch.exp(-math.exp(-0.5) * torch.sigmoid(g("w0") + torch.tanh(xw @ g("w1")) @ g("w2")))
            if l == 0:
                v_first = v
            else:
                v = v + (v_first - v) * torch.sigmoid(g("v0") + (xv @ g("v1")) @ g("v2"))
            a = torch.sigmoid(g("a0") + (xa @ g("a1")) @ g("a2"))
            gate = torch.sigmoid(xg @ g("g1")) @ g("g2")
            kk = F.normalize((k * g("k_k")).view(H, N), dim=-1).view(C)
            k = k * (1 + (a - 1) * g("k_a"))
            rh, kh, vh, dh = r.view(H, N), k.view(H, N), v.view(H, N), d.view(H, N)
            ah, bh = -kk.view(H, N), (kk * a).view(H, N)
            Sl = S[l]
            Sl = Sl * dh[:, None, :] + (Sl @ ah[:, :, None]) * bh[:, None, :] + vh[:, :, None] * kh[:, None, :]
            S[l] = Sl
            y = (Sl @ rh[:, :, None]).view(H, N)
            mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
            y = ((y - mu) / torch.sqrt(var + 64e-5)).view(C) * g("ln_x.weight") + g("ln_x.bias")
            y = y + ((rh * kh * sd[p + "att.r_k"]).sum(-1, keepdim=True) * vh).view(C)
            x = x + sd[p + "att.output.weight"] @ (y * gate)
            xf = F.layer_norm(x, (C,), sd[p + "ln2.weight"], sd[p + "ln2.bias"])
            kf = xf + (ffn_x[l] - xf) * sd[p + "ffn.x_k"].flatten()
            ffn_x[l] = xf
            x = x + sd[p + "ffn.value.weight"] @ torch.relu(sd[p + "ffn.key.weight"] @ kf) ** 2
        x = F.layer_norm(x, (C,), sd["ln_out.weight"], sd["ln_out.bias"])
        out.append(sd["head.weight"] @ x)
    return torch.stack(out)


def test_parallel_forward_matches_independent_reference() -> None:
    cfg = ModelConfig(**TINY)
    model = perturbed(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens)[0]
    ref = reference_logits(model.state_dict(), tokens[0].tolist(), cfg.n_layer, cfg.n_head, cfg.head_size)
    assert torch.allclose(logits, ref, rtol=0, atol=1e-9 * ref.abs().max().item())


@pytest.mark.parametrize("split", [1, 16, 17])
def test_rnn_mode_equals_parallel(split: int) -> None:
    """Token-by-token and chunked-with-state forwards give the parallel logits (float32 rounding)."""
    cfg = ModelConfig(**TINY)
    model = perturbed(cfg, seed=2).float()
    tokens = torch.randint(0, cfg.vocab_size, (2, 35), generator=torch.Generator().manual_seed(split))
    with torch.no_grad():
        full = model(tokens)
        state, pieces = None, []
        for t0 in range(0, 35, split):
            out, state = model.forward_with_state(tokens[:, t0:t0 + split], state)
            pieces.append(out)
    got = torch.cat(pieces, dim=1)
    assert torch.allclose(got, full, rtol=0, atol=2e-5 * full.abs().max().item())
    assert len(state) == 3 * cfg.n_layer and state[1].shape == (2, cfg.n_head, cfg.head_size, cfg.head_size)


def test_grad_checkpointing_gives_same_gradients() -> None:
    grads = []
    for grad_cp in (0, 1):
        model = perturbed(ModelConfig(**TINY, grad_cp=grad_cp), seed=3).train()
        x = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
        loss = lm_loss(model(x), x)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def test_l2wrap_adds_the_spec_gradient() -> None:
    logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 1, 0]], dtype=torch.float64)
    # scale: the loss's incoming gradient (e.g. a loss scaler's, or 1/accumulation) scales the extra term too
    # the SFT datasets' masks are uint8
    for m, count, scale in [(None, 10, 1.0), (mask, 6, 1.0), (None, 10, 3.0), (mask.to(torch.uint8), 6, 2.0)]:
        logits.grad = None
        (scale * L2Wrap.apply(lm_loss(logits, targets, m), logits, m)).backward()
        with_wrap = logits.grad.clone()
        logits.grad = None
        (scale * lm_loss(logits, targets, m)).backward()
        extra = with_wrap - logits.grad
        mx, ids = logits.detach().max(-1)
        expected = torch.zeros_like(extra).scatter_(-1, ids[..., None], (scale * mx * 1e-4 / count)[..., None])
        if m is not None:
            expected = expected * m[..., None]
        assert extra.dtype == torch.float64 and torch.allclose(extra, expected, atol=1e-15)


def test_masked_loss_is_mean_over_masked_positions() -> None:
    logits = torch.randn(1, 4, 7, dtype=torch.float64)
    y = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    per = F.cross_entropy(logits[0], y[0], reduction="none")
    assert torch.isclose(lm_loss(logits, y, mask), (per[1] + per[3]) / 2)
    assert torch.isclose(lm_loss(logits, y, mask.to(torch.uint8)), (per[1] + per[3]) / 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_of_half_precision_logits_is_computed_in_float32(dtype: torch.dtype) -> None:
    """bf16/fp16 logits (what autocast gives the loss) are upcast before the softmax: the loss is the
    float64 cross-entropy of the very same logit values to float32 accuracy, masked or not."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 32, 6400, generator=g) * 4).to(dtype)
    y = torch.randint(0, 6400, (2, 32), generator=g)
    mask = (torch.rand(2, 32, generator=g) < 0.5).to(torch.uint8)
    ref = F.cross_entropy(logits.double().view(-1, 6400), y.view(-1), reduction="none").view(2, 32)
    for m, want in [(None, ref.mean()), (mask, (ref * mask).sum() / mask.sum())]:
        got = lm_loss(logits, y, m)
        assert got.dtype == torch.float32
        assert abs(got.item() - want.item()) < 1e-5 * want.item()


def test_optimizer_groups() -> None:
    model = RWKV(ModelConfig(**TINY, weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {(g["my_lr_scale"], g["weight_decay"]): {names[id(p)] for p in g["params"]}
              for g in model.optimizer_groups()}
    assert groups[(2.0, 0.0)] == {f"blocks.{l}.att.w0" for l in range(3)}
    decay = groups[(1.0, 0.1)]
    assert "emb.weight" in decay and "head.weight" in decay and "blocks.1.att.key.weight" in decay
    assert "blocks.2.ffn.value.weight" in decay and "blocks.0.att.w1" not in decay
    assert all(n.endswith(".weight") and "ln" not in n for n in decay)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*groups.values()) == trainable
    # the CPU optimizer takes lr, betas and eps from the config (the published --adam_eps is 1e-18)
    model = RWKV(ModelConfig(**TINY, lr_init=7e-4, beta1=0.8, beta2=0.95, adam_eps=1e-18))
    model.trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False)
    opt = model.configure_optimizers()
    assert all((g["lr"], g["betas"], g["eps"]) == (7e-4, (0.8, 0.95), 1e-18) for g in opt.param_groups)
    assert opt.defaults["fused"]   # no loss scaler under bf16: one fused kernel for all parameters
    # fp16's loss scaler must unscale before clipping, which a fused optimizer would do inside its step
    model.trainer = SimpleNamespace(precision="16-mixed", strategy=None)
    assert not model.configure_optimizers().defaults["fused"]
    model.trainer = None   # not attached to a Trainer: fp32
    assert model.configure_optimizers().defaults["fused"]
    assert trainable == set(names.values()) - {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}


def test_config_errors_name_the_flag() -> None:
    with pytest.raises(ValueError, match="--dim_att"):
        ModelConfig(n_embd=64, dim_att=128, head_size=16)
    with pytest.raises(ValueError, match="--head_size"):
        ModelConfig(n_embd=100, head_size=64)
    with pytest.raises(ValueError, match="--wkv_impl"):
        ModelConfig(wkv_impl="fast")
