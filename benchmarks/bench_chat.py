"""Chat speed: decode and prefill tokens/s of src.rnn.RWKV_RNN, beside the rwkv pip package, one table.

    python -m benchmarks.bench_chat              # CPU fp32 (+ the pip package), plus GPU fp16/bf16 when present
    python -m benchmarks.bench_chat --quick      # fewer tokens and repeats
    python -m benchmarks.bench_chat --threads 1  # torch.set_num_threads before measuring

Model: the default L8-D512 V6400 (SPEC init plus random noise on every parameter, so that no matrix
is zero), written once to benchmarks/_work/rwkv-bench-L8-D512.pth and read by both implementations.
Decode = one token per forward call carrying the state (the chat's inner loop, sampling excluded);
prefill = one call on a prompt of --prompt_len tokens from a zero state. Each figure is the best of
--repeats rounds, the rounds of ours and the package's interleaved so that machine load hits both.
Issue targets (CPU fp32): our decode >= the package's decode; our prefill >= 10x our decode per token.
The package (RWKV_V7_ON=1, strategy "cpu fp32"/"cuda fp16") is optional: pip install rwkv.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.table import markdown_table
from src.model import RWKV, ModelConfig
from src.rnn import RWKV_RNN

WORK = Path(__file__).resolve().parent / "_work"
CKPT = WORK / "rwkv-bench-L8-D512.pth"


@dataclass
class Row:
    device: str
    dtype: str
    impl: str
    decode: float      # tokens/s
    prefill: float     # tokens/s
    max_diff: float    # max |logits - ours| on the prefill prompt (0 for ours)


def make_checkpoint(path: Path) -> None:
    """Default-size model, SPEC init + noise, saved atomically (temp file + os.replace)."""
    torch.manual_seed(0)
    model = RWKV(ModelConfig())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_rate(model: Any, device: str, n: int) -> Callable[[], float]:
    """A round: n single-token calls after a short prompt; returns tokens/s."""
    _, state0 = model.forward([1, 2, 3, 4], None)

    def round_() -> float:
        state = state0
        sync(device)
        t = time.perf_counter()
        for i in range(n):
            _, state = model.forward(10 + i, state)
        sync(device)
        return n / (time.perf_counter() - t)
    return round_


def prefill_rate(model: Any, device: str, prompt: list[int]) -> Callable[[], float]:
    def round_() -> float:
        sync(device)
        t = time.perf_counter()
        model.forward(list(prompt), None)
        sync(device)
        return len(prompt) / (time.perf_counter() - t)
    return round_


def best_interleaved(rounds: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    best = {k: 0.0 for k in rounds}
    for _ in range(repeats):
        for k, fn in rounds.items():
            best[k] = max(best[k], fn())
    return best


def load_pip_package() -> Any | None:
    """The rwkv pip package's RWKV class in x070 mode, or None when it is not installed."""
    if importlib.util.find_spec("rwkv") is None:
        print("[bench_chat] the rwkv pip package is not installed: `pip install rwkv` to compare")
        return None
    # The package reads these once, at import: x070 model, no CUDA extension build, TorchScript on.
    os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    from rwkv.model import RWKV as PipRWKV
    return PipRWKV


def bench_device(device: str, dtype: torch.dtype, pip_cls: Any | None, pip_strategy: str | None,
                 args: argparse.Namespace) -> list[Row]:
    prompt = torch.randint(3, 6400, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = RWKV_RNN(CKPT, device=device, dtype=dtype)
    models = {"ours": ours}
    if pip_cls is not None and pip_strategy is not None:
        models["rwkv pip"] = pip_cls(str(CKPT)[:-len(".pth")], strategy=pip_strategy)
    # the package's CPU prefill is a per-token Python loop inside forward: time it on fewer tokens
    pip_prompt = prompt[:args.pip_prompt_len]
    ref, _ = ours.forward(pip_prompt, None)
    diffs = {name: (m.forward(list(pip_prompt), None)[0].float() - ref.float()).abs().max().item()
             for name, m in models.items()}
    dec = best_interleaved({k: decode_rate(m, device, args.decode_tokens) for k, m in models.items()},
                           args.repeats)
    pre = best_interleaved({k: prefill_rate(m, device, prompt if k == "ours" else pip_prompt)
                            for k, m in models.items()}, args.repeats)
    name = str(dtype).replace("torch.", "")
    return [Row(device, name, k, dec[k], pre[k], diffs[k]) for k in models]


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    print(f"\nL8-D512 V6400, threads={torch.get_num_threads()}, prompt {args.prompt_len} tokens "
          f"(rwkv pip: {args.pip_prompt_len}), decode {args.decode_tokens} tokens, best of {args.repeats}")
    print(markdown_table(["device", "dtype", "impl", "decode tok/s", "prefill tok/s", "prefill/decode", "max|dlogit|"],
                         [(r.device, r.dtype, r.impl, f"{r.decode:.1f}", f"{r.prefill:.1f}",
                           f"{r.prefill / r.decode:.1f}x", f"{r.max_diff:.2e}") for r in rows], "lllrrrr"))
    for dev_dtype in {(r.device, r.dtype) for r in rows}:
        ours = next(r for r in rows if (r.device, r.dtype) == dev_dtype and r.impl == "ours")
        for other in (r for r in rows if (r.device, r.dtype) == dev_dtype and r.impl != "ours"):
            print(f"{dev_dtype[0]} {dev_dtype[1]}: ours / {other.impl}: decode {ours.decode / other.decode:.2f}x "
                  f"(target >= 1), prefill {ours.prefill / other.prefill:.2f}x")
        print(f"{dev_dtype[0]} {dev_dtype[1]}: our prefill / our decode per token: "
              f"{ours.prefill / ours.decode:.1f}x (target >= 10)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    p.add_argument("--prompt_len", type=int, default=512)
    p.add_argument("--pip_prompt_len", type=int, default=64)
    p.add_argument("--decode_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no_pip", action="store_true", help="skip the rwkv pip package")
    p.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    args = p.parse_args()
    if args.quick:
        args.prompt_len, args.pip_prompt_len, args.decode_tokens, args.repeats = 256, 32, 32, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if not CKPT.is_file():
        print(f"[bench_chat] writing {CKPT}")
        make_checkpoint(CKPT)
    pip_cls = None if args.no_pip else load_pip_package()

    rows: list[Row] = []
    if args.device in ("all", "cpu"):
        rows += bench_device("cpu", torch.float32, pip_cls, "cpu fp32", args)
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        rows += bench_device("cuda", torch.float16, pip_cls, "cuda fp16", args)
        rows += bench_device("cuda", torch.bfloat16, pip_cls, "cuda bf16", args)
    print_table(rows, args)


if __name__ == "__main__":
    main()
