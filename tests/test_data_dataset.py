"""The magic-prime sampler (src/sampler.py) and the training datasets (src/dataset.py)."""
from __future__ import annotations

import json
import math
import os
import random
import struct

import numpy as np
import pytest
import torch

from data.make_data import make_data
from src.binidx import MMapIndexedDataset, MMapIndexedDatasetBuilder, open_mask
from src.dataset import PretrainDataset, SFTDataset, pack_starts
from src.sampler import SAMPLES_PER_EPOCH, is_prime, magic_prime, magic_prime_problem
from src.tokenizer import IM_END, load_tokenizer


def brute_is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def brute_magic_prime(data_size: int, ctx_len: int) -> int | None:
    cands = [p for p in range(2, data_size // ctx_len) if p % 3 == 2 and brute_is_prime(p)]
    return max(cands) if cands else None


def test_is_prime_against_trial_division():
    rng = random.Random()
    for n in list(range(0, 3000)) + [rng.randrange(10**6, 10**8) for _ in range(300)]:
        assert is_prime(n) == brute_is_prime(n), n
    assert not is_prime(3215031751)  # strong pseudoprime to bases 2, 3, 5, 7
    assert is_prime(2**61 - 1) and not is_prime((2**61 - 1) * (2**31 - 1))


def test_magic_prime_against_brute_force():
    rng = random.Random()
    for _ in range(200):
        ctx = rng.choice([1, 2, 16, 512, 1024])
        size = rng.randrange(0, 20_000 * ctx)
        assert magic_prime(size, ctx) == brute_magic_prime(size, ctx), (size, ctx)


@pytest.mark.parametrize("tokens, ctx, p", [(441_795_307, 512, 862_811), (1_843_253_579, 512, 3_600_053),
                                            (1_430_197_426, 1024, 1_396_673), (2_398_644_915, 2048, 1_171_199)])
def test_magic_prime_of_the_published_minimind_token_counts(tokens, ctx, p):
    assert magic_prime(tokens, ctx) == p  # SPEC: the numbers the original printed for MiniMind's files


# ------------------------------------------------------------------------------------ pretraining
def write_random_bin(path, n_tokens: int, rng: np.random.Generator) -> np.ndarray:
    toks = rng.integers(0, 6400, size=n_tokens)
    cuts = np.sort(rng.choice(np.arange(1, n_tokens), size=n_tokens // 50, replace=False))
    with MMapIndexedDatasetBuilder(path, np.uint16) as b:
        b.add_documents(toks, np.diff(np.concatenate(([0], cuts, [n_tokens]))))
    return toks


def test_sampler_visits_every_window_once_and_ranks_never_overlap(tmp_path):
    rng = np.random.default_rng()
    ctx, W = 2, 4
    toks = write_random_bin(tmp_path / "d", int(rng.integers(2 * 45_000, 2 * 60_000)), rng)
    p = magic_prime(len(toks), ctx)
    assert p > SAMPLES_PER_EPOCH  # p consecutive samples cross a mini-epoch boundary
    factor = int(p * (math.sqrt(5) - 1) / 2)
    per_rank = SAMPLES_PER_EPOCH // W
    window_of_global: dict[int, int] = {}
    for r in range(W):
        ds = PretrainDataset(tmp_path / "d", ctx, p, rank=r, world_size=W, n_epochs=2, micro_bsz=8)
        assert len(ds) == 2 * per_rank
        for i in range(len(ds)):
            g = (i // per_rank) * SAMPLES_PER_EPOCH + (i % per_rank) * W + r
            assert g not in window_of_global  # no two ranks (or items) share a sample
            s = ds.window_start(i)
            assert s == (factor * (g + 1) ** 3 % p) * ctx  # SPEC's formula, with Python big ints
            window_of_global[g] = s // ctx
    assert sorted(window_of_global) == list(range(2 * SAMPLES_PER_EPOCH))
    first_p = [window_of_global[g] for g in range(p)]
    assert sorted(first_p) == list(range(p))  # every window exactly once over p samples
    ds = PretrainDataset(tmp_path / "d", ctx, p, rank=1, world_size=W, n_epochs=2, micro_bsz=8)
    for i in rng.integers(0, len(ds), size=50):
        x, y = ds[int(i)]
        s = ds.window_start(int(i))
        assert x.dtype == torch.long and x.shape == (ctx,) and torch.equal(x, torch.from_numpy(toks[s:s + ctx]))
        assert torch.equal(y, torch.from_numpy(toks[s + 1:s + ctx + 1]))
    resumed = PretrainDataset(tmp_path / "d", ctx, p, rank=1, world_size=W, epoch_begin=1, n_epochs=1, micro_bsz=8)
    assert [resumed.window_start(i) for i in range(100)] == [ds.window_start(per_rank + i) for i in range(100)]


def test_wrong_magic_prime_prints_the_right_one(tmp_path):
    rng = np.random.default_rng()
    toks = write_random_bin(tmp_path / "d", int(rng.integers(20_000, 40_000)), rng)
    right = magic_prime(len(toks), 16)
    for wrong, why in [(right + 1, "not prime"), (right - 1, "not prime"),
                       (next(q for q in range(right - 1, 2, -1) if is_prime(q) and q % 3 == 1), "% 3 =="),
                       (next(q for q in range(right - 1, 2, -1) if is_prime(q) and q % 3 == 2 and q < 0.9 * len(toks) // 16),
                        "covers only")]:
        with pytest.raises(ValueError, match=why) as e:
            PretrainDataset(tmp_path / "d", 16, wrong)
        assert f"--magic_prime {right} --my_exit_tokens {len(toks)}" in str(e.value)
    PretrainDataset(tmp_path / "d", 16, right)
    with pytest.raises(ValueError, match="too few for ctx_len"):
        PretrainDataset(tmp_path / "d", len(toks) // 3, 2)  # 3 windows: p=2 covers 67%
    with pytest.raises(ValueError, match="must divide"):
        PretrainDataset(tmp_path / "d", 16, right, world_size=3, micro_bsz=11)
    with pytest.raises(ValueError, match="rank 4 is outside"):
        PretrainDataset(tmp_path / "d", 16, right, rank=4, world_size=4)


def test_the_last_window_needs_ctx_len_plus_1_tokens(tmp_path):
    """p windows of ctx_len: the last starts at (p-1)*ctx_len and reads ctx_len+1 tokens (x and its shifted
    y), so p = 1013 at ctx_len 4 needs 4053 tokens; 4052 hold 1013 windows of 4 but not the last target."""
    assert is_prime(1013) and 1013 % 3 == 2
    assert "need more than the 4052 tokens" in magic_prime_problem(1013, 4052, 4)
    assert magic_prime_problem(1013, 4053, 4) is None
    rng = np.random.default_rng(0)
    write_random_bin(tmp_path / "short", 4052, rng)
    with pytest.raises(ValueError, match=r"--magic_prime 1013 is wrong .*need more than the 4052 tokens.* "
                                         r"Use --magic_prime 983 --my_exit_tokens 4052"):
        PretrainDataset(tmp_path / "short", 4, 1013)
    toks = write_random_bin(tmp_path / "fits", 4053, rng)
    ds = PretrainDataset(tmp_path / "fits", 4, 1013, n_epochs=1, samples_per_epoch=1024, micro_bsz=1)
    starts = [ds.window_start(i) for i in range(1013)]
    assert sorted(starts) == list(range(0, 4052, 4))
    x, y = ds[starts.index(4048)]
    assert torch.equal(x, torch.from_numpy(toks[4048:4052])) and torch.equal(y, torch.from_numpy(toks[4049:4053]))


# -------------------------------------------------------------------------------------------- SFT
WORDS = ["hi", "数据", "🙂", "cat", " dog", "\n", "42", "模型", "ok"]


def make_sft(tmp_path, n: int, rng: random.Random):
    def text():
        return "".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))

    recs = []
    for _ in range(n):
        msgs = []
        for _ in range(rng.randint(1, 2)):
            msgs += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        recs.append({"conversations": msgs})
    src = tmp_path / "sft.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n", encoding="utf-8")
    make_data(src, 1, 32, out=tmp_path / "sft", progress=False)
    return tmp_path / "sft"


def test_pack_starts_cover_every_document_whole():
    rng = np.random.default_rng()
    sizes = rng.integers(1, 40, size=500)
    sizes[rng.integers(0, 500, size=5)] = 100  # some documents longer than the window
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    span = 33
    ps = pack_starts(starts, sizes, span)
    assert ps[0] == 0 and set(ps.tolist()) <= set(starts.tolist()) and (np.diff(ps) > 0).all()
    for s, n in zip(starts, sizes):
        k = np.searchsorted(ps, s, side="right") - 1  # the last sample starting at or before the document
        if n <= span:
            assert s + n <= ps[k] + span, "a document that fits the window is never seen whole"
    # a window that ends exactly where a document ends holds that one whole: the next starts after it
    exact = np.array([10, 23, 5, 7])
    assert pack_starts(np.array([0, 10, 33, 38]), exact, 33).tolist() == [0, 33]
    # greedy: the next sample starts at the first document the previous one cut
    for a, b in zip(ps[:-1], ps[1:]):
        j = np.searchsorted(starts, b)
        assert starts[j - 1] + sizes[j - 1] <= a + span or starts[j - 1] == a


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_sft_items_are_disjoint_permutations_with_aligned_masks(tmp_path, mode):
    rng = random.Random()
    prefix = make_sft(tmp_path, 300, rng)
    ctx, W, spe = 32, 2, 120
    data = MMapIndexedDataset(prefix)
    file_mask = open_mask(prefix, data.num_tokens)
    ranks = [SFTDataset(prefix, ctx, rank=r, world_size=W, n_epochs=6, micro_bsz=4, mode=mode, seed=7,
                        samples_per_epoch=spe) for r in range(W)]
    n = ranks[0].n_samples
    assert n == (len(data) if mode == "pad" else len(ranks[0].starts))
    per_rank = spe // W
    by_global = {}
    for r, ds in enumerate(ranks):
        for i in range(len(ds)):
            by_global[(i // per_rank) * spe + (i % per_rank) * W + r] = ds.sample_of(i)
    total = len(by_global)
    assert sorted(by_global) == list(range(total))
    for start in range(0, total - n + 1, n):  # every full pass: each sample exactly once, over both ranks
        assert sorted(by_global[g] for g in range(start, start + n)) == list(range(n))
    if total >= 2 * n:
        assert [by_global[g] for g in range(n)] != [by_global[g] for g in range(n, 2 * n)]
    tok = load_tokenizer()
    doc_starts = set(data.item_starts().tolist())
    for i in range(0, len(ranks[0]), 7):
        x, y, m = ranks[0][i]
        assert x.shape == y.shape == m.shape == (ctx,) and m.dtype == torch.uint8
        s = int(ranks[0].starts[ranks[0].sample_of(i)])
        assert s in doc_starts  # document aligned
        real = min(int(ranks[0].lengths[ranks[0].sample_of(i)]), data.num_tokens - s)
        window = np.zeros(ctx + 1, dtype=np.int64)
        window[:real] = data.tokens[s:s + real]
        assert torch.equal(x, torch.from_numpy(window[:-1])) and torch.equal(y, torch.from_numpy(window[1:]))
        want = np.zeros(ctx + 1, dtype=np.uint8)
        want[:real] = file_mask[s:s + real]
        assert torch.equal(m, torch.from_numpy(want[1:]))
        # the masked targets are assistant text: every run decodes to a piece of a reply, ending in <|im_end|>
        ids = y[m > 0].tolist()
        if ids and m[-1] == 0:
            assert tok.decode(ids, skip_special_tokens=False).endswith(IM_END)
    whole = SFTDataset(prefix, ctx, mode=mode, whole_sequence=True, seed=7, samples_per_epoch=spe)
    for i in range(0, 60, 5):
        x, y, m = whole[i]
        real = min(int(whole.lengths[whole.sample_of(i)]), data.num_tokens - int(whole.starts[whole.sample_of(i)]))
        assert m.tolist() == [1.0] * (real - 1) + [0.0] * (ctx + 1 - real)
        if mode == "pad":
            assert (y[real - 1:] == 0).all()


def test_sft_without_mask_file(tmp_path):
    prefix = make_sft(tmp_path, 20, random.Random())
    (tmp_path / "sft.mask").unlink()
    with pytest.raises(ValueError, match="sft.mask not found"):
        SFTDataset(prefix, 32)
    assert SFTDataset(prefix, 32, whole_sequence=True)[0][2].sum() > 0
    with pytest.raises(ValueError, match="SFT mode 'stack'"):
        SFTDataset(prefix, 32, mode="stack", whole_sequence=True)


def test_datasets_end_where_their_mini_epochs_end(tmp_path):
    rng = np.random.default_rng()
    write_random_bin(tmp_path / "p", 5000, rng)
    sft = make_sft(tmp_path, 30, random.Random())
    for ds in (PretrainDataset(tmp_path / "p", 16, magic_prime(5000, 16), rank=1, world_size=2, n_epochs=3,
                               samples_per_epoch=40),
               SFTDataset(sft, 32, rank=1, world_size=2, n_epochs=3, samples_per_epoch=40)):
        assert len(ds) == 60
        ds[59]
        for i in (60, -1):
            with pytest.raises(IndexError, match=f"sample {i} is outside this dataset's 60 samples"):
                ds[i]


def test_datasets_pickle_without_copying_data(tmp_path):
    import pickle
    prefix = make_sft(tmp_path, 50, random.Random())
    ds = SFTDataset(prefix, 32)
    ds[0]  # opens the memory maps
    blob = pickle.dumps(ds)
    assert len(blob) < 2000 + 16 * ds.n_samples  # the sample table only, no tokens or mask
    again = pickle.loads(blob)
    for i in (0, 5, 17):
        assert all(torch.equal(a, b) for a, b in zip(ds[i], again[i]))


# ------------------------------------------------------------------- beyond 2**32 tokens (sparse files)
def sparse_binidx(prefix, sizes: list[int], with_mask: bool) -> int:
    """PREFIX.idx written field by field (SPEC layout, uint16) for items of `sizes` tokens; .bin (and .mask)
    as sparse files of the right length, all zeros until the test writes into them. Returns the token count."""
    n = len(sizes)
    sz = np.asarray(sizes, dtype=np.int64)
    pointers = np.concatenate(([0], np.cumsum(sz[:-1]))) * 2
    with open(f"{prefix}.idx", "wb") as f:
        f.write(struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, 8, n, n + 1))
        f.write(sz.astype("<i4").tobytes() + pointers.astype("<i8").tobytes()
                + np.arange(n + 1, dtype="<i8").tobytes())
    total = int(sz.sum())
    for ext, nbytes in ((".bin", 2 * total), (".mask", total))[:2 if with_mask else 1]:
        with open(f"{prefix}{ext}", "wb") as f:
            f.truncate(nbytes)
    return total


def put(path, offset: int, values: np.ndarray) -> None:
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), values.tobytes(), offset)


@pytest.fixture
def sparse_ok(tmp_path):
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        f.truncate(1 << 30)
    sparse = probe.stat().st_blocks * 512 < (1 << 20)
    probe.unlink()
    if not sparse:
        pytest.skip(f"{tmp_path}'s filesystem has no sparse files: the test would write 9 GB")


BIG = [2**31 - 1, 2**31 - 1, 2**28]  # items as large as int32 sizes allow: 4.56e9 tokens, past 2**32


def test_pretrain_windows_past_2_32_tokens(tmp_path, sparse_ok):
    """sft_2048 has 2.4e9 tokens (SPEC): offsets past 2**31 (and 2**32) must be read where they are."""
    prefix = tmp_path / "big"
    total = sparse_binidx(prefix, BIG, with_mask=False)
    ctx = 2048
    ds = PretrainDataset(prefix, ctx, magic_prime(total, ctx))
    starts = [ds.window_start(i) for i in range(0, SAMPLES_PER_EPOCH, 7)]
    far = max(range(len(starts)), key=starts.__getitem__)
    s = starts[far]
    assert 2**32 < s <= total - ctx - 1
    window = np.random.default_rng().integers(1, 6400, size=ctx + 1).astype("<u2")
    put(f"{prefix}.bin", 2 * s, window)
    x, y = ds[far * 7]
    assert torch.equal(x, torch.from_numpy(window[:-1].astype(np.int64)))
    assert torch.equal(y, torch.from_numpy(window[1:].astype(np.int64)))


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_sft_documents_past_2_32_tokens(tmp_path, sparse_ok, mode):
    rng = np.random.default_rng()
    ctx = 512
    small = rng.integers(5, 1500, size=60).tolist()  # some longer than the window
    prefix = tmp_path / "big"
    total = sparse_binidx(prefix, BIG + small, with_mask=True)
    base = sum(BIG)
    tail = rng.integers(1, 6400, size=total - base).astype("<u2")   # the small documents' tokens and mask
    tail_mask = rng.integers(0, 2, size=total - base).astype(np.uint8)
    put(f"{prefix}.bin", 2 * base, tail)
    put(f"{prefix}.mask", base, tail_mask)
    ds = SFTDataset(prefix, ctx, mode=mode, n_epochs=1)
    # the samples that start in the tail, worked out here: pack cuts greedily, pad takes each document alone
    doc_starts = base + np.concatenate(([0], np.cumsum(small)[:-1]))
    want = []
    j = 0
    while j < len(small):
        want.append(int(doc_starts[j]))
        if mode == "pad":
            j += 1
            continue
        end, j = doc_starts[j] + ctx + 1, j + 1
        while j < len(small) and doc_starts[j] + small[j] <= end:
            j += 1
    seen = {}
    for i in range(len(ds)):
        s = int(ds.starts[ds.sample_of(i)])
        if s >= base:
            seen.setdefault(s, i)
    assert sorted(seen) == want
    for s, i in seen.items():
        k = int(np.searchsorted(doc_starts, s))
        n = min(ctx + 1, small[k] if mode == "pad" else total - s)
        tok, m = np.zeros(ctx + 1, dtype=np.int64), np.zeros(ctx + 1, dtype=np.uint8)
        tok[:n], m[:n] = tail[s - base:s - base + n], tail_mask[s - base:s - base + n]
        x, y, mask = ds[i]
        assert torch.equal(x, torch.from_numpy(tok[:-1])) and torch.equal(y, torch.from_numpy(tok[1:]))
        assert torch.equal(mask, torch.from_numpy(m[1:]))
