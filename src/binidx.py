"""binidx: Megatron's "MMIDIDX" token files (SPEC section 3), reader and atomic streaming writer.

PREFIX.idx, little-endian:
    magic    9 bytes  b"MMIDIDX\\x00\\x00"
    version  u64      1
    dtype    u8       code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float64, 8 uint16
    n_items  u64
    n_docs   u64      number of doc_idx entries
    sizes    int32[n_items]   tokens per item
    pointers int64[n_items]   byte offset of each item in .bin (cumulative size * itemsize)
    doc_idx  int64[n_docs]    item index where each document starts: [0], then one entry per document
PREFIX.bin: the items' tokens concatenated (make_data: one item per document, ending in token 0).
PREFIX.mask (this project's addition, written by make_data for SFT data): one uint8 per token of
.bin, 1 where the token is an assistant reply token (see src/tokenizer.py), 0 elsewhere.

The reader memory-maps both files and checks every field against the file sizes, so a truncated or
foreign file fails at open with a message naming it. The writer streams: tokens go straight to a
temporary .bin (only the per-item sizes stay in memory, 4 bytes per document) and the final names
appear only at `finalize()` via os.replace, .idx last; on any error the temporaries are removed (and
`remove_stale_temporaries` clears those of a builder that was killed outright).
"""
from __future__ import annotations

import os
import re
import struct
import time
from array import array
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES: dict[int, np.dtype] = {1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16),
                               4: np.dtype(np.int32), 5: np.dtype(np.int64), 6: np.dtype(np.float64),
                               7: np.dtype(np.float64), 8: np.dtype(np.uint16)}
CODES: dict[np.dtype, int] = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3,
                              np.dtype(np.int32): 4, np.dtype(np.int64): 5, np.dtype(np.float64): 7,
                              np.dtype(np.uint16): 8}
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n_items, n_docs
_CHUNK = 1 << 20  # items per chunk when writing/checking the index, bounds the writer's memory


class BinIdxError(ValueError):
    """A .idx/.bin/.mask file that is missing, truncated, foreign or inconsistent."""


def index_file(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def data_file(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def mask_file(prefix: str | Path) -> Path:
    return Path(f"{prefix}.mask")


def _not_found(path: Path) -> str:
    """'data/x.idx not found (looked in /abs/data/x.idx)': a relative path is read against the current
    directory, which may not be the one the user thinks (the demo scripts cd into the repo first)."""
    return f"{path} not found" + ("" if path.is_absolute() else f" (looked in {os.path.abspath(path)})")


def strip_suffix(path: str | Path) -> str:
    """'data/x.bin' or 'data/x.idx' -> 'data/x' (users often pass a file instead of the prefix)."""
    s = str(path)
    for ext in (".bin", ".idx", ".mask"):
        if s.endswith(ext):
            return s[: -len(ext)]
    return s


class MMapIndexedDataset:
    """Memory-mapped reader of PREFIX.idx + PREFIX.bin.

    Attributes: dtype, sizes (int32 per item), pointers (int64 byte offsets), doc_idx (int64),
    num_tokens. `tokens` is the whole .bin as a 1-D array (memory-mapped, opened on first use and
    re-opened after unpickling, so DataLoader workers never copy it).
    """

    def __init__(self, prefix: str | Path):
        self.prefix = strip_suffix(prefix)
        self._tokens: np.ndarray | None = None
        self._read_index()

    def _read_index(self) -> None:
        idx, bin_ = index_file(self.prefix), data_file(self.prefix)
        for f in (idx, bin_):
            if not f.is_file():
                raise BinIdxError(f"{_not_found(f)}: make it with `python3 data/make_data.py FILE.jsonl N_EPOCH "
                                  "CTX_LEN` (the data prefix is the path without .bin/.idx)")
        idx_size = idx.stat().st_size
        with open(idx, "rb") as f:
            head = f.read(HEADER.size)
        if len(head) < HEADER.size:
            if not MAGIC.startswith(head[: len(MAGIC)]):
                raise BinIdxError(f"{idx}: not an MMIDIDX index file (magic {head[:9]!r}, expected {MAGIC!r})")
            raise BinIdxError(f"{idx}: truncated ({idx_size} bytes, the header alone is {HEADER.size}); remake it")
        magic, version, code, n, n_docs = HEADER.unpack(head)
        if magic != MAGIC:
            raise BinIdxError(f"{idx}: not an MMIDIDX index file (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise BinIdxError(f"{idx}: MMIDIDX version {version}, only version {VERSION} is supported")
        if code not in DTYPES:
            raise BinIdxError(f"{idx}: unknown dtype code {code} (known: {sorted(DTYPES)})")
        self.dtype = DTYPES[code]
        want = HEADER.size + 4 * n + 8 * n + 8 * n_docs
        if idx_size != want:
            raise BinIdxError(f"{idx}: {idx_size} bytes but its header ({n} items, {n_docs} doc_idx entries) "
                              f"needs {want}: the file is truncated or corrupt; remake it with data/make_data.py")
        if n == 0:
            raise BinIdxError(f"{idx}: holds no items")
        self.sizes = np.memmap(idx, dtype="<i4", mode="r", offset=HEADER.size, shape=(n,))
        self.pointers = np.memmap(idx, dtype="<i8", mode="r", offset=HEADER.size + 4 * n, shape=(n,))
        self.doc_idx = np.memmap(idx, dtype="<i8", mode="r", offset=HEADER.size + 12 * n, shape=(n_docs,))
        itemsize = self.dtype.itemsize
        total = 0
        for s in range(0, n, _CHUNK):  # pointers must be the running byte offsets of the sizes
            sz = np.asarray(self.sizes[s:s + _CHUNK], dtype=np.int64)
            if (sz < 0).any():
                raise BinIdxError(f"{idx}: negative item size at item {s + int(np.argmax(sz < 0))}")
            expect = total + np.concatenate(([0], np.cumsum(sz[:-1]))) * itemsize
            bad = np.nonzero(np.asarray(self.pointers[s:s + _CHUNK]) != expect)[0]
            if bad.size:
                raise BinIdxError(f"{idx}: pointer of item {s + int(bad[0])} disagrees with the sizes; remake the file")
            total += int(sz.sum()) * itemsize
        doc = np.asarray(self.doc_idx)
        if n_docs == 0 or doc[0] != 0 or (np.diff(doc) < 0).any() or doc[-1] > n:
            raise BinIdxError(f"{idx}: doc_idx must start at 0 and rise to at most {n} items; remake the file")
        self.num_tokens = total // itemsize
        bin_size = bin_.stat().st_size
        if bin_size != total:
            raise BinIdxError(f"{bin_}: {bin_size} bytes but {idx} describes {self.num_tokens} tokens of "
                              f"{self.dtype} ({total} bytes): the pair is truncated or mismatched; remake both")

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(data_file(self.prefix), dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of item i from `offset` (length None = to its end); a view into the memory map."""
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        end = start - offset + int(self.sizes[i]) if length is None else start + length
        return self.tokens[start:end]

    def item_starts(self) -> np.ndarray:
        """Token offset of every item in .bin (int64)."""
        return np.asarray(self.pointers, dtype=np.int64) // self.dtype.itemsize

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._tokens = None
        self._read_index()


def open_mask(prefix: str | Path, num_tokens: int) -> np.ndarray:
    """Memory-map PREFIX.mask (uint8 per token) and check it matches a .bin of num_tokens tokens."""
    path = mask_file(strip_suffix(prefix))
    if not path.is_file():
        raise BinIdxError(f"{_not_found(path)}: SFT masks are written by data/make_data.py for records with "
                          "'conversations' (remake the data from SFT jsonl), or train on whole sequences: "
                          "--sft_whole_seq 1 (SFT_WHOLE_SEQ=1 in demo-training-run-sft.sh)")
    size = path.stat().st_size
    if size != num_tokens:
        raise BinIdxError(f"{path}: {size} bytes but the .bin holds {num_tokens} tokens (one byte per token); "
                          "remake it")
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(num_tokens,))


def remove_stale_temporaries(prefix: str | Path, min_age_s: float = 3600.0) -> list[Path]:
    """Delete the PREFIX.tmp-<pid>.bin/.idx/.mask files of a builder that was killed before finalize()
    (SIGKILL, the OOM killer): as large as the data they were becoming, and never read. A live builder
    writes to its .bin with every batch, so files untouched for min_age_s belong to a dead one."""
    base = Path(strip_suffix(prefix))
    pattern = re.compile(re.escape(base.name) + r"\.tmp-\d+\.(bin|idx|mask)")
    now, removed = time.time(), []
    if base.parent.is_dir():
        for p in base.parent.iterdir():
            if pattern.fullmatch(p.name) and p.is_file() and now - p.stat().st_mtime >= min_age_s:
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


class MMapIndexedDatasetBuilder:
    """Streaming, atomic writer of PREFIX.bin/.idx (and PREFIX.mask when with_mask).

        with MMapIndexedDatasetBuilder("data/x", np.uint16, with_mask=True) as b:
            b.add_documents(tokens, sizes, mask)   # any number of times
        # leaving the block normally finalizes; an exception removes every temporary file

    Each document becomes one item and one doc_idx entry. Nothing appears under the final names
    before finalize(), which replaces .bin, then .mask, then .idx (readers check .bin against .idx).
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type = np.uint16, with_mask: bool = False):
        self.prefix = strip_suffix(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"binidx cannot store {self.dtype}; use one of {sorted(str(d) for d in CODES)}")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}"
        self._tmp = {"bin": Path(f"{self.prefix}{tag}.bin"), "idx": Path(f"{self.prefix}{tag}.idx")}
        if with_mask:
            self._tmp["mask"] = Path(f"{self.prefix}{tag}.mask")
        self._bin = open(self._tmp["bin"], "wb")
        try:
            self._mask = open(self._tmp["mask"], "wb") if with_mask else None
        except BaseException:  # no `with` block runs abort() for a builder that was never made
            self._bin.close()
            self._tmp["bin"].unlink(missing_ok=True)
            raise
        self._sizes = array("i")
        self.num_tokens = 0
        self._done = False
        info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self._range = (info.min, info.max) if info else None

    def add_documents(self, tokens: np.ndarray, sizes: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append len(sizes) documents whose tokens are concatenated in `tokens` (mask aligned with it)."""
        tokens = np.asarray(tokens)
        sizes = np.asarray(sizes, dtype=np.int64)
        if int(sizes.sum()) != tokens.size or (sizes < 0).any():
            raise ValueError(f"sizes sum to {int(sizes.sum())} but {tokens.size} tokens were given")
        if sizes.size and sizes.max() > np.iinfo(np.int32).max:  # .idx stores sizes as int32
            raise ValueError(f"a document of {int(sizes.max())} tokens: binidx items hold at most 2**31 - 1; "
                             "split it into several documents")
        if self._range is not None and tokens.size and (tokens.min() < self._range[0] or tokens.max() > self._range[1]):
            raise ValueError(f"token ids span {tokens.min()}..{tokens.max()}, outside {self.dtype}: "
                             "use a wider dtype (the vocab does not fit)")
        if (self._mask is None) != (mask is None):
            raise ValueError("give a mask exactly when the builder was made with with_mask=True")
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != tokens.shape:
                raise ValueError(f"mask has {mask.size} entries for {tokens.size} tokens")
            self._mask.write(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
        self._sizes.extend(sizes.astype(np.int32).tolist())
        self.num_tokens += tokens.size

    def add_document(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        tokens = np.asarray(tokens)
        self.add_documents(tokens, np.array([tokens.size]), mask)

    def finalize(self) -> None:
        """Write the index and move the three files to their final names."""
        if self._done:
            return
        n = len(self._sizes)
        if n == 0:
            raise ValueError(f"{self.prefix}: no documents were added; nothing to write")
        # On disk before the renames: after a crash the final names hold the old files or the whole new ones.
        for f in (self._bin, self._mask):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        itemsize = self.dtype.itemsize
        with open(self._tmp["idx"], "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, CODES[self.dtype], n, n + 1))
            sizes = np.frombuffer(self._sizes, dtype=np.int32)
            f.write(sizes.astype("<i4").tobytes())
            offset = 0
            for s in range(0, n, _CHUNK):
                sz = sizes[s:s + _CHUNK].astype(np.int64) * itemsize
                f.write((offset + np.concatenate(([0], np.cumsum(sz[:-1])))).astype("<i8").tobytes())
                offset += int(sz.sum())
            for s in range(0, n + 1, _CHUNK):
                f.write(np.arange(s, min(s + _CHUNK, n + 1), dtype="<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        if "mask" not in self._tmp:  # a mask left by earlier SFT data under this prefix would not match
            mask_file(self.prefix).unlink(missing_ok=True)
        for kind in ("bin", "mask", "idx"):
            if kind in self._tmp:
                os.replace(self._tmp[kind], Path(f"{self.prefix}.{kind}"))
        self._done = True

    def abort(self) -> None:
        """Remove the temporary files; the final names are left as they were."""
        for f in (self._bin, self._mask):
            if f is None:
                continue
            try:
                f.close()
            except OSError:  # a full disk or a file-size limit fails the buffered bytes' flush again: they go anyway
                pass
        for p in self._tmp.values():
            p.unlink(missing_ok=True)
        self._done = True

    def __enter__(self) -> "MMapIndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.finalize()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
