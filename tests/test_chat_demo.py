"""API_DEMO_CHAT.py: UTF-8-safe streaming, greedy decoding against the parallel model, the command line."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import API_DEMO_CHAT as chat
from src.model import ModelConfig
from src.rnn import RWKV_RNN
from src.sampling import Sampler, SamplingConfig
from src.tokenizer import DEFAULT_SYSTEM, IM_END_ID, chat_prompt, load_tokenizer
from tests.test_rnn import perturbed_model

REPO = Path(__file__).resolve().parents[1]
MINIMIND_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "minimind2_tokenizer"
TOKENIZERS = [
    pytest.param(None, id="repo-default"),
    pytest.param(MINIMIND_TOKENIZER, id="minimind2", marks=pytest.mark.skipif(
        not MINIMIND_TOKENIZER.is_dir(), reason="MiniMind2 tokenizer not in ../shared")),
]
TEXT = "Grüße! 你好，世界。😀 naïve café — ∑x² ✓\nこんにちは"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A random L2-D64 checkpoint with the tokenizers' vocab (6400) and its float64 parallel model."""
    model = perturbed_model(ModelConfig(vocab_size=6400, n_layer=2, n_embd=64, head_size=32), seed=77)
    path = tmp_path_factory.mktemp("chat") / "rwkv-tiny.pth"
    torch.save(model.state_dict(), path)
    return path, model.double()


@pytest.mark.parametrize("tok_path", TOKENIZERS)
def test_stream_never_emits_broken_utf8(tok_path):
    tok = load_tokenizer(tok_path)
    ids = tok.encode(TEXT).ids
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the text should split characters across tokens"
    stream = chat.Utf8Stream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == TEXT


def test_stream_gives_up_on_invalid_bytes_after_max_pending():
    tok = load_tokenizer(None)
    cont = tok.encode("😀").ids[-1]                   # a lone UTF-8 continuation byte: never completes
    assert tok.decode([cont]) == "\ufffd"
    stream = chat.Utf8Stream(tok, max_pending=4)
    assert [stream.push(cont) for _ in range(4)] == ["", "", "", "\ufffd" * 4]
    assert stream.flush() == ""


def make_session(path: Path, temperature: float = 0.0, seed: int = 0, max_tokens: int = 12,
                 dtype: torch.dtype = torch.float32) -> chat.ChatSession:
    model = RWKV_RNN(path, dtype=dtype)
    cfg = SamplingConfig(temperature=temperature, presence_penalty=0.0, frequency_penalty=0.0)
    return chat.ChatSession(model, load_tokenizer(None), Sampler(model.vocab_size, cfg, seed=seed),
                            DEFAULT_SYSTEM, max_tokens)


def test_greedy_reply_is_argmax_of_parallel_model_step_by_step(tiny):
    path, model64 = tiny
    session = make_session(path)
    tok = session.tokenizer
    context: list[int] = []
    for turn, message in enumerate(["Hello there", "和我说说 RWKV"]):
        text = "".join(session.reply(message))
        seq, sampled = session.fed, session.sampled
        generated = sampled[:-1] if sampled[-1] == IM_END_ID else sampled
        assert seq[len(seq) - len(generated):] == generated
        start = len(seq) - len(generated)             # position of the first generated token
        with torch.no_grad():
            ref = model64(torch.tensor([seq]))[0]     # (T,V) float64
        ref[:, 0] = float("-inf")                     # token 0 is banned
        expected = ref[start - 1:start - 1 + len(sampled)].argmax(-1).tolist()
        assert sampled == expected, f"turn {turn}: greedy tokens differ from the parallel model's argmax"
        assert text == session.tokenizer.decode(generated, skip_special_tokens=False)
        # the template: system + user turn first; later turns close the previous reply with <|im_end|>
        context += ([IM_END_ID] if turn else []) + tok.encode(chat_prompt(message, DEFAULT_SYSTEM, turn == 0)).ids
        assert seq[:start] == context
        context += generated
    again = make_session(path)
    assert ["".join(again.reply(m)) for m in ["Hello there", "和我说说 RWKV"]] != []
    assert again.fed == session.fed


def test_readme_inference_snippet(tiny, tmp_path):
    """README's "Inference from Python" block, run as written on a tiny checkpoint (its path swapped in, with a
    tokenizer.json beside it as training leaves one): it prints the greedy reply of the parallel model."""
    import re
    import shutil

    from src.tokenizer import tokenizer_file

    path, model64 = tiny
    block = re.search(r"Inference from Python.*?```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    assert 'path = "out/L8-D512-x070-sft2048/rwkv-final.pth"' in block
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(path, run_dir / "rwkv-final.pth")
    shutil.copy(tokenizer_file(None), run_dir / "tokenizer.json")
    code = block.replace("out/L8-D512-x070-sft2048/rwkv-final.pth", str(run_dir / "rwkv-final.pth"))
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    tok = load_tokenizer(None)
    seq = tok.encode(chat_prompt("Hi, who are you?")).ids
    reply: list[int] = []
    with torch.no_grad():
        while len(reply) < 100:
            token = int(model64(torch.tensor([seq + reply]))[0, -1].argmax())
            if token == IM_END_ID:
                break
            reply.append(token)
    assert r.stdout == tok.decode(reply) + "\n"


def test_greedy_reply_with_penalties_counts_every_token_of_the_reply(tiny):
    """Penalties grow over one reply (SPEC 5: counts decay by 0.996 per token, then the new token counts
    1): each greedy token is the argmax of the parallel model's logits minus presence + frequency *
    count of the reply's earlier tokens."""
    path, model64 = tiny
    model = RWKV_RNN(path)
    cfg = SamplingConfig(temperature=0.0, presence_penalty=1.5, frequency_penalty=2.0, penalty_decay=0.9)
    session = chat.ChatSession(model, load_tokenizer(None), Sampler(model.vocab_size, cfg, seed=0),
                               DEFAULT_SYSTEM, 16)
    "".join(session.reply("Hello there"))
    seq, sampled = session.fed, session.sampled
    assert len(sampled) >= 3
    start = len(seq) - len([t for t in sampled if t != IM_END_ID])
    with torch.no_grad():
        ref = model64(torch.tensor([seq]))[0]                         # (T,V) float64
    counts: dict[int, float] = {}
    for i, token in enumerate(sampled):
        logits = ref[start - 1 + i].clone()
        for t, c in counts.items():
            logits[t] -= 1.5 + 2.0 * c
        logits[0] = float("-inf")
        assert token == int(logits.argmax()), f"reply token {i}"
        counts = {t: c * 0.9 for t, c in counts.items()}
        counts[token] = counts.get(token, 0.0) + 1.0


def test_seeded_sampling_is_reproducible_and_reset_restarts(tiny):
    path, _ = tiny
    a, b = make_session(path, temperature=1.0, seed=5), make_session(path, temperature=1.0, seed=5)
    ra, rb = "".join(a.reply("hi")), "".join(b.reply("hi"))
    assert ra == rb and a.fed == b.fed
    first_fed = list(a.fed)
    a.reset()
    a.sampler = Sampler(a.model.vocab_size, a.sampler.config, seed=5)
    assert "".join(a.reply("hi")) == ra and a.fed == first_fed


def test_failed_message_leaves_the_conversation_unchanged(tiny, capsys):
    path, _ = tiny
    session = make_session(path)
    assert chat.answer(session, "first")
    state, fed = [s.clone() for s in session.state], list(session.fed)
    assert not chat.answer(session, "   ")
    assert "empty message" in capsys.readouterr().err

    real_forward = session.model.forward

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    session.model.forward = oom
    assert not chat.answer(session, "a very long message")
    assert "out of memory" in capsys.readouterr().err
    assert session.fed == fed and all(torch.equal(a, b) for a, b in zip(session.state, state))
    session.model.forward = real_forward
    assert chat.answer(session, "second")
    assert len(session.fed) > len(fed)


def run_demo(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "API_DEMO_CHAT.py"), *args], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=300)


def session_like_cli(path: Path, tok_path: Path | None, cfg: SamplingConfig, seed: int | None,
                     max_tokens: int) -> chat.ChatSession:
    return chat.ChatSession(RWKV_RNN(path), load_tokenizer(tok_path), Sampler(6400, cfg, seed=seed),
                            DEFAULT_SYSTEM, max_tokens)


@pytest.mark.slow
@pytest.mark.parametrize("tok_path", TOKENIZERS)
def test_demo_answers_one_prompt_end_to_end(tiny, tok_path):
    """The script's stdout is exactly the reply an in-process session with the same settings gives."""
    path, _ = tiny
    tok_args = [] if tok_path is None else ["--tokenizer", str(tok_path)]
    message = "你好! Who are you?"
    r = run_demo("--model", str(path), *tok_args, "--prompt", message, "--max_tokens", "16",
                 "--seed", "3", "--top_p", "0.9", "--top_k", "50")
    assert r.returncode == 0, r.stderr
    assert "L2-D64" in r.stderr
    session = session_like_cli(path, tok_path, SamplingConfig(top_p=0.9, top_k=50), 3, 16)
    reply = "".join(session.reply(message))
    assert reply.strip() and len(session.sampled) >= 1
    assert r.stdout == reply + "\n"


def test_main_greedy_prompt_prints_the_greedy_reply(tiny, capsys):
    path, _ = tiny
    assert chat.main(["--model", str(path), "--prompt", "hello", "--temperature", "0", "--max_tokens", "10"]) == 0
    out = capsys.readouterr().out
    session = session_like_cli(path, None, SamplingConfig(temperature=0), None, 10)
    assert out == "".join(session.reply("hello")) + "\n"


def test_main_takes_the_tokenizer_training_put_beside_the_model(tiny, tmp_path, capsys):
    """No --tokenizer: the tokenizer.json beside --model (train.py copies make_data's there) encodes and decodes;
    --tokenizer still wins. Here that file has two ids of the prompt's first token swapped: other token ids."""
    import json
    import shutil

    from src.tokenizer import tokenizer_file

    path, _ = tiny
    vocab = json.loads(tokenizer_file(None).read_text(encoding="utf-8"))
    ids = vocab["model"]["vocab"]
    first = load_tokenizer(None).id_to_token(load_tokenizer(None).encode("hello").ids[0])
    other = next(t for t, i in ids.items() if i == 500)
    ids[first], ids[other] = ids[other], ids[first]
    model = tmp_path / "rwkv-final.pth"
    shutil.copy(path, model)
    (tmp_path / "tokenizer.json").write_text(json.dumps(vocab), encoding="utf-8")
    beside = load_tokenizer(tmp_path / "tokenizer.json")
    assert beside.encode("hello").ids != load_tokenizer(None).encode("hello").ids

    args = ["--model", str(model), "--prompt", "hello", "--temperature", "0", "--max_tokens", "10"]
    assert chat.main(args) == 0
    out, err = capsys.readouterr()
    session = chat.ChatSession(RWKV_RNN(model), beside, Sampler(6400, SamplingConfig(temperature=0)), DEFAULT_SYSTEM, 10)
    assert out == "".join(session.reply("hello")) + "\n"
    assert f"tokenizer {tmp_path / 'tokenizer.json'}" in err
    assert chat.main([*args, "--tokenizer", str(tokenizer_file(None))]) == 0
    assert f"tokenizer {tokenizer_file(None)}" in capsys.readouterr().err


def test_cli_session_bans_endoftext_and_ids_the_tokenizer_lacks(tmp_path):
    """SPEC 5: token 0 is banned; a model vocab padded past the tokenizer's 6400 bans the ids it cannot
    decode too. Here the logits are the same for every input (ln_out.weight = 0) and put token 0 first
    and a padded id second by far, so a session that allowed either would sample it at once."""
    model = perturbed_model(ModelConfig(vocab_size=6464, n_layer=1, n_embd=32, head_size=16), seed=5)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        b = torch.randn(32, generator=g)
        model.ln_out.weight.zero_()
        model.ln_out.bias.copy_(b)
        model.head.weight.copy_(torch.randn(6464, 32, generator=g) * 0.01)
        model.head.weight[0] = 60 * b / b.dot(b)                       # logit 60
        model.head.weight[6450] = 50 * b / b.dot(b)                    # logit 50, past the tokenizer
    torch.save(model.state_dict(), tmp_path / "padded.pth")
    for temperature in ("0", "1"):
        session = chat.build_session(chat.parse_args(["--model", str(tmp_path / "padded.pth"), "--temperature",
                                                      temperature, "--max_tokens", "6", "--seed", "1"]))
        logits = session.model.forward([1, 2, 3])[0]
        assert int(logits.argmax()) == 0 and int(logits[1:].argmax()) == 6449    # the setup works
        "".join(session.reply("hi"))
        assert session.sampled and all(0 < t < 6400 for t in session.sampled), session.sampled


@pytest.mark.slow
def test_demo_interactive_reset_empty_message_and_eof(tiny):
    path, _ = tiny
    r = run_demo("--model", str(path), "--temperature", "0", "--max_tokens", "8",
                 stdin="hello\n\n+reset\nhello\n")
    assert r.returncode == 0, r.stderr
    assert "empty message" in r.stderr and "conversation cleared" in r.stderr
    replies = [part.split("\nUser: ")[0] for part in r.stdout.split("Assistant: ")[1:]]
    assert len(replies) == 2 and replies[0] == replies[1] and replies[0].strip()


def test_demo_rejects_bad_setups_clearly(tiny, tmp_path, capsys):
    path, _ = tiny

    def main_err(*args: str) -> tuple[int, str]:
        rc = chat.main(list(args))
        return rc, capsys.readouterr().err

    rc, err = main_err("--model", str(tmp_path / "missing.pth"), "--prompt", "hi")
    assert rc == 2 and "missing.pth" in err and "not found" in err
    small = perturbed_model(ModelConfig(vocab_size=300, n_layer=1, n_embd=32, head_size=16), seed=1)
    torch.save(small.state_dict(), tmp_path / "small.pth")
    rc, err = main_err("--model", str(tmp_path / "small.pth"), "--prompt", "hi")
    assert rc == 2 and "tokenizer has 6400 tokens but the model" in err
    rc, err = main_err("--model", str(path), "--prompt", "  ")
    assert rc == 2 and "--prompt is empty" in err and "Ctrl-D" not in err   # no interactive advice here
    rc, err = main_err("--model", str(path), "--prompt", "hi", "--top_p", "0")
    assert rc == 2 and "top_p" in err
    rc, err = main_err("--model", str(path), "--prompt", "hi", "--tokenizer", str(tmp_path))
    assert rc == 2 and "tokenizer file" in err
    rc, err = main_err("--model", str(path), "--prompt", "hi", "--device", "tpu")
    assert rc == 2 and "--device 'tpu' is not a device name: use cpu, cuda or cuda:N" in err
    if not torch.cuda.is_available():
        rc, err = main_err("--model", str(path), "--prompt", "hi", "--device", "cuda")
        assert rc == 2 and "--device cpu" in err


@pytest.mark.slow
def test_demo_exits_cleanly_on_ctrl_c(tiny):
    path, _ = tiny
    proc = subprocess.Popen([sys.executable, str(REPO / "API_DEMO_CHAT.py"), "--model", str(path)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:                       # wait until it waits for input
            if "Ctrl-D or Ctrl-C quits" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "Traceback" not in err


def test_reply_cut_at_max_tokens_is_fed_whole_and_closed_before_the_next_turn(tiny):
    """A reply that reaches max_tokens without <|im_end|> holds exactly max_tokens tokens, every one fed to
    the state; the next message first closes it with <|im_end|> (as the SFT template ends a reply), then
    its user turn. Greedy tokens are the float64 parallel model's argmax over everything fed before them."""
    path, model64 = tiny
    model = RWKV_RNN(path)
    tok = load_tokenizer(None)
    cfg = SamplingConfig(temperature=0.0, presence_penalty=0.0, frequency_penalty=0.0, banned=(0, IM_END_ID))
    session = chat.ChatSession(model, tok, Sampler(model.vocab_size, cfg, seed=0), DEFAULT_SYSTEM, 7)
    first = "".join(session.reply("Hello there"))
    prompt1 = tok.encode(chat_prompt("Hello there", DEFAULT_SYSTEM, True)).ids
    reply1 = list(session.sampled)
    assert len(reply1) == 7 and session.fed == prompt1 + reply1
    assert first == tok.decode(reply1, skip_special_tokens=False)
    "".join(session.reply("And then?"))
    prompt2 = tok.encode(chat_prompt("And then?", DEFAULT_SYSTEM, False)).ids
    start = len(prompt1) + 7 + 1 + len(prompt2)
    assert session.fed[:start] == prompt1 + reply1 + [IM_END_ID] + prompt2
    assert len(session.sampled) == 7 and session.fed[start:] == session.sampled
    with torch.no_grad():
        ref = model64(torch.tensor([session.fed]))[0]     # (T,V) float64
    ref[:, [0, IM_END_ID]] = float("-inf")
    assert reply1 == ref[len(prompt1) - 1:len(prompt1) + 6].argmax(-1).tolist()
    assert session.sampled == ref[start - 1:start + 6].argmax(-1).tolist()
