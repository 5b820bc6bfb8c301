"""Score a checkpoint on the bundled sample's held-out prompts (greedy replies, exact match).

    python -m scripts.eval_sample --model out/quickstart/sft-run/rwkv-final.pth [--system ""]
"""
from __future__ import annotations

import argparse
import sys

import torch

from src.evaluate import DEFAULT_EVAL_PATH, evaluate
from src.rnn import CheckpointError, RWKV_RNN
from src.tokenizer import DEFAULT_SYSTEM, IM_END_ID, chat_prompt, load_tokenizer, model_tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="rwkv-*.pth checkpoint")
    p.add_argument("--tokenizer", default=None,
                   help="default: the tokenizer.json beside --model (training puts it there), else data/tokenizer/")
    p.add_argument("--eval", default=str(DEFAULT_EVAL_PATH), help="eval jsonl (prompt, answer, match)")
    p.add_argument("--system", default=DEFAULT_SYSTEM, help="system turn as in SFT ('' for none)")
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--label", default="model", help="name printed with the score")
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        p.error(f"--max_tokens {args.max_tokens}: must be >= 1 (a reply of 0 tokens scores 0%)")

    torch.set_num_threads(1)  # decode is latency-bound; one thread avoids oversubscription on small CPUs
    try:
        tok = load_tokenizer(model_tokenizer(args.tokenizer, args.model))
        model = RWKV_RNN(args.model)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"[eval] error: {e}", file=sys.stderr)
        return 2

    def answer(prompt: str) -> str:
        logits, state = model.forward(tok.encode(chat_prompt(prompt, system=args.system or None)).ids)
        out: list[int] = []
        for _ in range(args.max_tokens):
            logits[0] = float("-inf")                      # token 0 (end of document) is banned, as in chat
            nxt = int(torch.argmax(logits))
            if nxt == IM_END_ID:
                break
            out.append(nxt)
            logits, state = model.forward([nxt], state)
        return tok.decode(out)

    try:
        result = evaluate(answer, args.eval)
    except (ValueError, FileNotFoundError) as e:   # a missing or malformed --eval file, named with its line
        print(f"[eval] error: {e}", file=sys.stderr)
        return 2
    print(f"[eval] {args.label}: {result.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
