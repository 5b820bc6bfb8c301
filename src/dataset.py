"""Training datasets over binidx data (written by data/make_data.py).

Both are map-style datasets that the trainer iterates IN ORDER (no DistributedSampler, no shuffle):
all randomness is in the index math, so a run resumed at mini-epoch `epoch_begin` continues exactly
where it stopped, and ranks read disjoint samples. Everything is passed explicitly at construction.
Item i of rank `rank` (of `world_size`) belongs to mini-epoch epoch_begin + i // (samples_per_epoch //
world_size); its global sample number is g = epoch * samples_per_epoch + (i % per_rank) * world_size +
rank (src.sampler.global_index). A mini-epoch is 40320 samples (SPEC); world_size * micro_bsz must
divide it.

PretrainDataset (--data_type binidx): SPEC's magic-prime sampler over the whole .bin as one token
stream: sample g reads the ctx_len+1 tokens at window_start(g + 1) (src/sampler.py); x = first
ctx_len, y = last ctx_len. Any magic_prime consecutive samples visit every window once. The prime is
checked at construction; a wrong one is an error that prints the right value.

SFTDataset (--data_type sft): document aligned. Every sample starts at a document (conversation) start
and holds ctx_len+1 tokens:
- mode "pack": the document and those that follow it in the .bin (make_data already shuffled them).
  Samples are cut greedily: the next sample starts at the first document the previous one could not
  hold entirely, so every document of at most ctx_len+1 tokens is seen whole once per pass, and
  little is repeated. Past the end of the .bin: padding.
- mode "pad": the document alone, padded with token 0.
A pass is a deterministic permutation of the samples (numpy PCG64 seeded with (seed, pass number));
sample g is item g % n_samples of pass g // n_samples, so ranks never share a sample within a pass.
Returns (x, y, mask): mask (ctx_len,) uint8 aligned with y, 1 where y is an assistant token or its
<|im_end|> (from PREFIX.mask), 0 elsewhere and on padding. whole_sequence=True trains on every real
token instead (mask 1 except on padding), as the original project did; it needs no .mask file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from src.binidx import MMapIndexedDataset, open_mask
from src import sampler
from src.sampler import SAMPLES_PER_EPOCH, global_index, magic_prime_problem, too_small_message, window_start


def _check_layout(rank: int, world_size: int, micro_bsz: int, samples_per_epoch: int, n_epochs: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    real_bsz = world_size * micro_bsz
    if samples_per_epoch % real_bsz:
        raise ValueError(f"world_size * micro_bsz = {real_bsz} must divide the {samples_per_epoch} samples of a "
                         "mini-epoch: pick micro_bsz / GPU counts that divide 40320 (e.g. 1, 2, 4, 8, 16, 32, 64)")
    if n_epochs < 0:
        raise ValueError(f"n_epochs must be >= 0, got {n_epochs}")


def _check_index(i: int, n: int) -> None:
    # The index math would happily go on into mini-epochs the dataset was not built for.
    if not 0 <= i < n:
        raise IndexError(f"sample {i} is outside this dataset's {n} samples (its n_epochs mini-epochs for this rank)")


class PretrainDataset(Dataset):
    """Magic-prime sampler over data_file.bin; item i -> (x, y) LongTensors (ctx_len,)."""

    def __init__(self, data_file: str | Path, ctx_len: int, magic_prime: int, rank: int = 0, world_size: int = 1,
                 epoch_begin: int = 0, n_epochs: int = 1, micro_bsz: int = 1,
                 samples_per_epoch: int = SAMPLES_PER_EPOCH):
        _check_layout(rank, world_size, micro_bsz, samples_per_epoch, n_epochs)
        self.data = MMapIndexedDataset(data_file)
        self.ctx_len, self.magic_prime = ctx_len, magic_prime
        self.rank, self.world_size, self.epoch_begin, self.n_epochs = rank, world_size, epoch_begin, n_epochs
        self.samples_per_epoch = samples_per_epoch
        n = self.data.num_tokens
        problem = magic_prime_problem(magic_prime, n, ctx_len)
        if problem is not None:
            small = too_small_message(n, ctx_len)
            if small is not None:
                raise ValueError(f"{self.data.prefix}: {small}")
            raise ValueError(f"--magic_prime {magic_prime} is wrong for {self.data.prefix} ({n} tokens, ctx_len "
                             f"{ctx_len}): {problem}. Use --magic_prime {sampler.magic_prime(n, ctx_len)} "
                             f"--my_exit_tokens {n} (what data/make_data.py printed)")

    def __len__(self) -> int:
        return self.n_epochs * (self.samples_per_epoch // self.world_size)

    def window_start(self, i: int) -> int:
        """Token offset in .bin of the window item i reads."""
        g = global_index(i, self.epoch_begin, self.rank, self.world_size, self.samples_per_epoch)
        return window_start(g + 1, self.magic_prime, self.ctx_len)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_index(i, len(self))
        s = self.window_start(i)
        w = torch.from_numpy(self.data.tokens[s:s + self.ctx_len + 1].astype(np.int64))  # (ctx_len+1,)
        return w[:-1], w[1:]


def pack_starts(doc_starts: np.ndarray, doc_sizes: np.ndarray, span: int) -> np.ndarray:
    """Token offsets where the "pack" samples of `span` tokens begin (see the module docstring)."""
    ends = doc_starts + doc_sizes
    # first document that does not end inside the window of each document's sample
    cut = np.searchsorted(ends, doc_starts + span, side="right")
    out, j, n = [], 0, len(doc_starts)
    while j < n:
        out.append(doc_starts[j])
        j = max(int(cut[j]), j + 1)  # a document longer than the window: its tail is dropped
    return np.asarray(out, dtype=np.int64)


class SFTDataset(Dataset):
    """Document-aligned samples of data_file; item i -> (x, y, mask) long/long/uint8 (ctx_len,)."""

    MODES = ("pack", "pad")

    def __init__(self, data_file: str | Path, ctx_len: int, rank: int = 0, world_size: int = 1,
                 epoch_begin: int = 0, n_epochs: int = 1, micro_bsz: int = 1, mode: str = "pack",
                 whole_sequence: bool = False, seed: int = 0, samples_per_epoch: int = SAMPLES_PER_EPOCH):
        _check_layout(rank, world_size, micro_bsz, samples_per_epoch, n_epochs)
        if mode not in self.MODES:
            raise ValueError(f"SFT mode {mode!r}: expected one of {', '.join(self.MODES)}")
        self.data = MMapIndexedDataset(data_file)
        self.ctx_len, self.mode, self.whole_sequence, self.seed = ctx_len, mode, whole_sequence, seed
        self.rank, self.world_size, self.epoch_begin, self.n_epochs = rank, world_size, epoch_begin, n_epochs
        self.samples_per_epoch = samples_per_epoch
        if not whole_sequence:
            open_mask(self.data.prefix, self.data.num_tokens)  # fail now, not in a DataLoader worker
        self._mask: np.ndarray | None = None
        starts = self.data.item_starts()
        if mode == "pack":
            self.starts = pack_starts(starts, np.asarray(self.data.sizes, dtype=np.int64), ctx_len + 1)
            self.lengths = np.full(len(self.starts), ctx_len + 1, dtype=np.int64)
        else:
            self.starts = starts
            self.lengths = np.minimum(np.asarray(self.data.sizes, dtype=np.int64), ctx_len + 1)
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def n_samples(self) -> int:
        """Samples in one pass over the data."""
        return len(self.starts)

    def __len__(self) -> int:
        return self.n_epochs * (self.samples_per_epoch // self.world_size)

    def permutation(self, pass_no: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != pass_no:
            self._perm = (pass_no, np.random.default_rng((self.seed, pass_no)).permutation(self.n_samples))
        return self._perm[1]

    def sample_of(self, i: int) -> int:
        """Which sample (index into self.starts) item i reads."""
        g = global_index(i, self.epoch_begin, self.rank, self.world_size, self.samples_per_epoch)
        pass_no, j = divmod(g, self.n_samples)
        return int(self.permutation(pass_no)[j])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_index(i, len(self))
        k = self.sample_of(i)
        s = int(self.starts[k])
        n = min(int(self.lengths[k]), self.data.num_tokens - s)  # real tokens; the rest is padding
        span = self.ctx_len + 1
        tok = np.zeros(span, dtype=np.int64)  # (ctx_len+1,) padded with token 0
        tok[:n] = self.data.tokens[s:s + n]
        # uint8 as in the .mask file: under DeepSpeed Lightning would cast a float mask to bf16 every step
        m = np.zeros(span, dtype=np.uint8)
        if self.whole_sequence:
            m[:n] = 1
        else:
            if self._mask is None:
                self._mask = open_mask(self.data.prefix, self.data.num_tokens)
            m[:n] = self._mask[s:s + n]
        t = torch.from_numpy(tok)
        return t[:-1], t[1:], torch.from_numpy(m[1:])  # mask[t] belongs to y[t] = token t+1

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_mask"] = None  # memory maps are re-opened in each DataLoader worker
        state["_perm"] = None
        return state
