"""MiniMind jsonl -> binidx (PREFIX.bin/.idx, plus PREFIX.mask for SFT data).

    python3 data/make_data.py FILE.jsonl N_EPOCH CTX_LEN [--tokenizer PATH] [--out PREFIX] [--seed S]
                              [--skip-bad] [--workers K] [--batch-size B]

Records: pretrain {"text": "..."} or SFT {"conversations": [{"role", "content"}, ...]}, rendered with
the chat template of src/tokenizer.py as MiniMind2's tokenizer defines it: a conversation without a
system message gets the default system turn "You are a helpful assistant" (--system changes it,
--system '' leaves it out), which is also what the chat demo puts first. A file holds one
kind; its first record decides which. Each record becomes one binidx item: its tokens + token 0 (end of
document). The output holds N_EPOCH copies of the records, each copy in its own shuffled order (numpy
PCG64 seeded with --seed, one permutation per copy). Every record is checked:
decode(encode(text)) == text, and a conversation needs an assistant turn (what SFT learns). SFT records
also give PREFIX.mask: 1 on assistant content and its <|im_end|>, 0 elsewhere (the end-of-document 0
included). PREFIX.tokenizer.json is a copy of the tokenizer: train.py puts it beside the checkpoints,
where the chat and eval find it.

Built for files of many GB: one pass records the byte offset of every line (8+4 bytes per line),
shuffles the offsets and reads the lines in that order; batches of lines are parsed and encoded by
--workers processes (tokenizers' Rust encode_batch inside each), written in order by this process
straight to a temporary .bin. Nothing appears under PREFIX until everything succeeded.

Output: PREFIX defaults to data/<FILE's stem> in this repo's data/ folder (what the demo scripts read),
whatever the current directory. Prints the token count, my_exit_tokens (= the token count), magic_prime
(largest prime p, p % 3 == 2, p <= tokens // CTX_LEN - 1) and the flags to paste.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer

from src.binidx import MMapIndexedDatasetBuilder, remove_stale_temporaries, strip_suffix
from src.sampler import magic_prime, too_small_message, windows
from src.tokenizer import (DEFAULT_SYSTEM, EOT_ID, ROLES, conversation_segments, copy_tokenizer, data_tokenizer_file,
                           load_tokenizer, token_dtype, tokenizer_file)

DATA_DIR = Path(__file__).resolve().parent
REPO_ROOT = DATA_DIR.parent
_READ_BLOCK = 64 << 20  # bytes per read while indexing lines


class MakeDataError(ValueError):
    """Bad input (or output that cannot be finished): the message names the file and line and says what to do."""


@dataclass
class LineIndex:
    """Byte offset and length (without the line break) of every line; line i is line number i+1."""
    starts: np.ndarray   # int64
    lengths: np.ndarray  # uint32

    @property
    def n_records(self) -> int:
        return int(np.count_nonzero(self.lengths))


def index_lines(path: Path) -> LineIndex:
    """One streaming pass over the file: where every line starts and how long it is."""
    starts, ends = [np.zeros(1, dtype=np.int64)], []
    pos = 0
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            nl = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10).astype(np.int64) + pos
            ends.append(nl)
            starts.append(nl + 1)
            pos += len(block)
    ends.append(np.array([pos], dtype=np.int64))  # the last line, with or without a final "\n"
    starts_a, ends_a = np.concatenate(starts), np.concatenate(ends)
    if starts_a[-1] == pos and len(starts_a) > 1:  # the file ends with "\n": no line after it
        starts_a, ends_a = starts_a[:-1], ends_a[:-1]
    lengths = ends_a - starts_a
    if lengths.size and lengths.max() >= 1 << 32:
        raise MakeDataError(f"{path}:{int(np.argmax(lengths)) + 1}: line longer than 4 GB")
    return LineIndex(starts_a, lengths.astype(np.uint32))


# ------------------------------------------------------------------------------ parsing, encoding
def parse_record(line: bytes, kind: str | None,
                 system: str | None = DEFAULT_SYSTEM) -> tuple[str, list[tuple[str, bool]]]:
    """(kind, segments) of one jsonl line; raises ValueError with a message for the user.
    system: the system turn of a conversation without one (None: none)."""
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"a record must be a JSON object, got {type(rec).__name__}")
    if "conversations" in rec:
        got = "conversations"
        convs = rec["conversations"]
        if not isinstance(convs, list) or not convs:
            raise ValueError("'conversations' must be a non-empty list of {\"role\", \"content\"} objects")
        for j, m in enumerate(convs):
            if isinstance(m, dict) and m.get("role") not in ROLES:
                raise ValueError(f"conversations[{j}] has role {m.get('role')!r}: expected one of {', '.join(ROLES)}")
        segments = conversation_segments(convs, system)
    elif "text" in rec:
        got = "text"
        if not isinstance(rec["text"], str):
            raise ValueError(f"'text' must be a string, got {type(rec['text']).__name__}")
        segments = [(rec["text"], False)]
    else:
        raise ValueError(f"record has neither 'text' (pretrain) nor 'conversations' (SFT); keys: {sorted(rec)[:8]}")
    if kind is not None and got != kind:
        raise ValueError(f"a '{got}' record in a file of '{kind}' records: one file holds one kind")
    # SFT trains on the assistant replies only (the mask): without one the record adds tokens but no loss,
    # and a file of such records trains at loss 0.
    if got == "conversations" and not any(reply for _, reply in segments):
        raise ValueError("no assistant turn: nothing to train on (SFT learns the assistant replies; "
                         "a conversation needs at least one {\"role\": \"assistant\"} message)")
    return got, segments


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@dataclass
class EncodedBatch:
    tokens: np.ndarray        # int64, the documents concatenated (each ends with EOT_ID)
    sizes: np.ndarray         # int64 tokens per document
    mask: np.ndarray | None   # uint8 aligned with tokens (SFT files)
    bad: list[tuple[int, str]]  # (line number, why) of the records left out
    blank: int = 0            # lines of only whitespace (e.g. "\r" in a CRLF file), skipped


def encode_lines(tok: Tokenizer, lines: list[bytes], line_numbers: list[int], kind: str,
                 system: str | None) -> EncodedBatch:
    """Parse, render, encode and round-trip-check a batch of lines (blank lines are skipped)."""
    bad: list[tuple[int, str]] = []
    recs: list[tuple[int, list[tuple[str, bool]]]] = []
    blank = 0
    for line, no in zip(lines, line_numbers):
        if not line.strip():
            blank += bool(line)  # empty lines are not counted as records in the first place
            continue
        try:
            recs.append((no, parse_record(line, kind, system)[1]))
        except ValueError as e:
            bad.append((no, str(e)))
    flat = [text for _, segs in recs for text, _ in segs]
    try:
        enc = [e.ids for e in tok.encode_batch(flat)]
    except Exception:  # e.g. a lone surrogate in one record: find which, one record at a time
        enc, kept = [], []
        for no, segs in recs:
            try:
                enc += [tok.encode(t).ids for t, _ in segs]
                kept.append((no, segs))
            except Exception as e:  # tokenizers raises plain exceptions on unencodable text
                bad.append((no, f"the text cannot be encoded ({e})"))
        recs = kept
    per_rec, k = [], 0
    for _, segs in recs:
        per_rec.append(enc[k:k + len(segs)])
        k += len(segs)
    decoded = tok.decode_batch([list(chain.from_iterable(r)) for r in per_rec], skip_special_tokens=False)
    pieces, sizes, masks = [], [], []
    eot = np.array([EOT_ID], dtype=np.int64)
    for (no, segs), ids_list, dec in zip(recs, per_rec, decoded):
        text = "".join(t for t, _ in segs)
        if dec != text:
            i = _first_difference(text, dec)
            bad.append((no, f"decode(encode(text)) != text from character {i}: {text[max(0, i - 20):i + 20]!r} "
                            f"came back as {dec[max(0, i - 20):i + 20]!r}; this tokenizer cannot represent the text"))
            continue
        pieces += [np.array(ids, dtype=np.int64) for ids in ids_list] + [eot]
        sizes.append(sum(len(ids) for ids in ids_list) + 1)
        if kind == "conversations":
            masks += [np.full(len(ids), reply, dtype=np.uint8) for ids, (_, reply) in zip(ids_list, segs)]
            masks.append(np.zeros(1, dtype=np.uint8))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    mask = None
    if kind == "conversations":
        mask = np.concatenate(masks) if masks else np.zeros(0, dtype=np.uint8)
    bad.sort()
    return EncodedBatch(tokens, np.array(sizes, dtype=np.int64), mask, bad, blank)


# ----------------------------------------------------------------------------- worker processes
_W: dict = {}


def _worker_init(path: str, tokenizer: str | None, kind: str, system: str | None, threads: int) -> None:
    # Ctrl-C reaches the whole process group: the main process stops the pool, workers need no traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Each worker's tokenizer uses `threads` Rust threads, so K workers do not oversubscribe the cores.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    _W.update(fd=os.open(path, os.O_RDONLY), tok=load_tokenizer(tokenizer), kind=kind, system=system)


def _read(fd: int, starts: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    return [os.pread(fd, int(n), int(s)) for s, n in zip(starts, lengths)]


def _worker_encode(job: tuple[np.ndarray, np.ndarray, np.ndarray]) -> EncodedBatch:
    line_idx, starts, lengths = job
    return encode_lines(_W["tok"], _read(_W["fd"], starts, lengths), (line_idx + 1).tolist(), _W["kind"],
                        _W["system"])


# ------------------------------------------------------------------------------------ the driver
@dataclass
class MakeDataResult:
    prefix: Path
    kind: str            # "text" or "conversations"
    num_tokens: int      # = my_exit_tokens
    num_docs: int
    records: int         # records per copy (after skipping)
    skipped: int         # bad records skipped per copy (--skip-bad)
    dtype: np.dtype
    ctx_len: int
    magic_prime: int | None
    too_small: str | None  # the message when the data is too small for ctx_len

    # Both lines are shell words (the path quoted where it needs it: spaces, quotes, $), to paste as they are.
    @property
    def _data_file(self) -> str:
        return shlex.quote(_display_path(self.prefix))

    @property
    def _data_type(self) -> str:
        return "sft" if self.kind == "conversations" else "binidx"

    def flags(self) -> str:
        p = self.magic_prime if self.too_small is None else None
        return (f"MY_EXIT_TOKENS={self.num_tokens} MAGIC_PRIME={p if p is not None else 'NONE'} "
                f"DATA_FILE={self._data_file} DATA_TYPE={self._data_type} CTX_LEN={self.ctx_len}")

    def train_args(self) -> str:
        prime = "" if self.too_small is not None else f" --magic_prime {self.magic_prime}"
        return (f"--my_exit_tokens {self.num_tokens}{prime} --data_file {self._data_file} "
                f"--data_type {self._data_type} --ctx_len {self.ctx_len}")


def _display_path(p: Path) -> str:
    p = Path(p).resolve()
    try:
        return str(p.relative_to(REPO_ROOT))
    except ValueError:
        return str(p)


def _out_prefix(value: str) -> Path:
    """--out as a Path; one ending in '/' names a folder, which Path() would quietly turn into a prefix beside it."""
    if value.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{value} names a folder: give a prefix inside it, e.g. {value}pretrain")
    return Path(value)


def default_out(jsonl: Path) -> Path:
    return DATA_DIR / jsonl.stem


def _first_kind(path: Path, index: LineIndex, skip_bad: bool) -> str:
    first = True
    with open(path, "rb") as f:
        for i in np.flatnonzero(index.lengths):
            f.seek(int(index.starts[i]))
            line = f.read(int(index.lengths[i]))
            if not line.strip():
                continue
            try:
                return parse_record(line, None)[0]
            except ValueError as e:
                if first and str(e).startswith("not valid JSON"):
                    # --skip-bad cannot help a file that is not jsonl at all
                    raise MakeDataError(
                        f"{path}:{i + 1}: {e}: this does not look like a jsonl file (one JSON object per line: "
                        'MiniMind\'s {"text": ...} or {"conversations": [...]})') from None
                if not skip_bad:
                    raise MakeDataError(f"{path}:{i + 1}: {e} (fix the line or pass --skip-bad)") from None
            first = False
    raise MakeDataError(f"{path}: no usable record (the file is empty or every line is bad)")


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.t0 = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, done: int, tokens: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and now - self.last < (0.5 if self.tty else 10.0)):
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        eta = (self.total - done) * dt / max(done, 1)
        msg = (f"[make_data] {done:,}/{self.total:,} records ({100 * done / max(self.total, 1):.1f}%) "
               f"{done / dt:,.0f} records/s {tokens / dt:,.0f} tokens/s "
               f"{'done in' if final else 'eta'} {(dt if final else eta):.0f}s")
        print(("\r" + msg + " " * 4) if self.tty else msg, end="\n" if final or not self.tty else "",
              file=sys.stderr, flush=True)


def _jobs(index: LineIndex, n_epoch: int, seed: int, batch_size: int) -> Iterator[tuple]:
    rng = np.random.default_rng(seed)
    for _ in range(n_epoch):
        order = rng.permutation(len(index.starts))
        for s in range(0, len(order), batch_size):
            sel = order[s:s + batch_size]
            yield sel, index.starts[sel], index.lengths[sel]


def _ordered_bounded(pool, jobs: Iterator[tuple], in_flight: int) -> Iterator[EncodedBatch]:
    """Results of the jobs in order, with at most `in_flight` batches queued (bounds the memory)."""
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.apply_async(_worker_encode, (job,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def make_data(jsonl: str | Path, n_epoch: int, ctx_len: int, tokenizer: str | Path | None = None,
              out: str | Path | None = None, seed: int = 0, skip_bad: bool = False, workers: int = 1,
              batch_size: int = 512, progress: bool = True, system: str | None = DEFAULT_SYSTEM) -> MakeDataResult:
    """Convert a MiniMind jsonl file to binidx; see the module docstring. workers == 1 runs in-process.
    system: the system turn of SFT conversations without one (None: none)."""
    path = Path(jsonl)
    if not path.is_file():
        raise MakeDataError(f"{path}: no such file")
    if n_epoch < 1:
        raise MakeDataError(f"N_EPOCH must be >= 1, got {n_epoch}")
    if ctx_len < 1:
        raise MakeDataError(f"CTX_LEN must be >= 1, got {ctx_len}")
    if workers < 1:
        raise MakeDataError(f"--workers must be >= 1 (1 = encode in this process), got {workers}")
    if batch_size < 1:
        raise MakeDataError(f"--batch-size must be >= 1 (lines per encoding batch), got {batch_size}")
    if out is not None and Path(out).is_dir():  # the prefix would be the folder's name: outdir.bin beside it
        raise MakeDataError(f"--out {out} is a folder: give a prefix inside it, e.g. --out {Path(out) / path.stem} "
                            f"(writes {Path(out) / path.stem}.bin/.idx)")
    prefix = Path(out) if out is not None else default_out(path)
    for stale in remove_stale_temporaries(prefix):
        print(f"[make_data] removed {stale}, left by a run that was killed before it finished", file=sys.stderr)
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.get_vocab_size())
    index = index_lines(path)
    if index.n_records == 0:
        raise MakeDataError(f"{path}: empty file (no records)")
    kind = _first_kind(path, index, skip_bad)
    total = index.n_records * n_epoch
    bar = _Progress(total, progress)
    bad_lines: set[int] = set()
    done = n_docs = 0
    with MMapIndexedDatasetBuilder(prefix, dtype, with_mask=kind == "conversations") as builder:
        jobs = _jobs(index, n_epoch, seed, batch_size)
        pool = None
        if workers > 1:
            threads = max(1, (os.cpu_count() or 1) // workers)
            pool = mp.get_context("spawn").Pool(
                workers, _worker_init,
                (str(path), None if tokenizer is None else str(tokenizer), kind, system, threads))
            results = _ordered_bounded(pool, jobs, 2 * workers)
        else:
            fd = os.open(path, os.O_RDONLY)
            results = (encode_lines(tok, _read(fd, s, n), (i + 1).tolist(), kind, system) for i, s, n in jobs)
        try:
            for b in results:
                if b.bad and not skip_bad:
                    no, why = b.bad[0]
                    raise MakeDataError(f"{path}:{no}: {why} "
                                        "(fix the line or pass --skip-bad to leave such records out)")
                bad_lines.update(no for no, _ in b.bad)
                if len(b.sizes):
                    builder.add_documents(b.tokens, b.sizes, b.mask)
                n_docs += len(b.sizes)
                done += len(b.sizes) + len(b.bad) + b.blank
                bar.update(done, builder.num_tokens)
            if n_docs == 0:
                raise MakeDataError(f"{path}: every record is bad ({len(bad_lines)} skipped); nothing to write")
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            else:
                os.close(fd)
        bar.update(done, builder.num_tokens, final=True)
        num_tokens = builder.num_tokens
    # The tokenizer goes with the data: train.py puts it beside the checkpoints, where the chat finds it.
    tok_src, tok_dst = tokenizer_file(tokenizer), data_tokenizer_file(strip_suffix(prefix))
    try:
        copy_tokenizer(tok_src, tok_dst)
    except OSError as e:  # e.g. a disk the data just filled: the data is in place, main's 'nothing written' is not
        raise MakeDataError(f"wrote {strip_suffix(prefix)}.bin/.idx but cannot write {tok_dst}: {e.strerror or e}; "
                            f"copy {tok_src} there before training (train.py takes the tokenizer from it)") from e
    p = magic_prime(num_tokens, ctx_len)
    return MakeDataResult(prefix=prefix, kind=kind, num_tokens=num_tokens, num_docs=n_docs,
                          records=n_docs // n_epoch, skipped=len(bad_lines), dtype=dtype,
                          ctx_len=ctx_len, magic_prime=p, too_small=too_small_message(num_tokens, ctx_len))


def report(r: MakeDataResult) -> str:
    files = ".bin/.idx/.mask/.tokenizer.json" if r.kind == "conversations" else ".bin/.idx/.tokenizer.json"
    what = "SFT" if r.kind == "conversations" else "pretrain"
    lines = [f"wrote {_display_path(r.prefix)}{{{files}}}: {r.num_tokens:,} tokens ({r.dtype}), "
             f"{r.num_docs:,} documents ({r.records:,} {what} records x {r.num_docs // max(r.records, 1)} epochs"
             + (f"; skipped {r.skipped:,} bad records per epoch" if r.skipped else "") + ")"]
    if r.too_small:
        lines.append(f"WARNING: {r.too_small}")
    else:
        lines.append(f"ctx_len {r.ctx_len}: {windows(r.num_tokens, r.ctx_len):,} windows; "
                     f"my_exit_tokens {r.num_tokens}, magic_prime {r.magic_prime}")
    lines += ["flags to paste into the demo scripts:", r.flags(), "or as train.py arguments:", r.train_args()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="MiniMind jsonl -> binidx (.bin/.idx, + .mask for SFT)",
                                 epilog="example: python data/make_data.py data/pretrain_hq.jsonl 1 512 --workers 2")
    ap.add_argument("jsonl", type=Path, help="MiniMind jsonl: {\"text\"} or {\"conversations\"} records")
    ap.add_argument("n_epoch", type=int, help="copies of the data, each shuffled")
    ap.add_argument("ctx_len", type=int, help="training context length (for magic_prime)")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="tokenizer.json or its folder (default: the repo's data/tokenizer/)")
    ap.add_argument("--out", type=_out_prefix, default=None, help="output prefix (default: data/<jsonl stem>)")
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed (default %(default)s)")
    ap.add_argument("--skip-bad", action="store_true", help="leave bad records out (counted) instead of stopping")
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                    help="encoding processes, 1 = in this process (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=512, help="lines per encoding batch (default %(default)s)")
    ap.add_argument("--system", default=DEFAULT_SYSTEM,
                    help="SFT: system turn of a conversation without one, as MiniMind2's chat template and the chat "
                         "demo put first ('' = none; default %(default)r)")
    args = ap.parse_args(argv)
    prefix = _display_path(strip_suffix(args.out if args.out is not None else default_out(args.jsonl)))
    try:
        r = make_data(args.jsonl, args.n_epoch, args.ctx_len, args.tokenizer, args.out, args.seed,
                      args.skip_bad, args.workers, args.batch_size, system=args.system or None)
    except (MakeDataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # reading the jsonl, or writing: a read-only folder, a full disk, a file-size limit
        named = isinstance(e.filename, str)
        if named and Path(e.filename).resolve() == args.jsonl.resolve():
            print(f"error: cannot read {args.jsonl}: {e.strerror or e}", file=sys.stderr)
        else:  # the builder removes its temporaries on any error; the final names come only at the very end
            why = f"{e.strerror or e}" + (f" ({e.filename})" if named else "")
            print(f"error: cannot write {prefix}.*: {why}; nothing was written under that name", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the builder and the worker pool cleaned up on the way out
        print(f"\ninterrupted: nothing was written under {prefix}", file=sys.stderr)
        return 130
    print(report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
