"""Token sampling for chat: banned tokens, presence/frequency penalties with decay, top-p/top-k, temperature.

One reply is generated with one `Sampler`; call `reset()` between replies. Per generated token:

1. logits[banned] = -inf                                   (token 0 `<|endoftext|>` by default)
2. logits[t] -= presence + frequency * count[t]             for every token t generated so far in this
   reply; count[t] is the decayed number of occurrences (see 5.)
3. temperature == 0: arg-max (greedy). Otherwise, on p = softmax(logits) (temperature 1):
   top_k > 0 keeps the k most probable tokens; top_p < 1 keeps the smallest set of most probable tokens
   whose probability sums to at least top_p (always at least one token); then p ** (1 / temperature),
   renormalised, is sampled. This is the RWKV ecosystem's order (the rwkv pip package's sample_logits):
   the nucleus is chosen on the untempered distribution, so temperature only reshapes inside it.
4. the sampled token is returned.
5. count *= decay for every token, then count[token] += 1.

Defaults are the original chat demo's (SPEC section 5): temperature 1.0, top_p 0.3, top_k 0 (off),
presence 0.5, frequency 0.5, decay 0.996. Sampling runs on the CPU in float32 with the Sampler's own
torch.Generator, so a seed gives the same tokens whatever device produced the logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 0.3
    top_k: int = 0
    presence_penalty: float = 0.5
    frequency_penalty: float = 0.5
    penalty_decay: float = 0.996
    banned: tuple[int, ...] = (0,)

    def check(self) -> None:
        """Raise ValueError naming the bad setting and its valid range."""
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 = off)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 <= self.penalty_decay <= 1:
            raise ValueError(f"penalty_decay={self.penalty_decay}: must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            # nan or inf would make every penalised logit nan (inf * a decayed count of 0) mid-reply
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)}: must be a finite number (0 = off)")


def apply_penalties(logits: Tensor, seen: Tensor, count: Tensor, presence: float,
                    frequency: float) -> Tensor:
    """Return logits - (presence + frequency * count) at the tokens marked in `seen`, (V,) each."""
    return logits - torch.where(seen, presence + frequency * count, torch.zeros_like(count))


def top_k_top_p_mask(probs: Tensor, top_k: int, top_p: float) -> Tensor:
    """Boolean (V,) mask of the tokens kept by top-k (0 = off) and then top-p (1 = off) on `probs`."""
    # sort + scatter_ rather than argsort + fancy indexing: the latter is far slower on CPU for (V,)
    sorted_p, order = torch.sort(probs, descending=True, stable=True)
    keep_sorted = torch.ones_like(sorted_p, dtype=torch.bool)
    if top_k > 0:
        keep_sorted[top_k:] = False
    if top_p < 1:
        # Keep a token while the mass of the more probable tokens before it is still below top_p;
        # this keeps the smallest prefix reaching top_p and never drops the most probable token.
        mass_before = torch.cumsum(sorted_p, 0) - sorted_p
        keep_sorted &= mass_before < top_p
    mask = torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted)
    return mask


class Sampler:
    """Stateful sampler for one reply at a time; see the module docstring for the exact rules."""

    def __init__(self, vocab_size: int, config: SamplingConfig | None = None, seed: int | None = None):
        self.config = config or SamplingConfig()
        self.config.check()
        for t in self.config.banned:
            if not 0 <= t < vocab_size:
                raise ValueError(f"banned token {t} is outside the vocabulary [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.banned = torch.tensor(self.config.banned, dtype=torch.long)
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)
        self.count = torch.zeros(vocab_size, dtype=torch.float32)

    def reset(self) -> None:
        """Forget the tokens of the previous reply (penalties start from zero)."""
        self.seen.zero_()
        self.count.zero_()

    def adjusted_logits(self, logits: Tensor) -> Tensor:
        """Steps 1-2: (V,) float32 CPU logits with banned tokens at -inf and the penalties applied."""
        if logits.shape != (self.vocab_size,):
            raise ValueError(f"expected logits of shape ({self.vocab_size},), got {tuple(logits.shape)}")
        cfg = self.config
        out = apply_penalties(logits.detach().float().cpu(), self.seen, self.count,
                              cfg.presence_penalty, cfg.frequency_penalty)
        out.index_fill_(0, self.banned, float("-inf"))
        return out

    def sample(self, logits: Tensor) -> int:
        """Pick the next token from (V,) logits and record it for the penalties."""
        cfg = self.config
        out = self.adjusted_logits(logits)
        if cfg.temperature == 0:
            token = int(torch.argmax(out))
        else:
            logp = torch.log_softmax(out, dim=0)
            keep = top_k_top_p_mask(logp.exp(), cfg.top_k, cfg.top_p)
            # p ** (1/T) renormalised, computed in log space so that small T cannot underflow to 0/0.
            probs = torch.softmax(torch.where(keep, logp, float("-inf")) / cfg.temperature, dim=0)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.observe(token)
        return token

    def observe(self, token: int) -> None:
        """Step 5: decay every count, then count `token` (sample() calls this for its own token)."""
        self.count *= self.config.penalty_decay
        self.count[token] += 1
        self.seen[token] = True
