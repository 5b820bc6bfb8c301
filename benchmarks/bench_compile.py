"""--compile 1 on the CPU: the model's forward+backward, eager and compiled, side by side.

    python -m benchmarks.bench_compile             # L8-D512, batch 4, ctx 512, fp32 and bf16
    python -m benchmarks.bench_compile --quick     # 3 rounds instead of 6

Two models with the same weights, one built with ModelConfig(compile=1) (time/channel mixes and the
chunked WKV7 compiled), run alternately in one process, so that other load on the machine slows
both alike (bench_train's rows, one process each, moved by up to 35 % on a shared 2-core machine).
The first round compiles and is not counted; each figure is the median of the other rounds.
The optimizer is left out: it is the same for both.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.table import markdown_table
from src.model import RWKV, ModelConfig


def step_ms(model: RWKV, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> float:
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
    F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
    model.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = dict(n_layer=8, n_embd=512, head_size=64, vocab_size=6400)
    eager = RWKV(ModelConfig(**size))
    compiled = RWKV(ModelConfig(**size, compile=1), init_weights=False)
    compiled.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 6400, (4, 512), generator=g) for _ in range(2))
    rounds = 3 if args.quick else 6

    rows = []
    for precision in ("fp32", "bf16"):
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for r in range(rounds + 1):
            for name, model in (("eager", eager), ("compiled", compiled)):
                ms = step_ms(model, x, y, precision == "bf16")
                if r:
                    times[name].append(ms)
        rows.append((precision, statistics.median(times["eager"]), statistics.median(times["compiled"])))

    fp32_eager = rows[0][1]
    print(f"L8-D512 batch 4 ctx 512, model forward+backward on CPU ({torch.get_num_threads()} threads), "
          f"median of {rounds} alternating rounds")
    print(markdown_table(["precision", "eager ms", "compiled ms", "compile gain", "compiled vs fp32 eager"],
                         [(p, f"{e:.0f}", f"{c:.0f}", f"{e / c:.2f}x", f"{fp32_eager / c:.2f}x") for p, e, c in rows],
                         "lrrrr"))


if __name__ == "__main__":
    main()
