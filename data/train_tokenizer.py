"""Train the repo's default tokenizer (data/tokenizer/) from the bundled sample text. Deterministic.

    python3 data/train_tokenizer.py [--out DIR] [--vocab-size 6400]

Same format and special-token layout as MiniMind2's tokenizer, so either folder works wherever a
tokenizer is taken (make_data --tokenizer, the chat demo): byte-level BPE (GPT-2 pre-tokenizer regex,
the 256 byte symbols as the base alphabet), vocab 6400 = 3 special tokens + 256 bytes + 6141 merges,
ids 0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>, no normalizer, no post-processor (encode adds
nothing), ByteLevel decoder. Written files: tokenizer.json, tokenizer_config.json (for
transformers' AutoTokenizer, with the chat template of src/tokenizer.py) and special_tokens_map.json.

Training text: data/sample/pretrain.jsonl and data/sample/sft.jsonl (conversations rendered with the
chat template, special tokens removed), then the numbers 0..999 and the 6763 Chinese characters of
GB2312 (from Python's own codec; one per line) so that the vocab reaches 6400 with useful tokens:
the sample's words and phrases come first (most frequent), then numbers and the common characters.
The eval prompts are not used. For real MiniMind data use MiniMind2's tokenizer (--tokenizer).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from src.tokenizer import (DEFAULT_SYSTEM, DEFAULT_TOKENIZER_DIR, SPECIAL_TOKENS,
                           check_tokenizer, render_conversation)

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
VOCAB_SIZE = 6400

# Jinja version of src.tokenizer.render_conversation for transformers' apply_chat_template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|im_start|>system\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n<|im_start|>assistant\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
)


def training_text(sample_dir: Path = SAMPLE_DIR) -> Iterator[str]:
    """The tokenizer's training text, in a fixed order (the result depends only on these files)."""
    def strip_special(s: str) -> str:
        for t in SPECIAL_TOKENS:
            s = s.replace(t, "\n")
        return s

    for name in ("pretrain.jsonl", "sft.jsonl"):
        path = sample_dir / name
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                rec = json.loads(line)
                if "text" in rec:
                    yield strip_special(rec["text"])
                elif "conversations" in rec:
                    yield strip_special(render_conversation(rec["conversations"]))
                else:
                    raise ValueError(f"{path}:{lineno}: record has neither 'text' nor 'conversations'")
    yield " ".join(str(n) for n in range(1000))
    hanzi = gb2312_hanzi()
    yield "\n".join(hanzi[:3755] * 2 + hanzi[3755:])  # level 1 twice: its merges win the ties
    yield strip_special(render_conversation([{"role": "user", "content": "hi"}], system=DEFAULT_SYSTEM))


def gb2312_hanzi() -> list[str]:
    """The 6763 Chinese characters of GB2312 (level 1, the 3755 most common, first), from Python's codec."""
    chars = []
    for hi in range(0xB0, 0xF8):
        for lo in range(0xA1, 0xFF):
            try:
                chars.append(bytes([hi, lo]).decode("gb2312"))
            except UnicodeDecodeError:  # the few unassigned code points of the table
                continue
    return chars


def train_tokenizer(texts: Iterator[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0, 1, 2 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"the training text yields only {tok.get_vocab_size()} tokens, not {vocab_size}: "
                           "add more varied text to training_text()")
    check_tokenizer(tok, "trained tokenizer")
    return tok


def tokenizer_config() -> dict:
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    return {
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": added, "additional_special_tokens": [],
        "bos_token": SPECIAL_TOKENS[1], "eos_token": SPECIAL_TOKENS[2], "pad_token": SPECIAL_TOKENS[0],
        "unk_token": SPECIAL_TOKENS[0], "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "model_max_length": 32768,
        "spaces_between_special_tokens": False, "tokenizer_class": "PreTrainedTokenizerFast",
    }


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    """Write the three files of the folder, each atomically (temp file + os.replace)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    special_map = {"bos_token": SPECIAL_TOKENS[1], "eos_token": SPECIAL_TOKENS[2],
                   "pad_token": SPECIAL_TOKENS[0], "unk_token": SPECIAL_TOKENS[0]}
    files = {"tokenizer.json": tok.to_str(pretty=True),
             "tokenizer_config.json": json.dumps(tokenizer_config(), indent=2, ensure_ascii=False),
             "special_tokens_map.json": json.dumps(special_map, indent=2)}
    for name, text in files.items():
        tmp = out_dir / f".{name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.write(text + "\n")
            os.replace(tmp, out_dir / name)
        finally:
            tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_TOKENIZER_DIR, help="output folder (default data/tokenizer)")
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = ap.parse_args(argv)
    tok = train_tokenizer(training_text(), args.vocab_size)
    save_tokenizer(tok, args.out)
    print(f"wrote {args.out}/tokenizer.json: vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
