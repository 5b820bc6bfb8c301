"""Tokenizer loading, the default tokenizer, round trips and the chat template (src/tokenizer.py)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from data.train_tokenizer import save_tokenizer, train_tokenizer, training_text
from src.tokenizer import (DEFAULT_SYSTEM, DEFAULT_TOKENIZER_DIR, IM_END, IM_END_ID, IM_START, IM_START_ID,
                           chat_prompt, conversation_segments, load_tokenizer, render_conversation, token_dtype)

MINIMIND2 = Path(__file__).resolve().parents[2] / "shared" / "minimind2_tokenizer"
needs_minimind2 = pytest.mark.skipif(not MINIMIND2.is_dir(), reason=f"{MINIMIND2} not present")

PIECES = ["hello", " world", "The quick brown fox", "你好", "世界", "数据", "模型训练", "🙂", "🚀🔥", "👩‍💻",
          "\n", "\n\n", "\t", "  ", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "123", "3.14", "é", "ß",
          "Ωμέγα", "こんにちは", "'s", " it's", "<|im_start", "|>", "\r\n", "\u00a0", "\u200b"]


def random_text(rng: random.Random, n: int) -> str:
    """Mixed Chinese/English/emoji/whitespace/special-token text, plus random code points."""
    parts = []
    for _ in range(n):
        if rng.random() < 0.8:
            parts.append(rng.choice(PIECES))
        else:  # any non-surrogate code point, including rare CJK and symbols
            cp = rng.randrange(0x20, 0x2FFFF)
            parts.append(chr(cp) if not 0xD800 <= cp <= 0xDFFF else "x")
    return "".join(parts)


def tokenizers_under_test() -> list:
    out = [pytest.param(None, id="repo-default")]
    out.append(pytest.param(MINIMIND2, id="minimind2", marks=needs_minimind2))
    return out


@pytest.mark.parametrize("path", tokenizers_under_test())
def test_round_trip_and_special_ids(path):
    tok = load_tokenizer(path)
    assert tok.get_vocab_size() == 6400
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    texts = [random_text(rng, rng.randint(1, 60)) for _ in range(300)]
    for text, enc in zip(texts, tok.encode_batch(texts)):
        assert tok.decode(enc.ids, skip_special_tokens=False) == text, f"seed {seed}: {text!r}"
        assert all(0 <= i < 6400 for i in enc.ids)
    # special tokens are single ids wherever they occur, and encode adds nothing around the text
    ids = tok.encode("a<|im_start|>user\n你好🙂<|im_end|>\n<|endoftext|>").ids
    assert ids.count(IM_START_ID) == 1 and ids.count(IM_END_ID) == 1 and ids[-1] == 0
    assert tok.encode(IM_START).ids == [IM_START_ID] and tok.encode("").ids == []


def test_load_by_file_or_folder_gives_the_same_tokenizer():
    a = load_tokenizer(DEFAULT_TOKENIZER_DIR)
    b = load_tokenizer(DEFAULT_TOKENIZER_DIR / "tokenizer.json")
    c = load_tokenizer()
    text = "Reverse: cat dog 鱼\n🙂"
    assert a.encode(text).ids == b.encode(text).ids == c.encode(text).ids


def test_default_tokenizer_format():
    spec = json.loads((DEFAULT_TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["normalizer"] is None and spec["post_processor"] is None
    assert spec["pre_tokenizer"]["type"] == "ByteLevel" and spec["pre_tokenizer"]["add_prefix_space"] is False
    assert spec["decoder"]["type"] == "ByteLevel"
    assert spec["model"]["type"] == "BPE" and len(spec["model"]["merges"]) == 6400 - 3 - 256
    assert [(t["id"], t["content"], t["special"]) for t in spec["added_tokens"]] == \
        [(0, "<|endoftext|>", True), (1, "<|im_start|>", True), (2, "<|im_end|>", True)]
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert (DEFAULT_TOKENIZER_DIR / name).is_file()


@needs_minimind2
def test_default_tokenizer_has_minimind2_layout():
    ours = json.loads((DEFAULT_TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    theirs = json.loads((MINIMIND2 / "tokenizer.json").read_text(encoding="utf-8"))
    for key in ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert ours[key] == theirs[key], key
    for key in ("type", "dropout", "unk_token", "byte_fallback", "fuse_unk"):
        assert ours["model"][key] == theirs["model"][key], key
    assert len(ours["model"]["vocab"]) == len(theirs["model"]["vocab"]) == 6400
    assert len(ours["model"]["merges"]) == len(theirs["model"]["merges"])
    assert sorted(p.name for p in DEFAULT_TOKENIZER_DIR.iterdir()) == sorted(p.name for p in MINIMIND2.iterdir())


def test_train_tokenizer_reproduces_the_committed_one(tmp_path):
    tok = train_tokenizer(training_text())
    save_tokenizer(tok, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (DEFAULT_TOKENIZER_DIR / name).read_bytes(), \
            f"data/tokenizer/{name} is stale: rerun `python3 data/train_tokenizer.py`"


def test_bad_tokenizers_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad/tokenizer.json"):
        load_tokenizer(tmp_path / "bad")
    # a byte-level BPE whose special tokens sit at other ids
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|im_start|>", "<|endoftext|>", "<|im_end|>"])
    tok.save(str(tmp_path / "swapped.json"))
    with pytest.raises(ValueError, match=r"<\|endoftext\|> has id 1, expected 0"):
        load_tokenizer(tmp_path / "swapped.json")


def test_token_dtype():
    assert token_dtype(6400).name == "uint16" and token_dtype(65536).name == "uint16"
    assert token_dtype(65537).name == "int32" and token_dtype(151_000).name == "int32"


# ------------------------------------------------------------------------------------ chat template
def test_render_conversation_matches_spec_template():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "你好"}, {"role": "assistant", "content": "嗨"}]
    body = ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
            "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n嗨<|im_end|>\n")
    assert render_conversation(msgs) == body
    assert render_conversation(msgs, system=DEFAULT_SYSTEM) == \
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n" + body
    with_sys = [{"role": "system", "content": "Be brief."}] + msgs
    assert render_conversation(with_sys, system=DEFAULT_SYSTEM) == "<|im_start|>system\nBe brief.<|im_end|>\n" + body


def test_segments_mark_exactly_the_replies():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2\n"}]
    segs = conversation_segments(msgs)
    assert [text for text, reply in segs if reply] == ["a1" + IM_END, "a2\n" + IM_END]
    assert "".join(t for t, _ in segs) == render_conversation(msgs)
    assert all(IM_START not in t for t, reply in segs if reply)


def test_chat_prompt_continues_the_template():
    first = chat_prompt("q1")
    assert first == "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt("q1", system=None) == "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n"
    # prompt + reply + <|im_end|> + next prompt == the rendered two-turn conversation
    convo = first + "a1" + IM_END + chat_prompt("q2", first_turn=False) + "a2" + IM_END + "\n"
    assert convo == render_conversation([{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                         {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}],
                                        system=DEFAULT_SYSTEM)


@pytest.mark.parametrize("msgs, match", [
    ([{"role": "bot", "content": "x"}], "role 'bot'"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "user", "content": 3}], "must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "only the first"),
    ([], "at least one"),
])
def test_bad_messages(msgs, match):
    with pytest.raises(ValueError, match=match):
        render_conversation(msgs)

