"""MMIDIDX files: exact byte layout, reader checks, atomic writer (src/binidx.py)."""
from __future__ import annotations

import errno
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from src.binidx import BinIdxError, MMapIndexedDataset, MMapIndexedDatasetBuilder, open_mask

CODE = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "uint16": 8}
# SPEC section 3's dtype codes, as little-endian numpy type strings (6 and 7 are both float64)
SPEC_CODES = {1: "<u1", 2: "<i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f8", 8: "<u2"}


def random_docs(rng: np.random.Generator, n: int, high: int) -> list[np.ndarray]:
    return [rng.integers(0, high, size=int(rng.integers(1, 50))) for _ in range(n)]


def parse_idx(path) -> dict:
    """Independent parser of the MMIDIDX index (struct only)."""
    raw = path.read_bytes()
    magic, version, code, n, n_docs = struct.unpack_from("<9sQBQQ", raw, 0)
    off = 9 + 8 + 1 + 8 + 8
    sizes = list(struct.unpack_from(f"<{n}i", raw, off))
    off += 4 * n
    pointers = list(struct.unpack_from(f"<{n}q", raw, off))
    off += 8 * n
    doc_idx = list(struct.unpack_from(f"<{n_docs}q", raw, off))
    off += 8 * n_docs
    return dict(magic=magic, version=version, code=code, n=n, n_docs=n_docs, sizes=sizes, pointers=pointers,
                doc_idx=doc_idx, trailing=len(raw) - off)


@pytest.mark.parametrize("dtype, high", [("uint16", 65536), ("int32", 200_000), ("uint8", 256), ("int8", 128),
                                         ("int16", 32768), ("int64", 1 << 40)])
def test_layout_field_by_field(tmp_path, dtype, high):
    rng = np.random.default_rng()
    docs = random_docs(rng, int(rng.integers(1, 40)), high)
    prefix = tmp_path / "d"
    with MMapIndexedDatasetBuilder(prefix, dtype) as b:
        for k in range(0, len(docs), 3):  # batches of up to 3 documents, as make_data adds them
            chunk = docs[k:k + 3]
            b.add_documents(np.concatenate(chunk), np.array([len(d) for d in chunk]))
    f = parse_idx(tmp_path / "d.idx")
    itemsize = np.dtype(dtype).itemsize
    assert f["magic"] == b"MMIDIDX\x00\x00" and f["version"] == 1 and f["code"] == CODE[dtype]
    assert f["n"] == len(docs) and f["n_docs"] == len(docs) + 1 and f["trailing"] == 0
    assert f["sizes"] == [len(d) for d in docs]
    assert f["pointers"] == [itemsize * sum(len(d) for d in docs[:i]) for i in range(len(docs))]
    assert f["doc_idx"] == list(range(len(docs) + 1))
    raw = (tmp_path / "d.bin").read_bytes()
    assert raw == b"".join(d.astype(np.dtype(dtype).newbyteorder("<")).tobytes() for d in docs)
    assert not (tmp_path / "d.mask").exists()
    r = MMapIndexedDataset(prefix)
    assert len(r) == len(docs) and r.num_tokens == sum(len(d) for d in docs) and r.dtype == np.dtype(dtype)
    for i, d in enumerate(docs):
        assert np.array_equal(r[i], d)
        if len(d) > 2:
            assert np.array_equal(r.get(i, 1, len(d) - 2), d[1:-1])
    assert np.array_equal(np.asarray(r.tokens), np.concatenate(docs))
    r2 = pickle.loads(pickle.dumps(r))  # DataLoader workers: re-opens by prefix, no data copied
    assert len(pickle.dumps(r)) < 500 and np.array_equal(r2[len(docs) - 1], docs[-1])


@pytest.mark.parametrize("code", sorted(SPEC_CODES))
def test_reader_follows_the_spec_dtype_codes(tmp_path, code):
    """A file written byte by byte here (struct and numpy only, not the builder), for every dtype code of
    SPEC's table: the reader must pick that dtype, so files from other MMIDIDX writers read right."""
    rng = np.random.default_rng()
    dt = np.dtype(SPEC_CODES[code])
    lo = -100 if dt.kind in "if" else 0
    docs = [rng.integers(lo, 100, size=int(rng.integers(1, 20))).astype(dt) for _ in range(int(rng.integers(1, 8)))]
    sizes = [len(d) for d in docs]
    pointers = [dt.itemsize * sum(sizes[:i]) for i in range(len(docs))]
    n = len(docs)
    (tmp_path / "h.idx").write_bytes(struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, code, n, n + 1)
                                     + struct.pack(f"<{n}i", *sizes) + struct.pack(f"<{n}q", *pointers)
                                     + struct.pack(f"<{n + 1}q", *range(n + 1)))
    (tmp_path / "h.bin").write_bytes(b"".join(d.tobytes() for d in docs))
    r = MMapIndexedDataset(tmp_path / "h")
    assert r.dtype == dt.newbyteorder("=") and r.num_tokens == sum(sizes)
    for i, d in enumerate(docs):
        assert np.array_equal(r[i], d)


def test_mask_is_written_and_checked(tmp_path):
    rng = np.random.default_rng()
    docs = random_docs(rng, 10, 6400)
    masks = [rng.integers(0, 2, size=len(d)) for d in docs]
    with MMapIndexedDatasetBuilder(tmp_path / "s", np.uint16, with_mask=True) as b:
        for d, m in zip(docs, masks):
            b.add_document(d, m)
    r = MMapIndexedDataset(tmp_path / "s")
    assert np.array_equal(open_mask(tmp_path / "s", r.num_tokens), np.concatenate(masks))
    with pytest.raises(BinIdxError, match="s.mask"):
        open_mask(tmp_path / "s", r.num_tokens + 1)
    # writing the prefix again without a mask removes the stale one
    with MMapIndexedDatasetBuilder(tmp_path / "s", np.uint16) as b:
        b.add_document(docs[0])
    assert not (tmp_path / "s.mask").exists()
    with pytest.raises(BinIdxError, match="not found"):
        open_mask(tmp_path / "s", len(docs[0]))


def test_failed_write_leaves_nothing_and_keeps_old_files(tmp_path):
    with MMapIndexedDatasetBuilder(tmp_path / "x", np.uint16) as b:
        b.add_document(np.arange(5))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError, match="boom"):
        with MMapIndexedDatasetBuilder(tmp_path / "x", np.uint16, with_mask=True) as b:
            b.add_document(np.arange(100), np.ones(100))
            raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(ValueError, match="no documents"):
        with MMapIndexedDatasetBuilder(tmp_path / "y", np.uint16):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x.idx"]


def test_tokens_outside_the_dtype_are_refused(tmp_path):
    with pytest.raises(ValueError, match="wider dtype"):
        with MMapIndexedDatasetBuilder(tmp_path / "v", np.uint16) as b:
            b.add_document(np.array([1, 70000]))
    assert list(tmp_path.iterdir()) == []


def test_documents_past_the_int32_item_size_are_refused(tmp_path):
    huge = np.broadcast_to(np.uint16(7), (2**31,))  # 2**31 tokens, one element of memory
    with pytest.raises(ValueError, match="at most 2\\*\\*31 - 1; split it"):
        with MMapIndexedDatasetBuilder(tmp_path / "h", np.uint16) as b:
            b.add_documents(huge, np.array([2**31]))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def good(tmp_path):
    with MMapIndexedDatasetBuilder(tmp_path / "g", np.uint16) as b:
        for n in (3, 7, 2):
            b.add_document(np.arange(n))
    return tmp_path / "g"


def corrupt(path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, match", [
    (lambda p: p.with_suffix(".idx").write_bytes(b"MMIDIDX\x00"), "truncated"),
    (lambda p: p.with_suffix(".idx").write_bytes(b"PK\x03\x04" + b"\x00" * 60), "not an MMIDIDX"),
    (lambda p: corrupt(p.with_suffix(".idx"), 9, struct.pack("<Q", 2)), "version 2"),
    (lambda p: corrupt(p.with_suffix(".idx"), 17, bytes([9])), "unknown dtype code 9"),
    (lambda p: p.with_suffix(".idx").write_bytes(p.with_suffix(".idx").read_bytes()[:-8]), "truncated or corrupt"),
    (lambda p: corrupt(p.with_suffix(".idx"), 34 + 12 + 8, struct.pack("<q", 4)), "pointer of item 1"),
    (lambda p: corrupt(p.with_suffix(".idx"), 34, struct.pack("<i", -1)), "negative item size"),
    (lambda p: corrupt(p.with_suffix(".idx"), 34 + 12 * 3, struct.pack("<q", 1)), "doc_idx"),  # must start at 0
    (lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes()[:-2]), "g.bin: 22 bytes"),
    (lambda p: p.with_suffix(".bin").unlink(), "g.bin not found"),
])
def test_damaged_files_fail_with_the_file_named(good, damage, match):
    damage(good)
    with pytest.raises(BinIdxError, match=match):
        MMapIndexedDataset(good)


def test_files_reach_the_disk_before_they_get_their_names(tmp_path, monkeypatch):
    """Temp file + rename is atomic only for data on disk: without fsync a crash soon after the rename can
    leave .bin/.idx/.mask under the final names with lost content (and the old files gone)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name)),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(a).name)), real_replace(a, b))[1])
    with MMapIndexedDatasetBuilder(tmp_path / "d", np.uint16, with_mask=True) as b:
        b.add_document(np.array([5, 6, 0]), np.array([0, 1, 0]))
    for kind in ("bin", "mask", "idx"):
        tmp = next(name for what, name in events if what == "replace" and name.endswith(f".{kind}"))
        assert events.index(("fsync", tmp)) < events.index(("replace", tmp)), events
    assert MMapIndexedDataset(tmp_path / "d")[0].tolist() == [5, 6, 0]


def test_write_failures_leave_no_temporaries(tmp_path):
    """A full disk (the temporaries are made /dev/full here): the bytes still buffered failed again at abort()'s
    close(), which then left the temporaries and raised a second error. A mask that cannot be opened left the .bin."""
    tag = f"tmp-{os.getpid()}"   # the builder's temporary names
    if Path("/dev/full").exists():
        for ext in ("bin", "mask"):
            (tmp_path / f"f.{tag}.{ext}").symlink_to("/dev/full")
        with pytest.raises(OSError) as e:
            with MMapIndexedDatasetBuilder(tmp_path / "f", np.uint16, with_mask=True) as b:
                b.add_document(np.arange(10), np.ones(10))   # buffered: finalize()'s flush meets the full disk
        assert e.value.errno == errno.ENOSPC and e.value.__context__ is None
        assert list(tmp_path.iterdir()) == []
    (tmp_path / f"m.{tag}.mask").mkdir()
    with pytest.raises(IsADirectoryError):
        MMapIndexedDatasetBuilder(tmp_path / "m", np.uint16, with_mask=True)
    assert [p.name for p in tmp_path.iterdir()] == [f"m.{tag}.mask"]


def test_a_relative_path_not_found_says_where_it_looked(tmp_path, monkeypatch):
    """The demo scripts cd into the repo first: 'data/x.idx not found' alone may be read against another folder."""
    monkeypatch.chdir(tmp_path)
    where = Path.cwd() / "data" / "x"
    with pytest.raises(BinIdxError, match="^" + re.escape(f"data/x.idx not found (looked in {where}.idx): make it "
                                                           "with `python3 data/make_data.py FILE.jsonl")):
        MMapIndexedDataset("data/x")
    with pytest.raises(BinIdxError, match="^" + re.escape(f"data/x.mask not found (looked in {where}.mask): SFT")):
        open_mask("data/x.bin", 3)
    with pytest.raises(BinIdxError, match="^" + re.escape(f"{where}.idx not found: make it with")):   # absolute
        MMapIndexedDataset(where)
