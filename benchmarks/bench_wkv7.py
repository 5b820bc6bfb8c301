"""WKV7 speed: forward and forward+backward of each implementation, printed as one table.

    python -m benchmarks.bench_wkv7                 # CPU, plus the GPU when there is one
    python -m benchmarks.bench_wkv7 --device cuda   # GPU only (kernel vs chunked PyTorch)
    python -m benchmarks.bench_wkv7 --quick         # fewer repeats, no large CPU shape
    python -m benchmarks.bench_wkv7 --threads 1     # pin torch's CPU threads (busy machines)

CPU: the per-step reference (src/wkv7/reference.py) against the chunked PyTorch path
(src/wkv7/torch_impl.py), side by side in one run, with their ratio (issue target: >= 10x at
B=1 T=512 H=8 N=64 fp32, forward+backward).
GPU: the backstepping kernel (src/wkv7/kernel.py) at B=8 T=4096 H=64 N=64 bf16 (target on an
H100: <= 17 ms forward+backward) and at the model's shapes B=16/32/64 T=512 H=8 N=64, beside the
chunked PyTorch path on the same GPU. GPU times come from CUDA events after warm-up (the first call
also builds the kernel); every figure is the median of the repeats.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.table import markdown_table
from src.wkv7.reference import wkv7_sequential
from src.wkv7.torch_impl import wkv7_chunked

D_MIN = math.exp(-math.exp(-0.5))
GPU_TARGET_MS = 17.0  # the published backstepping kernel on an H100, B=8 T=4096 H=64 N=64 bf16


@dataclass
class Row:
    device: str
    shape: str
    dtype: str
    impl: str
    fwd_ms: float
    fwdbwd_ms: float
    note: str = ""


def make_inputs(B: int, T: int, H: int, N: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """Model-like inputs (decays in [0.545, 1), a = -kk, b = kk * rate), made on `device`,
    leaves with grad."""
    g = torch.Generator(device=device).manual_seed(0)
    shape = (B, T, H, N)

    def rand(fn: Callable, scale: float = 1.0) -> torch.Tensor:
        return fn(shape, generator=g, device=device) * scale

    d = D_MIN + (1 - D_MIN - 1e-4) * rand(torch.rand)
    kk = F.normalize(rand(torch.randn), dim=-1)
    ins = [rand(torch.randn), torch.log(-torch.log(d)), rand(torch.randn, 0.5), rand(torch.randn), -kk,
           kk * rand(torch.rand)]
    return [t.to(dtype).requires_grad_() for t in ins]


def timed(fn: Callable[[], None], device: str, warmup: int, reps: int) -> float:
    """Median milliseconds of fn() over `reps` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench(impl: Callable, ins: list[torch.Tensor], device: str, warmup: int, reps: int) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of impl(r, w, k, v, a, b) -> (y, state)."""
    dy = torch.randn_like(ins[0])

    def fwd() -> None:
        with torch.no_grad():
            impl(*ins)

    def fwdbwd() -> None:
        y, _ = impl(*ins)
        torch.autograd.backward(y, dy)

    return timed(fwd, device, warmup, reps), timed(fwdbwd, device, warmup, reps)


def run_cpu(quick: bool) -> list[Row]:
    rows = []
    cases = [((1, 512, 8, 64), torch.float32), ((1, 512, 8, 64), torch.bfloat16)]
    if not quick:
        cases.append(((4, 1024, 8, 64), torch.float32))
    reps = 2 if quick else 5
    for shape, dtype in cases:
        ins = make_inputs(*shape, dtype, "cpu")
        seq = bench(wkv7_sequential, ins, "cpu", 1, max(1, reps // 2))
        chk = bench(wkv7_chunked, ins, "cpu", 1, reps)
        name = "x".join(map(str, shape))
        dt = str(dtype).removeprefix("torch.")
        rows.append(Row("cpu", name, dt, "sequential reference", *seq))
        rows.append(Row("cpu", name, dt, "chunked torch", *chk, f"{seq[1] / chk[1]:.1f}x faster (fwd+bwd)"))
    return rows


def run_cuda(quick: bool) -> list[Row]:
    from src.wkv7.kernel import load_kernel, wkv7_kernel

    t0 = time.perf_counter()
    load_kernel(64)
    build_s = time.perf_counter() - t0
    print(f"kernel build/load for N=64: {build_s:.1f} s")
    rows = []
    reps = 5 if quick else 20
    cases = [(8, 4096, 64, 64), (16, 512, 8, 64), (32, 512, 8, 64), (64, 512, 8, 64)]
    for shape in cases:
        ins = make_inputs(*shape, torch.bfloat16, "cuda")
        name = "x".join(map(str, shape))
        ker = bench(wkv7_kernel, ins, "cuda", 3, reps)
        note = ""
        if shape == cases[0]:
            note = f"target <= {GPU_TARGET_MS:.0f} ms (H100): {'met' if ker[1] <= GPU_TARGET_MS else 'MISSED'}"
        toks = shape[0] * shape[1] / (ker[1] / 1e3)
        rows.append(Row("cuda", name, "bfloat16", "backstepping kernel", *ker,
                        (note + "; " if note else "") + f"{toks / 1e6:.1f} M tok/s (fwd+bwd, all heads)"))
        try:
            chk = bench(wkv7_chunked, ins, "cuda", 2, max(3, reps // 4))
            rows.append(Row("cuda", name, "bfloat16", "chunked torch", *chk, f"kernel {chk[1] / ker[1]:.1f}x faster"))
        except torch.cuda.OutOfMemoryError:
            rows.append(Row("cuda", name, "bfloat16", "chunked torch", math.nan, math.nan, "out of GPU memory"))
        del ins
        torch.cuda.empty_cache()
    return rows


def print_table(rows: list[Row]) -> None:
    print(markdown_table(["device", "B x T x H x N", "dtype", "impl", "fwd ms", "fwd+bwd ms", "note"],
                         [(r.device, r.shape, r.dtype, r.impl, f"{r.fwd_ms:.2f}", f"{r.fwdbwd_ms:.2f}", r.note)
                          for r in rows], "llllrrl"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: the CPU table, plus the GPU one when CUDA/ROCm is available")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and no large CPU shape")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for torch (0: torch's default); on a busy machine 1 avoids the "
                         "large slow-downs of oversubscribed intra-op threads")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA/ROCm device is visible to torch")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    rows = []
    if args.device in ("auto", "cpu"):
        rows += run_cpu(args.quick)
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        rows += run_cuda(args.quick)
    print_table(rows)


if __name__ == "__main__":
    main()
