"""data/make_data.py: jsonl -> binidx (+ SFT mask), in-process and as the CLI."""
from __future__ import annotations

import errno
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tokenizers import normalizers

import data.make_data as make_data_module
from data.make_data import DATA_DIR, MakeDataError, default_out, main, make_data
from src.binidx import MMapIndexedDataset, open_mask
from src.sampler import magic_prime
from src.tokenizer import DEFAULT_SYSTEM, IM_END, load_tokenizer, render_conversation, tokenizer_file

REPO = Path(__file__).resolve().parents[1]
MINIMIND2 = Path(__file__).resolve().parents[2] / "shared" / "minimind2_tokenizer"
WORDS = ["hello", "world", "数据", "模型", "🙂", "🚀", "\n", " ", "cat", "狗", "42", "<|im_start|>", "<|im_end|>",
         "é", "\t", "它们是", "Ωμέγα"]


def rand_text(rng: random.Random) -> str:
    return "".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))


def rand_conversation(rng: random.Random) -> list[dict]:
    msgs = [{"role": "system", "content": rand_text(rng)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        msgs += [{"role": "user", "content": rand_text(rng)}, {"role": "assistant", "content": rand_text(rng)}]
    return msgs


def write_jsonl(path: Path, records: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    for i, text in (raw_lines or {}).items():
        lines.insert(i, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def docs_of(prefix) -> list[list[int]]:
    d = MMapIndexedDataset(prefix)
    return [d[i].tolist() for i in range(len(d))]


def test_pretrain_records_become_shuffled_documents(tmp_path):
    rng = random.Random()
    texts = [rand_text(rng) for _ in range(rng.randint(20, 60))]
    src = write_jsonl(tmp_path / "pre.jsonl", [{"text": t} for t in texts], {3: "", 7: "   "})  # blank lines
    r = make_data(src, 3, 8, out=tmp_path / "out/pre", seed=5, progress=False)
    tok = load_tokenizer()
    expected = [tuple(tok.encode(t).ids + [0]) for t in texts]
    docs = [tuple(d) for d in docs_of(tmp_path / "out/pre")]
    assert Counter(docs) == Counter(expected * 3)
    for e in range(3):  # each copy is a permutation of all records
        assert Counter(docs[e * len(texts):(e + 1) * len(texts)]) == Counter(expected)
    assert docs[:len(texts)] != expected or len(texts) < 3  # shuffled
    assert docs[:len(texts)] != docs[len(texts):2 * len(texts)]  # each copy in its own order
    n = sum(len(d) for d in docs)
    assert r.num_tokens == n and r.num_docs == 3 * len(texts) and r.kind == "text" and r.records == len(texts)
    assert r.magic_prime == magic_prime(n, 8) and not (tmp_path / "out/pre.mask").exists()
    assert r.dtype == np.uint16 and (tmp_path / "out/pre.bin").stat().st_size == 2 * n
    # same seed, same bytes; another seed, another order
    make_data(src, 3, 8, out=tmp_path / "again", seed=5, progress=False)
    assert (tmp_path / "again.bin").read_bytes() == (tmp_path / "out/pre.bin").read_bytes()
    make_data(src, 3, 8, out=tmp_path / "other", seed=6, progress=False)
    assert (tmp_path / "other.bin").read_bytes() != (tmp_path / "out/pre.bin").read_bytes()


@pytest.mark.parametrize("ending", ["", "\n"])
def test_last_record_is_kept_with_or_without_a_final_newline(tmp_path, ending):
    rng = random.Random()
    texts = [rand_text(rng) for _ in range(rng.randint(2, 10))]
    src = tmp_path / "pre.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + ending, encoding="utf-8")
    r = make_data(src, 1, 4, out=tmp_path / "pre", progress=False)
    tok = load_tokenizer()
    assert Counter(tuple(d) for d in docs_of(tmp_path / "pre")) == Counter(tuple(tok.encode(t).ids + [0]) for t in texts)
    assert r.records == len(texts)


def test_sft_mask_lines_up_with_assistant_tokens(tmp_path):
    rng = random.Random()
    convs = [rand_conversation(rng) for _ in range(40)]
    src = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": c} for c in convs])
    r = make_data(src, 1, 16, out=tmp_path / "sft", progress=False)
    assert r.kind == "conversations"
    tok = load_tokenizer()
    d = MMapIndexedDataset(tmp_path / "sft")
    mask = open_mask(tmp_path / "sft", d.num_tokens)
    by_text = {render_conversation(c, system=DEFAULT_SYSTEM): c for c in convs}   # the default system turn
    starts = d.item_starts()
    seen = []
    for i in range(len(d)):
        ids = d[i].tolist()
        m = mask[starts[i]:starts[i] + len(ids)].tolist()
        assert ids[-1] == 0 and m[-1] == 0
        text = tok.decode(ids[:-1], skip_special_tokens=False)
        conv = by_text[text]  # the document is exactly one rendered conversation
        seen.append(text)
        # runs of mask==1 decode to each assistant reply + <|im_end|>, in order
        runs, cur = [], []
        for t, flag in zip(ids, m):
            if flag:
                cur.append(t)
            elif cur:
                runs.append(cur)
                cur = []
        replies = [x["content"] + IM_END for x in conv if x["role"] == "assistant"]
        assert [tok.decode(run, skip_special_tokens=False) for run in runs] == replies
        assert sum(m) == sum(len(tok.encode(x).ids) for x in replies)
    assert sorted(seen) == sorted(by_text)


def sft_texts(prefix: Path, tokenizer: Path | None = None) -> list[str]:
    """Each document decoded back to its text (the end-of-document 0 left out)."""
    tok = load_tokenizer(tokenizer)
    return [tok.decode(d[:-1], skip_special_tokens=False) for d in docs_of(prefix)]


def test_sft_system_turn_default_custom_or_none(tmp_path):
    """A conversation without a system message gets --system's turn (default: SPEC's default text); one
    with its own keeps it; --system '' gives none. The CLI passes the flag through."""
    rng = random.Random()
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": rand_text(rng)},
           {"role": "assistant", "content": rand_text(rng)}]
    bare = [{"role": "user", "content": rand_text(rng)}, {"role": "assistant", "content": rand_text(rng)}]
    src = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": own}, {"conversations": bare}])
    body = "<|im_start|>user\n" + bare[0]["content"] + "<|im_end|>\n<|im_start|>assistant\n" + \
        bare[1]["content"] + "<|im_end|>\n"
    kept = "<|im_start|>system\nBe brief.<|im_end|>\n" + render_conversation(own[1:])
    for flag, system_turn in [((), "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"),
                              (("--system", "你是助手"), "<|im_start|>system\n你是助手<|im_end|>\n"),
                              (("--system", ""), "")]:
        out = tmp_path / f"o{len(system_turn)}"
        # run as a plain script from another folder: `src` comes from the venv's editable install
        proc = subprocess.run([sys.executable, str(REPO / "data/make_data.py"), str(src), "1", "4", "--out", str(out),
                               "--workers", "1", *flag], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert sorted(sft_texts(out)) == sorted([kept, system_turn + body])


@pytest.mark.skipif(not MINIMIND2.is_dir(), reason=f"{MINIMIND2} not present")
def test_sft_rendering_is_minimind2s_chat_template(tmp_path):
    """make_data renders conversations exactly as the chat_template in MiniMind2's tokenizer_config.json
    (the template MiniMind's own SFT applies), rendered here by jinja2 on fresh random conversations."""
    import jinja2
    template = json.loads((MINIMIND2 / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    render = jinja2.Environment().from_string(template).render
    rng = random.Random()
    convs = [rand_conversation(rng) for _ in range(30)]
    src = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": c} for c in convs])
    make_data(src, 1, 4, tokenizer=MINIMIND2, out=tmp_path / "sft", progress=False)
    got = sft_texts(tmp_path / "sft", MINIMIND2)
    assert sorted(got) == sorted(render(messages=c) for c in convs)


@pytest.mark.skipif(not MINIMIND2.is_dir(), reason=f"{MINIMIND2} not present")
def test_minimind2_tokenizer_folder_works(tmp_path):
    rng = random.Random()
    texts = [rand_text(rng) for _ in range(20)]
    src = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts])
    make_data(src, 1, 4, tokenizer=MINIMIND2, out=tmp_path / "p", progress=False)
    tok = load_tokenizer(MINIMIND2)
    assert Counter(tuple(d) for d in docs_of(tmp_path / "p")) == Counter(tuple(tok.encode(t).ids + [0]) for t in texts)
    # the tokenizer goes with the data (train.py then puts it beside the checkpoints)
    assert (tmp_path / "p.tokenizer.json").read_bytes() == (MINIMIND2 / "tokenizer.json").read_bytes()


def test_the_tokenizer_goes_with_the_data(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"text": "a record"}] * 3)
    make_data(src, 1, 2, out=tmp_path / "p.bin", progress=False)          # a prefix given with its suffix
    assert (tmp_path / "p.tokenizer.json").read_bytes() == tokenizer_file(None).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.bin", "p.idx", "p.jsonl", "p.tokenizer.json"]


def test_parallel_workers_write_identical_files(tmp_path):
    rng = random.Random()
    convs = [{"conversations": rand_conversation(rng)} for _ in range(300)]
    src = write_jsonl(tmp_path / "s.jsonl", convs)
    make_data(src, 2, 16, out=tmp_path / "one", seed=1, workers=1, batch_size=16, progress=False)
    make_data(src, 2, 16, out=tmp_path / "two", seed=1, workers=2, batch_size=16, progress=False)
    for ext in ("bin", "idx", "mask"):
        assert (tmp_path / f"one.{ext}").read_bytes() == (tmp_path / f"two.{ext}").read_bytes(), ext


GOOD = json.dumps({"text": "fine"})
SFT_GOOD = json.dumps({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
NO_REPLY = json.dumps({"conversations": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]})


@pytest.mark.parametrize("lines, bad_line, match", [
    ([GOOD, "{not json", GOOD], 2, "not valid JSON"),
    ([GOOD, GOOD, json.dumps({"txt": "x"})], 3, "neither 'text'"),
    ([json.dumps({"conversations": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]})], 1,
     "role 'bot'"),
    ([GOOD, json.dumps({"conversations": [{"role": "user", "content": "q"}]})], 2, "one file holds one kind"),
    ([GOOD, json.dumps({"text": 5})], 2, "must be a string"),
    ([GOOD, json.dumps(["text"])], 2, "JSON object"),
    ([GOOD, json.dumps({"text": "bad \ud800 surrogate"})], 2, "cannot be encoded"),
    ([SFT_GOOD, NO_REPLY], 2, "no assistant turn: nothing to train on"),
    ([NO_REPLY, SFT_GOOD], 1, "no assistant turn: nothing to train on"),   # the first record decides the kind
])
def test_bad_records_name_file_and_line_and_leave_nothing(tmp_path, lines, bad_line, match):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(MakeDataError, match=match) as e:
        make_data(src, 2, 4, out=tmp_path / "o", progress=False)
    assert f"in.jsonl:{bad_line}:" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_skip_bad_counts_and_keeps_the_rest(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([GOOD, "{oops", json.dumps({"x": 1}), json.dumps({"text": "more"})]) + "\n")
    r = make_data(src, 2, 1, out=tmp_path / "o", skip_bad=True, progress=False)
    assert r.skipped == 2 and r.records == 2 and r.num_docs == 4


def test_conversations_without_an_assistant_turn_are_bad_records(tmp_path):
    """Nothing to train on (mask all 0): a file of them used to train at loss 0. --skip-bad leaves them out and
    counts them; a conversation that ends with a user turn after a reply stays (that last turn is context)."""
    trailing = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"}]
    src = write_jsonl(tmp_path / "in.jsonl", [{"conversations": trailing}, {"conversations": trailing[:1]},
                                              {"conversations": [{"role": "system", "content": "s"}]}])
    with pytest.raises(MakeDataError, match=r"in\.jsonl:2: no assistant turn: nothing to train on .*--skip-bad"):
        make_data(src, 1, 4, out=tmp_path / "o", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    r = make_data(src, 2, 4, out=tmp_path / "o", skip_bad=True, progress=False)
    assert r.skipped == 2 and r.records == 1 and r.num_docs == 2
    assert sft_texts(tmp_path / "o") == [render_conversation(trailing, DEFAULT_SYSTEM)] * 2
    d = MMapIndexedDataset(tmp_path / "o")
    ids, mask = d[0].tolist(), open_mask(tmp_path / "o", d.num_tokens)[:len(d[0])].tolist()
    assert load_tokenizer().decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False) == "a1" + IM_END
    # a file of nothing but such records
    only = write_jsonl(tmp_path / "only.jsonl", [{"conversations": trailing[:1]}] * 3)
    with pytest.raises(MakeDataError, match=r"only\.jsonl:1: no assistant turn"):
        make_data(only, 1, 4, out=tmp_path / "p", progress=False)
    with pytest.raises(MakeDataError, match=r"only\.jsonl: no usable record"):
        make_data(only, 1, 4, out=tmp_path / "p", skip_bad=True, progress=False)
    assert not list(tmp_path.glob("p*"))


def test_out_that_is_a_folder_asks_for_a_prefix_inside_it(tmp_path, capsys):
    """--out outdir/ used to write outdir.bin/.idx beside the folder."""
    src = write_jsonl(tmp_path / "pre.jsonl", [{"text": "hello"}] * 3)
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    with pytest.raises(MakeDataError, match="^" + re.escape(f"--out {outdir} is a folder: give a prefix inside it, "
                                                            f"e.g. --out {outdir / 'pre'} (writes {outdir / 'pre'}.bin")):
        make_data(src, 1, 2, out=outdir, progress=False)
    assert main([str(src), "1", "2", "--out", str(outdir), "--workers", "1"]) == 1
    assert capsys.readouterr().err == f"error: --out {outdir} is a folder: give a prefix inside it, e.g. --out " \
                                      f"{outdir / 'pre'} (writes {outdir / 'pre'}.bin/.idx)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outdir", "pre.jsonl"] and not list(outdir.iterdir())
    make_data(src, 1, 2, out=outdir / "pre", progress=False)   # what it suggests
    assert MMapIndexedDataset(outdir / "pre").num_tokens > 0
    with pytest.raises(SystemExit) as e:    # a folder that does not exist yet: the trailing / says what was meant
        main([str(src), "1", "2", "--out", f"{tmp_path}/newdir/"])
    assert e.value.code == 2 and f"--out: {tmp_path}/newdir/ names a folder: give a prefix inside it, e.g. " \
                                 f"{tmp_path}/newdir/pretrain" in capsys.readouterr().err
    assert not (tmp_path / "newdir.bin").exists()


def test_cli_write_failures_are_one_line_and_leave_nothing(tmp_path, capsys):
    """An OSError while writing was a traceback. A folder that cannot be made (a file in its way: tests run as
    root, whom chmod does not stop) and a full disk (the builder's temporary .bin is made /dev/full)."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"record {i}"} for i in range(50)])
    (tmp_path / "afile").write_text("x")
    out = tmp_path.resolve() / "afile" / "sub" / "o"
    assert main([str(src), "1", "4", "--out", str(out), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {out}.*: Not a directory (") and err.count("\n") == 1
    assert err.endswith("; nothing was written under that name\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "in.jsonl"]
    if not Path("/dev/full").exists():
        return
    (tmp_path / f"o.tmp-{os.getpid()}.bin").symlink_to("/dev/full")   # the builder's temporary name (src/binidx.py)
    assert main([str(src), "1", "4", "--out", str(tmp_path / "o"), "--workers", "1"]) == 1
    err = capsys.readouterr().err   # after the progress line: the disk is found full at the last flush
    assert err.endswith(f"\nerror: cannot write {tmp_path.resolve() / 'o'}.*: {os.strerror(errno.ENOSPC)}; "
                        "nothing was written under that name\n") and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "in.jsonl"]   # the temporary went too


def test_a_tokenizer_that_cannot_be_written_says_the_data_was(tmp_path):
    """The data is in place by then: the message must not say that nothing was written."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}] * 3)
    (tmp_path / "o.tokenizer.json").mkdir()   # os.replace cannot put the copy there
    with pytest.raises(MakeDataError, match=r"^wrote .*o\.bin/\.idx but cannot write .*o\.tokenizer\.json: "
                                            r"Is a directory; copy .*tokenizer\.json there before training"):
        make_data(src, 1, 2, out=tmp_path / "o", progress=False)
    assert MMapIndexedDataset(tmp_path / "o").num_tokens > 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_ctrl_c_exits_130_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """Ctrl-C was a KeyboardInterrupt traceback. Here it comes while the temporary .bin holds two batches."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"record {i}"} for i in range(100)])
    real, calls = make_data_module.encode_lines, []

    def encode_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            assert list(tmp_path.glob("o.tmp-*.bin"))
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(make_data_module, "encode_lines", encode_then_interrupt)
    try:
        rc = main([str(src), "2", "4", "--out", str(tmp_path / "o"), "--workers", "1", "--batch-size", "10"])
    except KeyboardInterrupt:   # not out of the test: pytest would stop the whole run
        pytest.fail("main() let the KeyboardInterrupt through")
    assert rc == 130
    err = capsys.readouterr().err
    assert err.endswith(f"\ninterrupted: nothing was written under {tmp_path.resolve() / 'o'}\n") and len(calls) == 3
    assert "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_empty_and_all_bad_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(MakeDataError, match="empty.jsonl: empty file"):
        make_data(tmp_path / "empty.jsonl", 1, 4, out=tmp_path / "o", progress=False)
    (tmp_path / "bad.jsonl").write_text('[1]\n"y"\n')   # JSON, but no record a MiniMind file holds
    with pytest.raises(MakeDataError, match="bad.jsonl: no usable record"):
        make_data(tmp_path / "bad.jsonl", 1, 4, out=tmp_path / "o", skip_bad=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.jsonl"]


def test_text_that_does_not_round_trip(tmp_path):
    tok_dir = tmp_path / "lower"
    tok_dir.mkdir()
    tok = load_tokenizer()
    tok.normalizer = normalizers.Lowercase()
    tok.save(str(tok_dir / "tokenizer.json"))
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "all lower"}, {"text": "Has Upper"}])
    with pytest.raises(MakeDataError, match=r"in.jsonl:2: decode\(encode\(text\)\) != text from character 0"):
        make_data(src, 1, 2, tokenizer=tok_dir, out=tmp_path / "o", progress=False)
    assert not list(tmp_path.glob("o*"))


def test_failure_keeps_previous_output(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "first version"}] * 5)
    make_data(src, 1, 2, out=tmp_path / "o", progress=False)
    before = (tmp_path / "o.bin").read_bytes(), (tmp_path / "o.idx").read_bytes()
    write_jsonl(tmp_path / "a.jsonl", [{"text": "second"}] * 1000, {999: "{broken"})
    with pytest.raises(MakeDataError, match="a.jsonl:1000:"):
        make_data(src, 1, 2, out=tmp_path / "o", batch_size=64, progress=False)
    assert ((tmp_path / "o.bin").read_bytes(), (tmp_path / "o.idx").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "o.bin", "o.idx", "o.tokenizer.json"]


def test_temporaries_of_a_killed_run_are_removed(tmp_path, capsys):
    """A make_data killed outright (SIGKILL, OOM) leaves PREFIX.tmp-<pid>.* as large as the data; the next run
    for that prefix removes those untouched for an hour, not a live run's, nor other files."""
    import os
    import time

    old = [tmp_path / f"o.tmp-123.{ext}" for ext in ("bin", "mask")]
    fresh, other = tmp_path / "o.tmp-456.bin", tmp_path / "other.tmp-123.bin"
    for p in (*old, fresh, other):
        p.write_bytes(b"x" * 10)
    for p in (*old, other):
        os.utime(p, (time.time() - 7200, time.time() - 7200))
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "a record"}] * 3)
    make_data(src, 1, 2, out=tmp_path / "o", progress=False)
    assert [p.exists() for p in (*old, fresh, other)] == [False, False, True, True]
    assert f"removed {old[0]}, left by a run that was killed before it finished" in capsys.readouterr().err


def test_too_small_for_ctx_is_reported(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "tiny"}])
    r = make_data(src, 1, 512, out=tmp_path / "t", progress=False)
    assert r.too_small is not None and "too few for ctx_len 512" in r.too_small and "MAGIC_PRIME=NONE" in r.flags()


def test_cli_default_output_goes_to_repo_data_dir(tmp_path):
    name = f"pytest_make_data_{random.randrange(1 << 30)}"
    src = write_jsonl(tmp_path / f"{name}.jsonl", [{"text": f"record {i} 数据 🙂"} for i in range(200)])
    assert default_out(src) == REPO / "data" / name and DATA_DIR == REPO / "data"
    outputs = [REPO / "data" / f"{name}.{ext}" for ext in ("bin", "idx", "tokenizer.json")]
    try:
        p = subprocess.run([sys.executable, str(REPO / "data" / "make_data.py"), str(src), "2", "4", "--seed", "3"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        d = MMapIndexedDataset(REPO / "data" / name)
        n, prime = d.num_tokens, magic_prime(d.num_tokens, 4)
        assert f"MY_EXIT_TOKENS={n} MAGIC_PRIME={prime} DATA_FILE=data/{name} DATA_TYPE=binidx" in p.stdout
        assert "records/s" in p.stderr and "tokens/s" in p.stderr
        assert not list(tmp_path.glob(f"{name}.bin"))
        assert all(f.is_file() for f in outputs)
    finally:
        for f in outputs:
            f.unlink(missing_ok=True)


def test_cli_errors_exit_nonzero_with_the_line(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text(GOOD + "\n{bad\n")
    p = subprocess.run([sys.executable, str(REPO / "data" / "make_data.py"), str(src), "1", "4",
                        "--out", str(tmp_path / "o"), "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "x.jsonl:2: not valid JSON" in p.stderr and "--skip-bad" in p.stderr
    assert sorted(f.name for f in tmp_path.iterdir()) == ["x.jsonl"]


def test_a_file_that_is_not_jsonl_is_named_as_such(tmp_path):
    """A bad first line means the wrong file, not a bad record: --skip-bad would only lead to 'no usable record'."""
    src = tmp_path / "notes.md"
    src.write_text("# Notes\n\n" + GOOD + "\n")
    for extra in ([], ["--skip-bad"]):
        with pytest.raises(MakeDataError, match=r"notes\.md:1: not valid JSON .*: this does not look like a jsonl file"):
            make_data(src, 1, 4, out=tmp_path / "o", skip_bad=bool(extra))
    # a bad line after good ones is a bad record, which --skip-bad may leave out
    src.write_text(GOOD + "\n# stray\n" + GOOD + "\n")
    with pytest.raises(MakeDataError, match=r"notes\.md:2: not valid JSON .*\(fix the line or pass --skip-bad"):
        make_data(src, 1, 4, out=tmp_path / "o")


@pytest.mark.parametrize("kw, match", [({"workers": 0}, "--workers must be >= 1"),
                                       ({"workers": -2}, "--workers must be >= 1"),
                                       ({"batch_size": 0}, "--batch-size must be >= 1"),
                                       ({"batch_size": -3}, "--batch-size must be >= 1")])
def test_bad_workers_and_batch_size_are_named(tmp_path, kw, match):
    """--batch-size 0 used to fail with range()'s 'arg 3 must not be zero', -3 with 'every record is bad'."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}] * 3)
    with pytest.raises(MakeDataError, match=match):
        make_data(src, 1, 2, out=tmp_path / "o", progress=False, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_printed_flags_are_shell_words_for_any_path(tmp_path):
    """The lines to paste (and the quickstart's eval of them) keep a path with spaces or quotes one word."""
    out = tmp_path / "my data's dir" / "pre train"
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"record {i}"} for i in range(300)])
    r = make_data(src, 1, 4, out=out, progress=False)
    shown = subprocess.run(["bash", "-c", f'{r.flags()} && printf "%s\\n" "$DATA_FILE" "$DATA_TYPE"; '
                                          f'set -- {r.train_args()} && while [ "$1" != --data_file ]; do shift; done; '
                                          'printf "%s\\n" "$2"'],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [str(out), "binidx", str(out)]


def test_crlf_bom_and_blank_lines(tmp_path, capsys):
    """A Windows-made file: BOM, CRLF line ends, blank and whitespace lines. The records come through intact
    and the progress line ends at 100% (whitespace lines were counted in the total, never as done: 3/5, 60%)."""
    src = tmp_path / "win.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n\r\n{"text": "two\\r\\nlines"}\r\n   \r\n{"text": "three"}\r\n')
    r = make_data(src, 1, 1, out=tmp_path / "o", progress=True)
    tok = load_tokenizer()
    assert sorted(tok.decode(d[:-1]) for d in docs_of(tmp_path / "o")) == ["one", "three", "two\r\nlines"]
    assert r.records == 3 and r.skipped == 0
    assert "5/5 records (100.0%)" in capsys.readouterr().err   # every non-empty line is counted
