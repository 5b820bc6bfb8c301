"""Score a checkpoint on the bundled sample's held-out prompts (greedy replies, exact match).

    python -m scripts.eval_sample --model out/quickstart/sft/rwkv-final.pth [--system ""]
"""
from __future__ import annotations

import argparse

import torch

from src.evaluate import DEFAULT_EVAL_PATH, evaluate
from src.rnn import RWKV_RNN
from src.tokenizer import DEFAULT_SYSTEM, IM_END_ID, chat_prompt, load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="rwkv-*.pth checkpoint")
    p.add_argument("--tokenizer", default=None, help="default: the repo's data/tokenizer/")
    p.add_argument("--eval", default=str(DEFAULT_EVAL_PATH), help="eval jsonl (prompt, answer, match)")
    p.add_argument("--system", default=DEFAULT_SYSTEM, help="system turn as in SFT ('' for none)")
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--label", default="model", help="name printed with the score")
    args = p.parse_args()

    torch.set_num_threads(1)  # decode is latency-bound; one thread avoids oversubscription on small CPUs
    tok = load_tokenizer(args.tokenizer)
    model = RWKV_RNN(args.model)

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

    result = evaluate(answer, args.eval)
    print(f"[eval] {args.label}: {result.summary()}")


if __name__ == "__main__":
    main()
