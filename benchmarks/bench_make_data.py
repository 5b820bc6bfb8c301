"""make_data speed and memory against a one-record-at-a-time encode loop, side by side.

    .venv/bin/python -m benchmarks.bench_make_data [--mb 200] [--tokenizer PATH] [--workers 1 2]

Generates a MiniMind-style pretrain jsonl of --mb MB under benchmarks/_work/ (gitignored; reused when
it exists), then runs, each in its own process:
- baseline: for each line, json.loads -> tokenizer.encode -> decode check -> append ids (one at a time)
- make_data with --workers K for each K given (K=1: in-process Rust encode_batch)
and prints wall time, tokens/s, records/s and the peak resident memory of the whole process tree
(polled from /proc). Targets (issue 3): make_data >= 2x the baseline on a 2-core machine; peak
memory < 1 GB whatever the input size.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.table import markdown_table

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "_work"

BASELINE = r"""
import json, sys, numpy as np
from tokenizers import Tokenizer
src, tok_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
tok = Tokenizer.from_file(tok_path)
n_tok = 0
with open(src, "rb") as f, open(out, "wb") as o:
    for line in f:
        text = json.loads(line)["text"]
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        ids.append(0)
        np.array(ids, dtype=np.uint16).tofile(o)
        n_tok += len(ids)
print(n_tok)
"""


def make_corpus(path: Path, mb: int) -> int:
    """MiniMind-like pretrain lines built from the bundled sample's segments plus random Chinese/English."""
    rng = random.Random(0)
    segs = []
    with open(REPO / "data" / "sample" / "pretrain.jsonl", encoding="utf-8") as f:
        for line in f:
            segs += [s for s in json.loads(line)["text"].split("<|im_start|>") if s]
    hanzi = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    words = ["model", "data", "training", "the", "of", "and", "learning", "language", "token", "context", "人工智能",
             "数据", "模型", "训练", "语言", "学习", "问题", "答案", "，", "。", "\n"]
    n = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while f.tell() < mb * 1_000_000:
            parts = []
            for _ in range(rng.randint(3, 10)):
                if rng.random() < 0.5:
                    body = rng.choice(segs).replace("<|im_end|>", "").strip()
                else:
                    body = "".join(rng.choice(hanzi) if rng.random() < 0.6 else rng.choice(words) + " "
                                   for _ in range(rng.randint(20, 200)))
                parts.append(f"<|im_start|>{body}<|im_end|>")
            f.write(json.dumps({"text": " ".join(parts)}, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def tree_rss_kb(pid: int) -> int:
    """Resident memory of pid and all its descendants, in KB."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total


def run(cmd: list[str]) -> tuple[float, int, str]:
    """(seconds, peak tree RSS in KB, stdout) of a command."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    peak = 0
    while p.poll() is None:
        peak = max(peak, tree_rss_kb(p.pid))
        time.sleep(0.2)
    out, err = p.communicate()
    if p.returncode:
        raise RuntimeError(f"{cmd[:3]} failed:\n{err[-2000:]}")
    return time.perf_counter() - t0, peak, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=200, help="size of the generated jsonl in MB")
    ap.add_argument("--tokenizer", type=Path, default=REPO / "data" / "tokenizer", help="tokenizer folder")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="make_data --workers values to run")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    src = WORK / f"bench_pretrain_{args.mb}mb.jsonl"
    if not src.exists():
        print(f"generating {src} ...", file=sys.stderr)
        make_corpus(src, args.mb)
    n_rec = sum(1 for _ in open(src, "rb"))
    size_mb = src.stat().st_size / 1e6
    tok_file = args.tokenizer / "tokenizer.json" if args.tokenizer.is_dir() else args.tokenizer
    rows = []
    print(f"running baseline on {src.name} ...", file=sys.stderr)
    t, rss, out = run([sys.executable, "-c", BASELINE, str(src), str(tok_file), str(WORK / "baseline.bin")])
    n_tok = int(out.strip())
    rows.append(("one-at-a-time loop", t, rss))
    for k in args.workers:
        print(f"running make_data --workers {k} ...", file=sys.stderr)
        t, rss, out = run([sys.executable, "data/make_data.py", str(src), "1", "512", "--tokenizer", str(args.tokenizer),
                           "--out", str(WORK / f"bench_w{k}"), "--workers", str(k)])
        rows.append((f"make_data --workers {k}", t, rss))
    (WORK / "baseline.bin").unlink(missing_ok=True)
    base = rows[0][1]
    print(f"\n{src.name}: {size_mb:.0f} MB, {n_rec:,} records, {n_tok:,} tokens; tokenizer {tok_file}; "
          f"{os.cpu_count()} CPUs")
    print(markdown_table(["method", "seconds", "tokens/s", "records/s", "peak RSS MB", "speedup"],
                         [(name, f"{t:.1f}", f"{n_tok / t:,.0f}", f"{n_rec / t:,.0f}", f"{rss / 1024:,.0f}",
                           f"{base / t:.2f}x") for name, t, rss in rows],
                         "lrrrrr"))


if __name__ == "__main__":
    main()
