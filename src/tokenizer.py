"""Tokenizer loading and the chat template (SPEC section 3).

Any Hugging Face `tokenizers` file works: pass a tokenizer.json path or a folder that holds one
(MiniMind2's folder layout). `path=None` loads the repo's own default tokenizer in data/tokenizer/,
trained by data/train_tokenizer.py on the bundled sample text. Both are byte-level BPE with vocab
6400 and the same special tokens:

    id 0 <|endoftext|>   padding and end of document (make_data appends it to every document)
    id 1 <|im_start|>    start of a chat turn
    id 2 <|im_end|>      end of a chat turn (the chat stops generating here)

encode() adds nothing (no BOS/EOS, no post-processor) and decode(ids, skip_special_tokens=False)
gives the text back, special tokens included.

Chat template (identical to MiniMind's for the turns themselves):

    [<|im_start|>system\\n{system}<|im_end|>\\n]                       optional system turn
    <|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n     each user turn
    {content}<|im_end|>\\n                                              each assistant turn

`conversation_segments` splits a rendered conversation into (text, is_reply) pieces: the reply
pieces are the assistant content plus its <|im_end|> (what SFT trains on); everything else,
including the newline after <|im_end|>, is context. make_data encodes each piece separately, so the
prompt side of the training data is tokenized exactly as the chat encodes `chat_prompt(...)`.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from tokenizers import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER_DIR = REPO_ROOT / "data" / "tokenizer"

EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (EOT, IM_START, IM_END)  # index == token id
EOT_ID, IM_START_ID, IM_END_ID = 0, 1, 2
ROLES = ("system", "user", "assistant")
DEFAULT_SYSTEM = "You are a helpful assistant"


def tokenizer_file(path: str | Path | None) -> Path:
    """The tokenizer.json that `path` (a file, a folder holding one, or None for the repo's default) names."""
    if path is None:
        path = DEFAULT_TOKENIZER_DIR
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        hint = ("run `python3 data/train_tokenizer.py` to rebuild the default tokenizer"
                if path.parent == DEFAULT_TOKENIZER_DIR else
                "pass a tokenizer.json file or a folder holding one (e.g. MiniMind2's tokenizer folder)")
        raise FileNotFoundError(f"tokenizer file {path} not found: {hint}")
    return path


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Load a tokenizers.Tokenizer from a tokenizer.json path or a folder holding one.

    None loads the repo's default tokenizer (data/tokenizer/). The special-token layout is checked
    (ids 0/1/2 as above, encode adds nothing) so that make_data, training and chat agree.
    """
    file = tokenizer_file(path)
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a plain Exception on bad JSON or an unknown format
        raise ValueError(f"{file}: not a Hugging Face tokenizers file ({e})") from e
    check_tokenizer(tok, file)
    return tok


def check_tokenizer(tok: Tokenizer, name: str | Path = "tokenizer") -> None:
    """Raise ValueError unless `tok` has this project's special-token layout."""
    for tid, text in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(text)
        if got != tid:
            raise ValueError(f"{name}: special token {text} has id {got}, expected {tid} "
                             f"(this project needs {', '.join(f'{i} {t}' for i, t in enumerate(SPECIAL_TOKENS))})")
    ids = tok.encode(IM_START + "a" + IM_END).ids
    if ids[0] != IM_START_ID or ids[-1] != IM_END_ID or tok.encode("").ids:
        raise ValueError(f"{name}: encode() adds tokens of its own (a post-processor or template); "
                         "this project needs a tokenizer whose encode adds nothing")


# ------------------------------------------------------------------- the tokenizer travels with the model
# make_data writes the tokenizer it used beside the data (PREFIX.tokenizer.json), training puts it beside the
# checkpoints (PROJ_DIR/tokenizer.json), and the chat and eval take it from the model's folder when no
# --tokenizer is given: a model trained on MiniMind2's ids never chats through the repo's own tokenizer,
# whose 6400 ids mean other text.
def data_tokenizer_file(prefix: str | Path) -> Path:
    return Path(f"{prefix}.tokenizer.json")


def model_tokenizer_file(checkpoint: str | Path) -> Path:
    return Path(checkpoint).parent / "tokenizer.json"


def same_tokenizer(a: Path, b: Path) -> bool:
    """Whether two tokenizer.json files hold the same tokenizer (whatever their layout)."""
    return json.loads(a.read_text(encoding="utf-8")) == json.loads(b.read_text(encoding="utf-8"))


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy a tokenizer.json atomically (temporary name in dst's folder, then os.replace)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(8)}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def model_tokenizer(tokenizer: str | Path | None, checkpoint: str | Path) -> Path:
    """The tokenizer to use with `checkpoint`: --tokenizer when given, else the tokenizer.json that training
    left beside it, else the repo's default."""
    if tokenizer is None and model_tokenizer_file(checkpoint).is_file():
        tokenizer = model_tokenizer_file(checkpoint)
    return tokenizer_file(tokenizer)


def token_dtype(vocab_size: int) -> np.dtype:
    """Narrowest binidx token dtype that holds every id < vocab_size: uint16, else int32."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 31:
        return np.dtype(np.int32)
    raise ValueError(f"vocab size {vocab_size} does not fit any binidx token dtype (max 2**31)")


# ----------------------------------------------------------------------------------- chat template
def system_turn(system: str) -> str:
    return f"{IM_START}system\n{system}{IM_END}\n"


def user_turn(content: str) -> str:
    """A user turn followed by the assistant header the model continues from."""
    return f"{IM_START}user\n{content}{IM_END}\n{IM_START}assistant\n"


def _validate_messages(messages: Iterable[Mapping[str, str]]) -> list[tuple[str, str]]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be an object with 'role' and 'content', got {m!r:.80}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}: expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"message {i} is a system turn: only the first message may be one")
        out.append((role, content))
    return out


def conversation_segments(messages: Iterable[Mapping[str, str]],
                          system: str | None = None) -> list[tuple[str, bool]]:
    """Render a conversation as consecutive (text, is_reply) pieces.

    messages: [{"role": "system"|"user"|"assistant", "content": str}, ...] (MiniMind's format).
    A leading system message is rendered as the system turn; otherwise `system` (when not None)
    is. is_reply marks assistant content + its <|im_end|>: the tokens SFT computes the loss on.
    Joining the texts gives `render_conversation(messages, system)`.
    """
    msgs = _validate_messages(messages)
    if not msgs:
        raise ValueError("a conversation needs at least one message")
    segments: list[tuple[str, bool]] = []
    context = ""
    if msgs[0][0] == "system":
        context = system_turn(msgs[0][1])
        msgs = msgs[1:]
    elif system is not None:
        context = system_turn(system)
    for role, content in msgs:
        if role == "user":
            context += user_turn(content)
        else:  # assistant: close the context piece, emit the reply piece; "\n" starts the next context
            if context:
                segments.append((context, False))
            segments.append((content + IM_END, True))
            context = "\n"
    if context:
        segments.append((context, False))
    return segments


def render_conversation(messages: Iterable[Mapping[str, str]], system: str | None = None) -> str:
    """The conversation as one string in the chat template (system turn as in conversation_segments)."""
    return "".join(text for text, _ in conversation_segments(messages, system))


def chat_prompt(user: str, system: str | None = DEFAULT_SYSTEM, first_turn: bool = True) -> str:
    """Text to feed the model (RNN state) before it writes its reply to `user`.

    First turn: the optional system turn + the user turn + assistant header. Later turns assume the
    state has already consumed the previous reply including its <|im_end|> (id 2), and start with
    the "\\n" that the template puts after <|im_end|>.
    """
    if first_turn:
        return (system_turn(system) if system is not None else "") + user_turn(user)
    return "\n" + user_turn(user)
