"""Generate the bundled sample data (deterministic; the committed files are this script's output).

    python3 data/sample/make_sample.py [--out DIR]   # rewrites data/sample/{pretrain,sft,eval}.jsonl

Files, in MiniMind's formats:
- pretrain.jsonl  {"text": "<|im_start|>...<|im_end|> <|im_start|>...<|im_end|> ..."}: each line holds
  several segments; a segment is one task example written as "prompt\\nanswer", or a few short
  sentences of bilingual prose (facts about the same words and numbers).
- sft.jsonl       {"conversations": [{"role": ..., "content": ...}, ...]}: one or two task turns, the
  assistant content being exactly the answer; some conversations open with the system message
  written out (DEFAULT_SYSTEM), the others get the same turn from make_data's default (--system), as
  MiniMind's conversations, which have none, get it from MiniMind2's chat template.
- eval.jsonl      {"task", "prompt", "answer", "match"}: held-out prompts. Tasks and templates are the
  training ones, the instances are not: no eval prompt occurs in pretrain.jsonl or sft.jsonl.

The tasks are small and templated so that a tiny RWKV (L2-4, D128-256) learns them on a CPU in a few
minutes while an untrained model scores ~0: copy / reverse / count a short word list, the first or
last word, the larger of two numbers, the next number, one-digit addition, upper-casing a word,
English <-> Chinese words, and the Chinese versions of reverse / addition / next number.
Answers are short and checked by exact match (src/evaluate.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path
from typing import Callable

OUT_DIR = Path(__file__).resolve().parent
SEED = 20240607
N_PRETRAIN_LINES = 2200
N_SFT = 7000
N_EVAL_PER_TASK = 15
SYSTEM_TEXT = "You are a helpful assistant"  # = src.tokenizer.DEFAULT_SYSTEM (this script is standalone)

# English noun -> Chinese word; the list words of every task come from here.
WORDS = {
    "cat": "猫", "dog": "狗", "fish": "鱼", "bird": "鸟", "tree": "树", "sun": "太阳", "moon": "月亮",
    "star": "星星", "book": "书", "pen": "笔", "cup": "杯子", "hat": "帽子", "box": "盒子", "car": "汽车",
    "bus": "公交车", "ship": "船", "door": "门", "lamp": "灯", "bed": "床", "key": "钥匙", "ball": "球",
    "cake": "蛋糕", "milk": "牛奶", "tea": "茶", "rice": "米饭", "egg": "鸡蛋", "apple": "苹果",
    "rose": "玫瑰", "hill": "小山", "lake": "湖", "road": "路", "rain": "雨", "snow": "雪", "wind": "风",
    "fire": "火", "stone": "石头", "bell": "铃", "coin": "硬币", "ring": "戒指", "shoe": "鞋",
}
EN = list(WORDS)
ZH_ONE_CHAR = [z for z in WORDS.values() if len(z) == 1]  # single characters for the Chinese list tasks
COLORS = {"red": "红色", "blue": "蓝色", "green": "绿色", "white": "白色", "black": "黑色", "yellow": "黄色"}
PLACES = {"box": "盒子里", "bed": "床上", "road": "路上", "lake": "湖边", "hill": "山上", "door": "门口"}
NAMES = ["Tom", "Amy", "Lily", "Sam", "Ben", "Mia", "小明", "小红", "小华", "小刚"]

Example = tuple[str, str]  # (prompt, answer)


def _words(rng: random.Random, lo: int, hi: int, pool: list[str] = EN) -> list[str]:
    """lo..hi distinct words: distinct so that reverse/first/last have one right answer."""
    n = rng.randint(lo, hi)
    out: list[str] = []
    while len(out) < n:
        w = rng.choice(pool)
        if w not in out:
            out.append(w)
    return out


def _pick(rng: random.Random, templates: list[str]) -> str:
    return templates[rng.randrange(len(templates))]


# --------------------------------------------------------------------------------------- the tasks
def t_copy(rng: random.Random) -> Example:
    ws = " ".join(_words(rng, 3, 5))
    return _pick(rng, ["Repeat: {}", "Say again: {}", "Copy these words: {}"]).format(ws), ws


def t_reverse(rng: random.Random) -> Example:
    ws = _words(rng, 3, 4)
    t = _pick(rng, ["Reverse: {}", "Reverse the order: {}", "Say these words backwards: {}"])
    return t.format(" ".join(ws)), " ".join(reversed(ws))


def t_count(rng: random.Random) -> Example:
    ws = _words(rng, 1, 6)
    t = _pick(rng, ["How many words: {}?", "Count the words: {}"])
    return t.format(" ".join(ws)), str(len(ws))


def t_first_last(rng: random.Random) -> Example:
    ws = _words(rng, 2, 5)
    if rng.random() < 0.5:
        return _pick(rng, ["What is the first word: {}?", "First word of: {}"]).format(" ".join(ws)), ws[0]
    return _pick(rng, ["What is the last word: {}?", "Last word of: {}"]).format(" ".join(ws)), ws[-1]


def t_larger(rng: random.Random) -> Example:
    a, b = rng.sample(range(0, 31), 2)
    t = _pick(rng, ["Which is larger, {} or {}?", "Which number is bigger: {} or {}?"])
    return t.format(a, b), str(max(a, b))


def t_next(rng: random.Random) -> Example:
    n = rng.randint(0, 98)
    return _pick(rng, ["What comes after {}?", "What number follows {}?"]).format(n), str(n + 1)


def t_add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return _pick(rng, ["What is {} + {}?", "Add {} and {}."]).format(a, b), str(a + b)


def t_upper(rng: random.Random) -> Example:
    w = rng.choice(EN)
    return _pick(rng, ["Uppercase: {}", "Write {} in capital letters."]).format(w), w.upper()


def t_translate(rng: random.Random) -> Example:
    en = rng.choice(EN)
    zh = WORDS[en]
    if rng.random() < 0.5:
        return _pick(rng, ["“{}”的英文是什么？", "“{}”用英语怎么说？"]).format(zh), en
    return _pick(rng, ["What is {} in Chinese?", "How do you say {} in Chinese?"]).format(en), zh


def t_zh_reverse(rng: random.Random) -> Example:
    ws = _words(rng, 3, 4, ZH_ONE_CHAR)
    t = _pick(rng, ["把这些词倒过来：{}", "倒序：{}"])
    return t.format(" ".join(ws)), " ".join(reversed(ws))


def t_zh_add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return _pick(rng, ["{}加{}等于几？", "算一算：{}加{}"]).format(a, b), str(a + b)


def t_zh_next(rng: random.Random) -> Example:
    n = rng.randint(0, 98)
    return _pick(rng, ["{}后面是几？", "数字{}的下一个数是几？"]).format(n), str(n + 1)


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "copy": t_copy, "reverse": t_reverse, "count": t_count, "first_last": t_first_last,
    "larger": t_larger, "next": t_next, "add": t_add, "upper": t_upper, "translate": t_translate,
    "zh_reverse": t_zh_reverse, "zh_add": t_zh_add, "zh_next": t_zh_next,
}


def prose(rng: random.Random) -> str:
    """A few sentences of bilingual prose about the task vocabulary (facts, not tasks)."""
    out = []
    for _ in range(rng.randint(2, 4)):
        k = rng.randrange(8)
        en, en2 = rng.sample(EN, 2)
        c = rng.choice(list(COLORS))
        who = rng.choice(NAMES)
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        n = rng.randint(0, 98)
        p = rng.choice(list(PLACES))
        out.append([
            f"The word {en} is {WORDS[en]} in Chinese.",
            f"“{WORDS[en]}”的英文是 {en}。",
            f"{who} has a {c} {en} and a {en2}.",
            f"{who}有一个“{WORDS[en]}”，是{COLORS[c]}的。",
            f"{a} plus {b} is {a + b}, and {n + 1} comes after {n}.",
            f"{a}加{b}等于{a + b}，{n}后面是{n + 1}。",
            f"The {en} is in the {p}. In capital letters, {en} is {en.upper()}.",
            f"“{WORDS[en]}”在{PLACES[p]}。{max(a, b)}比{min(a, b)}大。" if a != b else f"“{WORDS[en]}”在{PLACES[p]}。",
        ][k])
    return " ".join(out)


# -------------------------------------------------------------------------------------- generation
def make_eval(rng: random.Random) -> list[dict]:
    items, seen = [], set()
    for task, fn in TASKS.items():
        n = 0
        while n < N_EVAL_PER_TASK:
            prompt, answer = fn(rng)
            if prompt not in seen:
                seen.add(prompt)
                items.append({"task": task, "prompt": prompt, "answer": answer, "match": "exact"})
                n += 1
    return items


# Tasks that are tables of facts (sums, upper-case spellings, translations) need more examples than
# the rule-like ones (copy, reverse) before a tiny model gets them right.
TASK_WEIGHTS = {"add": 2.5, "zh_add": 2.5, "upper": 2.0, "translate": 1.5, "count": 1.5, "larger": 1.5}


def training_example(rng: random.Random, held_out: set[str]) -> Example:
    """A random task example (drawn by TASK_WEIGHTS, default 1) whose prompt is not an eval prompt."""
    names = list(TASKS)
    fn = TASKS[rng.choices(names, weights=[TASK_WEIGHTS.get(n, 1.0) for n in names])[0]]
    while True:
        prompt, answer = fn(rng)
        if prompt not in held_out:
            return prompt, answer


def make_pretrain(rng: random.Random, held_out: set[str]) -> list[dict]:
    lines = []
    for _ in range(N_PRETRAIN_LINES):
        segs = []
        for _ in range(rng.randint(6, 12)):
            if rng.random() < 0.8:
                segs.append("{}\n{}".format(*training_example(rng, held_out)))
            else:
                segs.append(prose(rng))
        lines.append({"text": " ".join(f"<|im_start|>{s}<|im_end|>" for s in segs)})
    return lines


def make_sft(rng: random.Random, held_out: set[str]) -> list[dict]:
    convs = []
    for _ in range(N_SFT):
        msgs = [{"role": "system", "content": SYSTEM_TEXT}] if rng.random() < 0.4 else []
        for _ in range(1 if rng.random() < 0.8 else 2):
            prompt, answer = training_example(rng, held_out)
            msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        convs.append({"conversations": msgs})
    return convs


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="write the bundled sample data (deterministic)")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: data/sample)")
    out = ap.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    eval_items = make_eval(rng)
    held_out = {it["prompt"] for it in eval_items}
    pretrain = make_pretrain(rng, held_out)
    sft = make_sft(rng, held_out)
    for name, recs in (("pretrain.jsonl", pretrain), ("sft.jsonl", sft), ("eval.jsonl", eval_items)):
        write_jsonl(out / name, recs)
        print(f"{out / name}: {len(recs)} records, {(out / name).stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
