"""The magic-prime sampler of SPEC section 3 (pure integer math, no torch: make_data uses it too).

Pretraining reads windows of CTX_LEN+1 tokens from the whole .bin as one stream. With p the magic
prime (p % 3 == 2, p <= data_size // CTX_LEN - 1) and a mini-epoch of 40320 samples, sample `idx`
(0-based within the mini-epoch, on rank r of W) of mini-epoch e reads the window that starts at

    ii = 1 + e*40320 + idx*W + r;   factor = int(p*(sqrt(5)-1)/2);   start = ((factor*ii^3) mod p) * CTX_LEN

x ** 3 is a bijection of Z_p when p % 3 == 2 (gcd(3, p-1) = 1) and multiplying by factor (0 < factor < p)
is one too, so any p consecutive ii visit every window 0..p-1 exactly once; ranks use disjoint ii.
"""
from __future__ import annotations

import math

SAMPLES_PER_EPOCH = 40320  # one mini-epoch (SPEC section 4)
MIN_COVERAGE = 0.9  # p / (data_size // ctx_len) must exceed this (SPEC's start-up check)

_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)  # deterministic for n < 3.3e24


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin primality test (exact for every n below 3.3e24)."""
    if n < 2:
        return False
    for q in _MR_BASES:
        if n % q == 0:
            return n == q
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def magic_prime(data_size: int, ctx_len: int) -> int | None:
    """Largest prime p with p % 3 == 2 and p <= data_size // ctx_len - 1; None when there is none."""
    p = data_size // ctx_len - 1
    while p >= 2:
        if p % 3 == 2 and is_prime(p):
            return p
        p -= 1
    return None


def windows(data_size: int, ctx_len: int) -> int:
    return data_size // ctx_len


def magic_prime_problem(p: int, data_size: int, ctx_len: int) -> str | None:
    """Why p cannot be the magic prime of this data (None when it can).

    p must be prime, p % 3 == 2, its last window must fit ((p-1)*ctx_len + ctx_len+1 tokens) and it must
    cover more than 90% of the data_size // ctx_len windows.
    """
    n = windows(data_size, ctx_len)
    if not is_prime(p):
        return f"{p} is not prime"
    if p % 3 != 2:
        return f"{p} % 3 == {p % 3}, not 2"
    if p * ctx_len + 1 > data_size:
        return f"{p} windows of {ctx_len}+1 tokens need more than the {data_size} tokens of the data"
    if p <= MIN_COVERAGE * n:
        return f"{p} covers only {p / n:.1%} of the {n} windows (must be > {MIN_COVERAGE:.0%})"
    return None


def too_small_message(data_size: int, ctx_len: int) -> str | None:
    """A message when no magic prime passes the start-up check for this data (None: the data is fine)."""
    p = magic_prime(data_size, ctx_len)
    if p is not None and magic_prime_problem(p, data_size, ctx_len) is None:
        return None
    return (f"{data_size} tokens are too few for ctx_len {ctx_len}: they hold {windows(data_size, ctx_len)} windows "
            f"and no prime p (p % 3 == 2) covers more than {MIN_COVERAGE:.0%} of them"
            f"{'' if p is None else f' (the largest is {p})'}; use more data (a larger N_EPOCH) or a smaller ctx_len")


def global_index(i: int, epoch_begin: int, rank: int, world_size: int,
                 samples_per_epoch: int = SAMPLES_PER_EPOCH) -> int:
    """ii - 1 of item i of a rank's dataset: item i lies in mini-epoch epoch_begin + i // (samples_per_epoch // W)."""
    per_rank = samples_per_epoch // world_size
    epoch, idx = epoch_begin + i // per_rank, i % per_rank
    return epoch * samples_per_epoch + idx * world_size + rank


def golden_factor(p: int) -> int:
    return int(p * (math.sqrt(5) - 1) / 2)


def window_start(ii: int, p: int, ctx_len: int) -> int:
    """Token offset of the window of sample ii (ii = 1 + global index)."""
    return (golden_factor(p) * pow(ii, 3, p)) % p * ctx_len
