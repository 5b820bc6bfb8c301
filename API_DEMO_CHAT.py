"""Chat with a trained RWKV-7 checkpoint in the terminal (RNN mode: the state carries the conversation).

    python API_DEMO_CHAT.py --model out/rwkv-final.pth                 # interactive
    python API_DEMO_CHAT.py --model out/rwkv-final.pth --prompt "Hi"   # answer one message, exit

Each user message is wrapped in the chat template the SFT data was made with (its system turn, or none
with --system ''), fed to the model in parallel (prefill), and the reply is sampled token by token
(src.sampling; defaults are the original demo's) and printed as it comes, until <|im_end|> or
--max_tokens. Interactive commands: `+reset` starts a new conversation; Ctrl-C or Ctrl-D quits.
"""
from __future__ import annotations

import argparse
import sys
from typing import Iterator

import torch
from tokenizers import Tokenizer

from src.rnn import CheckpointError, RWKV_RNN, State
from src.sampling import Sampler, SamplingConfig
from src.tokenizer import DEFAULT_SYSTEM, EOT_ID, IM_END_ID, chat_prompt, load_tokenizer, model_tokenizer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RESET_COMMAND = "+reset"


class Utf8Stream:
    """Turns generated token ids into printable text without ever emitting half a UTF-8 character.

    Byte-level BPE tokens can end inside a multi-byte character; decoding them alone gives U+FFFD.
    Ids are held back while their decoded text ends in U+FFFD (an incomplete character), at most
    `max_pending` tokens (more means the bytes really are invalid: they are then shown as U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, max_pending: int = 8):
        self.tokenizer, self.max_pending = tokenizer, max_pending
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=False)
        if text.endswith("\ufffd") and len(self.pending) < self.max_pending:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending, skip_special_tokens=False) if self.pending else ""
        self.pending = []
        return text


class ChatSession:
    """One conversation: the RNN state after everything said so far, and the template bookkeeping."""

    def __init__(self, model: RWKV_RNN, tokenizer: Tokenizer, sampler: Sampler, system: str | None,
                 max_tokens: int):
        self.model, self.tokenizer, self.sampler = model, tokenizer, sampler
        self.system, self.max_tokens = system, max_tokens
        self.reset()

    def reset(self) -> None:
        self.state: State | None = None
        self.fed: list[int] = []          # every token id the state has consumed, in order
        self.sampled: list[int] = []      # the last reply's sampled ids, including a final <|im_end|>
        self.reply_open = False           # True once a reply was generated: close it before the next turn

    def reply(self, message: str) -> Iterator[str]:
        """Feed `message` as the next user turn; return an iterator over the reply's text pieces.

        Checks and prefills now (ValueError for an empty message), then samples lazily. The
        conversation advances only when the iterator is exhausted: an error (e.g. out of memory)
        leaves the state as it was before the message.
        """
        if not message.strip():
            raise ValueError("empty message: type something (or +reset, or Ctrl-D to quit)")
        text = chat_prompt(message, system=self.system, first_turn=not self.reply_open)
        # A finished reply ends with <|im_end|>, sampled but not yet fed: it starts the next prompt.
        prompt = ([IM_END_ID] if self.reply_open else []) + self.tokenizer.encode(text).ids
        logits, state = self.model.forward(prompt, self.state)
        return self._generate(prompt, logits, state)

    def _generate(self, prompt: list[int], logits: torch.Tensor, state: State) -> Iterator[str]:
        self.sampler.reset()
        stream = Utf8Stream(self.tokenizer)
        fed, sampled = list(prompt), []
        for _ in range(self.max_tokens):
            token = self.sampler.sample(logits)
            sampled.append(token)
            if token == IM_END_ID:
                break
            piece = stream.push(token)
            if piece:
                yield piece
            logits, state = self.model.forward(token, state)
            fed.append(token)
        tail = stream.flush()
        if tail:
            yield tail
        self.state, self.reply_open = state, True
        self.fed += fed
        self.sampled = sampled


def is_out_of_memory(e: BaseException) -> bool:
    # The CPU allocator raises a plain RuntimeError, CUDA/ROCm a torch.OutOfMemoryError.
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = SamplingConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="rwkv-*.pth checkpoint (a plain x070 state_dict)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or a folder holding one (default: the tokenizer.json that training put "
                        "beside --model, else the repo's data/tokenizer/)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights and activations (default: fp32 on CPU, bf16 on GPU); the wkv state is fp32")
    p.add_argument("--wkv_impl", choices=("auto", "cuda", "torch"), default="auto",
                   help="WKV7 implementation for the prompt prefill (see src/wkv7); cuda: the GPU kernel or an "
                        "error at start (a prompt's last < 16 tokens still run on PyTorch)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (default 0: torch's choice, usually one per core)")
    p.add_argument("--max_tokens", type=int, default=500, help="longest reply in tokens (default %(default)s)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default %(default)s)")
    p.add_argument("--top_p", type=float, default=d.top_p, help="nucleus mass, 1 = off (default %(default)s)")
    p.add_argument("--top_k", type=int, default=d.top_k,
                   help="keep the k most likely tokens, 0 = off (default %(default)s)")
    p.add_argument("--presence_penalty", type=float, default=d.presence_penalty,
                   help="subtracted from the logit of every token the reply has used (default %(default)s)")
    p.add_argument("--frequency_penalty", type=float, default=d.frequency_penalty,
                   help="subtracted once more per (decayed) use of a token in the reply (default %(default)s)")
    p.add_argument("--penalty_decay", type=float, default=d.penalty_decay,
                   help="per-token decay of the frequency counts (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--system", default=DEFAULT_SYSTEM,
                   help=f"system turn (default: SFT's {DEFAULT_SYSTEM!r}; '' = no system turn)")
    p.add_argument("--prompt", default=None, help="answer this one message, print the reply and exit")
    return p.parse_args(argv)


def build_session(args: argparse.Namespace) -> ChatSession:
    """Load model, tokenizer and sampler; raises ValueError/CheckpointError/FileNotFoundError with a fix."""
    if args.max_tokens < 1:
        raise ValueError(f"--max_tokens {args.max_tokens}: must be >= 1")
    if args.threads < 0:
        raise ValueError(f"--threads {args.threads}: must be >= 0 (0 = torch's default)")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError:   # torch's text lists every device type it knows: too long to help
        raise ValueError(f"--device {args.device!r} is not a device name: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA/ROCm device is available here; use --device cpu")
    dtype = DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "bf16")]
    tokenizer = load_tokenizer(args.tokenizer)
    model = RWKV_RNN(args.model, device=device, dtype=dtype, wkv_impl=args.wkv_impl)
    n_tok = tokenizer.get_vocab_size()
    if n_tok > model.vocab_size:
        raise ValueError(f"the tokenizer has {n_tok} tokens but the model {model.path} only {model.vocab_size}: "
                         "use the tokenizer the model was trained with (--tokenizer)")
    # Ids the tokenizer cannot decode (a model vocab padded beyond it) are banned like <|endoftext|>.
    banned = (EOT_ID, *range(n_tok, model.vocab_size))
    config = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                            penalty_decay=args.penalty_decay, banned=banned)
    sampler = Sampler(model.vocab_size, config, seed=args.seed)
    return ChatSession(model, tokenizer, sampler, args.system or None, args.max_tokens)


def answer(session: ChatSession, message: str, label: str = "") -> bool:
    """Print `label` and the reply to `message`; on bad input or out of memory print why, return False."""
    try:
        pieces = session.reply(message)
        print(label, end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
    except ValueError as e:
        print(f"[error] {e}", file=sys.stderr, flush=True)
        return False
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        print(f"\n[error] out of memory on {session.model.device} while processing this message; "
              "the conversation is unchanged: send a shorter message, +reset, or use a device with more "
              "memory", file=sys.stderr, flush=True)
        return False
    print(flush=True)
    return True


def chat_loop(session: ChatSession) -> int:
    """Interactive turns until Ctrl-D (EOF) or Ctrl-C; both end the program normally (0)."""
    try:
        print(f"Type a message. {RESET_COMMAND} starts a new conversation; Ctrl-D or Ctrl-C quits.",
              file=sys.stderr, flush=True)
        while True:
            message = input("User: ")
            if message.strip() == RESET_COMMAND:
                session.reset()
                print("[conversation cleared]", file=sys.stderr)
                continue
            answer(session, message, label="Assistant: ")
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.tokenizer = model_tokenizer(args.tokenizer, args.model)
        session = build_session(args)
        m = session.model
        print(f"RWKV-7 L{m.n_layer}-D{m.n_embd} vocab {m.vocab_size} from {m.path} on {m.device} ({m.dtype}), "
              f"tokenizer {args.tokenizer}", file=sys.stderr)
        if args.prompt is not None:
            if not args.prompt.strip():
                raise ValueError("--prompt is empty: give the message to answer, e.g. --prompt \"Hi\"")
            return 0 if answer(session, args.prompt) else 1
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"[error] {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while loading or answering --prompt: no traceback, the usual status
        print(file=sys.stderr)
        return 130
    return chat_loop(session)


if __name__ == "__main__":
    sys.exit(main())
