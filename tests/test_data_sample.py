"""The bundled sample data (data/sample/) and the evaluation helper (src/evaluate.py)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from data.sample.make_sample import WORDS, main as make_sample
from scripts.eval_sample import main as eval_main
from src.evaluate import DEFAULT_EVAL_PATH, EvalItem, evaluate, load_eval, score
from src.model import RWKV, ModelConfig
from src.tokenizer import IM_END, IM_START, ROLES

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
ZH_TO_EN = {zh: en for en, zh in WORDS.items()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_committed_sample_is_the_generator_output(tmp_path):
    make_sample(["--out", str(tmp_path)])
    for name in ("pretrain.jsonl", "sft.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), \
            f"data/sample/{name} is stale: rerun `python3 data/sample/make_sample.py`"
    total = sum((SAMPLE / n).stat().st_size for n in ("pretrain.jsonl", "sft.jsonl", "eval.jsonl"))
    assert total < 3_000_000


def test_sample_records_have_minimind_formats():
    for rec in read_jsonl(SAMPLE / "pretrain.jsonl"):
        segs = re.findall(r"<\|im_start\|>(.*?)<\|im_end\|>", rec["text"], flags=re.S)
        assert len(segs) >= 6 and rec["text"] == " ".join(f"{IM_START}{s}{IM_END}" for s in segs)
    for rec in read_jsonl(SAMPLE / "sft.jsonl"):
        roles = [m["role"] for m in rec["conversations"]]
        assert set(roles) <= set(ROLES) and roles[-1] == "assistant"
        body = roles[1:] if roles[0] == "system" else roles
        assert body == ["user", "assistant"] * (len(body) // 2)


def expected_answer(task: str, prompt: str) -> str:
    """Each task's answer worked out from the prompt alone (independent of the generator's code)."""
    tail = re.split(r"[:：]", prompt, maxsplit=1)[-1].strip().rstrip("?")
    nums = [int(n) for n in re.findall(r"\d+", prompt)]
    if task == "copy":
        return tail
    if task in ("reverse", "zh_reverse"):
        return " ".join(reversed(tail.split()))
    if task == "count":
        return str(len(tail.split()))
    if task == "first_last":
        return tail.split()[0 if "first" in prompt.lower() else -1]
    if task == "larger":
        return str(max(nums))
    if task in ("next", "zh_next"):
        return str(nums[0] + 1)
    if task in ("add", "zh_add"):
        return str(sum(nums))
    if task == "upper":
        return re.search(r"(?:Uppercase: |Write )([a-z]+)", prompt).group(1).upper()
    if task == "translate":
        m = re.search(r"“(.+?)”", prompt)
        return ZH_TO_EN[m.group(1)] if m else WORDS[re.search(r"(?:is|say) ([a-z]+) in Chinese", prompt).group(1)]
    raise AssertionError(f"unknown task {task}")


def test_eval_answers_are_right_and_prompts_are_held_out():
    items = load_eval()
    assert len(items) >= 150 and len({it.prompt for it in items}) == len(items)
    tasks = {it.task for it in items}
    assert len(tasks) >= 10 and any(it.task.startswith("zh_") for it in items)
    for it in items:
        assert it.answer == expected_answer(it.task, it.prompt), it
    train_prompts = set()
    for rec in read_jsonl(SAMPLE / "sft.jsonl"):
        train_prompts |= {m["content"] for m in rec["conversations"] if m["role"] == "user"}
    pretrain = "\n".join(r["text"] for r in read_jsonl(SAMPLE / "pretrain.jsonl"))
    for it in items:
        assert it.prompt not in train_prompts
        assert f"{IM_START}{it.prompt}\n" not in pretrain
    # the same tasks and templates do occur in training (held-out instances, not held-out skills)
    templates = {re.sub(r"[a-z\d]+|[\u4e00-\u9fff]", "", p) for p in train_prompts}
    assert all(re.sub(r"[a-z\d]+|[\u4e00-\u9fff]", "", it.prompt) in templates for it in items)


def test_training_answers_are_right_too():
    checked = 0
    for rec in read_jsonl(SAMPLE / "sft.jsonl")[:2000]:
        msgs = [m for m in rec["conversations"] if m["role"] != "system"]
        for q, a in zip(msgs[::2], msgs[1::2]):
            task = classify(q["content"])
            assert a["content"] == expected_answer(task, q["content"]), q
            checked += 1
    assert checked > 2000


def classify(prompt: str) -> str:
    rules = [("zh_reverse", "倒"), ("zh_add", "加"), ("zh_next", "后面"), ("zh_next", "下一个"),
             ("translate", "Chinese"), ("translate", "英"), ("copy", "Repeat"), ("copy", "again"), ("copy", "Copy"),
             ("reverse", "everse"), ("reverse", "backwards"), ("count", "ount"), ("count", "How many"),
             ("first_last", "word of"), ("first_last", "word:"), ("larger", "larger"), ("larger", "bigger"),
             ("next", "after"), ("next", "follows"), ("add", "+"), ("add", "Add"), ("upper", "pper"),
             ("upper", "capital")]
    return next(task for task, key in rules if key in prompt)


def test_evaluate_scores_exact_and_contains(tmp_path):
    path = tmp_path / "e.jsonl"
    items = [EvalItem("a", "p1", "42"), EvalItem("a", "p2", "cat dog"), EvalItem("b", "p3", "猫", "contains")]
    path.write_text("\n".join(json.dumps(it.__dict__, ensure_ascii=False) for it in items) + "\n", encoding="utf-8")
    replies = {"p1": " 42\n", "p2": "cat  dog", "p3": "答案是猫。"}
    r = evaluate(lambda p: replies[p], path)
    assert (r.n, r.n_correct, r.per_task) == (3, 2, {"a": (1, 2), "b": (1, 1)})
    assert [it.prompt for it, _ in r.failures] == ["p2"]
    assert score(lambda p: "", path) == 0.0
    oracle = {it.prompt: it.answer for it in load_eval()}
    assert score(lambda p: oracle[p]) == 1.0 and DEFAULT_EVAL_PATH.is_file()
    (tmp_path / "bad.jsonl").write_text('{"task": "a", "prompt": "p"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_eval(tmp_path / "bad.jsonl")


def test_eval_sample_command_reports_bad_input_without_a_traceback(tmp_path, capsys):
    """scripts/eval_sample.py: a wrong --model or --eval is one '[eval] error:' line and exit status 2
    (they were tracebacks), and --max_tokens 0 (every reply empty, 0%) is refused."""
    assert eval_main(["--model", str(tmp_path / "missing.pth")]) == 2
    assert "[eval] error: checkpoint" in capsys.readouterr().err
    torch.save(RWKV(ModelConfig(vocab_size=6400, n_layer=1, n_embd=32, head_size=16)).state_dict(), tmp_path / "m.pth")
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"task": "t", "prompt": "p", "answer": "a"}\n{"prompt": "no task"}\n')
    assert eval_main(["--model", str(tmp_path / "m.pth"), "--eval", str(bad)]) == 2
    assert f"[eval] error: {bad}:2: an eval record needs task, prompt, answer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        eval_main(["--model", str(tmp_path / "m.pth"), "--max_tokens", "0"])
    assert e.value.code == 2 and "--max_tokens 0: must be >= 1" in capsys.readouterr().err
    assert eval_main(["--model", str(tmp_path / "m.pth"), "--eval", str(bad.with_name("none.jsonl"))]) == 2
    assert "none.jsonl" in capsys.readouterr().err
