"""Score a model on held-out prompts with checkable answers (data/sample/eval.jsonl by default).

eval.jsonl records: {"task": str, "prompt": str, "answer": str, "match": "exact" | "contains"}.
- exact:    the reply, stripped of surrounding whitespace, equals the answer
- contains: the answer occurs in the reply

    from src.evaluate import evaluate, score
    acc = score(lambda prompt: my_chat_reply(prompt))          # fraction in [0, 1]
    res = evaluate(answer_fn); print(res.summary())            # + per-task accuracy, failures

answer_fn(prompt) returns the model's reply text: what it generated after the chat prompt of
src.tokenizer.chat_prompt(prompt, ...) up to (not including) <|im_end|>. make_data gives every SFT
conversation the default system turn (as MiniMind2's chat template does), so prompt with it too
(chat_prompt's default).
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

DEFAULT_EVAL_PATH = Path(__file__).resolve().parents[1] / "data" / "sample" / "eval.jsonl"
MATCH_RULES = ("exact", "contains")


@dataclass(frozen=True)
class EvalItem:
    task: str
    prompt: str
    answer: str
    match: str = "exact"

    def is_correct(self, reply: str) -> bool:
        if self.match == "exact":
            return reply.strip() == self.answer
        return self.answer in reply


@dataclass
class EvalResult:
    n: int
    n_correct: int
    per_task: dict[str, tuple[int, int]]  # task -> (correct, total)
    failures: list[tuple[EvalItem, str]] = field(default_factory=list)  # (item, reply)

    @property
    def accuracy(self) -> float:
        return self.n_correct / self.n if self.n else 0.0

    def summary(self) -> str:
        tasks = "  ".join(f"{t} {c}/{n}" for t, (c, n) in sorted(self.per_task.items()))
        return f"accuracy {self.accuracy:.1%} ({self.n_correct}/{self.n})  |  {tasks}"


def load_eval(path: str | Path = DEFAULT_EVAL_PATH) -> list[EvalItem]:
    path = Path(path)
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                item = EvalItem(str(rec["task"]), str(rec["prompt"]), str(rec["answer"]), rec.get("match", "exact"))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: an eval record needs task, prompt, answer ({e})") from None
            if item.match not in MATCH_RULES:
                raise ValueError(f"{path}:{lineno}: match {item.match!r}: expected one of {', '.join(MATCH_RULES)}")
            items.append(item)
    if not items:
        raise ValueError(f"{path}: no eval records")
    return items


def evaluate(answer_fn: Callable[[str], str], eval_path: str | Path = DEFAULT_EVAL_PATH,
             limit: int | None = None) -> EvalResult:
    """Ask answer_fn every prompt (the first `limit` when given) and check each reply."""
    items = load_eval(eval_path)[:limit]
    per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    failures = []
    for it in items:
        reply = answer_fn(it.prompt)
        ok = it.is_correct(reply)
        per_task[it.task][0] += ok
        per_task[it.task][1] += 1
        if not ok:
            failures.append((it, reply))
    n_correct = sum(c for c, _ in per_task.values())
    return EvalResult(len(items), n_correct, {t: (c, n) for t, (c, n) in per_task.items()}, failures)


def score(answer_fn: Callable[[str], str], eval_path: str | Path = DEFAULT_EVAL_PATH) -> float:
    """Accuracy (0..1) of answer_fn on the eval prompts."""
    return evaluate(answer_fn, eval_path).accuracy
