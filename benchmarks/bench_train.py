"""Training speed and memory: tokens/s and peak memory of train.py's training steps, one table.

    python -m benchmarks.bench_train                  # CPU (fp32, bf16; eager and --compile 1), plus the GPU
    python -m benchmarks.bench_train --device cuda    # GPU only: bf16 ZeRO-2, bucket 200, one-GPU auto, compile
    python -m benchmarks.bench_train --quick          # fewer steps

A second table gives the fixed cost of a step (a model of L8's shape with almost no arithmetic, in a
bare PyTorch loop and through train.py's Trainer): on a GPU, what bounds the step time of a small
model whatever the batch. A third times one optimizer step (AdamW per-tensor loop, foreach, fused).

Model: the default L8-D512 V6400 at ctx 512 (SPEC init), trained the way train.py trains it: the
Trainer from train.build_trainer (precision plugin, strategy, gradient clipping) and the
TrainingMonitor (per-step LR, loss reduce across ranks, progress numbers), on random tokens held in
memory so that reading data costs nothing. Every configuration runs in its own process (a fresh peak
memory, one DeepSpeed engine per process). Step time = median wall time between consecutive batch
ends after the warm-up steps (the first steps build the kernel and DeepSpeed's buffers, and with
--compile 1 compile the time/channel mixes); tokens/s =
micro_bsz * ctx_len / step time (one device). Peak memory: CUDA max allocated on the GPU, the peak
resident size of the process on the CPU.
Target (issue 4): >= 350k tokens/s on one H100 (bf16, DeepSpeed ZeRO-2), twice the ~175k tokens/s
published for one MI300X. GPU rows use the published DS_BUCKET_MB=2 unless the row says otherwise.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.table import markdown_table

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "_work" / "bench_train"
TARGET_H100 = 350_000


def configs(device: str, quick: bool) -> list[dict[str, Any]]:
    cpu_steps = (1, 1) if quick else (1, 4)      # (warm-up, measured): a CPU step takes seconds
    gpu_steps = (3, 10) if quick else (5, 20)
    out = []
    if device in ("cpu", "all"):
        out += [dict(accelerator="cpu", precision=p, strategy="auto", micro_bsz=4, ds_bucket_mb=2, compile=c,
                     warmup=cpu_steps[0], steps=cpu_steps[1]) for p in ("fp32", "bf16") for c in (0, 1)]
    if device in ("cuda", "all"):
        import torch
        if torch.cuda.is_available():
            ds = "deepspeed_stage_2" if importlib.util.find_spec("deepspeed") else "auto"
            gpu = dict(accelerator="gpu", precision="bf16", warmup=gpu_steps[0], steps=gpu_steps[1])
            # (strategy, bucket MB, micro_bsz, compile). A step that costs the same from micro batch 16 to 64
            # is bound by per-step overhead: micro batch 128 (divides the 40320-sample mini-epoch, ~31 GiB)
            # spreads it over twice the tokens. --quick (gpu_check.sh: ~4 min) keeps the rows that decide
            # the target.
            rows = [(ds, 2, 64, 0), (ds, 200, 64, 0), (ds, 200, 128, 0),
                    ("auto", 2, 64, 0), ("auto", 2, 128, 0), ("auto", 2, 64, 1)]
            if not quick:
                rows += [(ds, 2, 16, 0), (ds, 2, 32, 0), (ds, 200, 64, 1)]
            out += [dict(gpu, strategy=s, ds_bucket_mb=mb, micro_bsz=b, compile=c) for s, mb, b, c in rows]
        elif device == "cuda":
            print("no CUDA/ROCm device: nothing to measure with --device cuda")
    return out


def device_label(gpu: bool) -> str:
    """The card's name, or the CPU with torch's thread count: the first column of every table."""
    import torch
    return torch.cuda.get_device_name() if gpu else f"cpu x{torch.get_num_threads()}"


def median_step(ends: list[float], warmup: int) -> float:
    """Median seconds between consecutive batch ends after the `warmup` steps."""
    return statistics.median(b - a for a, b in zip(ends[warmup - 1:], ends[warmup:]))


def fixed_cost_configs(device: str, quick: bool) -> list[dict[str, Any]]:
    """The per-step cost that does not grow with the batch: a model of L8's shape with almost no
    arithmetic (n_embd 64, ctx 16, micro batch 1), stepped by a bare PyTorch loop and by train.py's Trainer.
    The GPU rows (a minute with their process starts) are left out of --quick."""
    tiny = dict(tiny=True, micro_bsz=1, ds_bucket_mb=2, compile=0, warmup=5, steps=30)
    out = []
    if device in ("cpu", "all"):
        out += [dict(tiny, accelerator="cpu", precision="fp32", strategy="auto", bare=b) for b in (True, False)]
    if device in ("cuda", "all") and not quick:
        import torch
        if torch.cuda.is_available():
            gpu = dict(tiny, accelerator="gpu", precision="bf16")
            out += [dict(gpu, strategy="auto", bare=b) for b in (True, False)]
            if importlib.util.find_spec("deepspeed"):
                out.append(dict(gpu, strategy="deepspeed_stage_2", bare=False))
    return out


def run_bare(model: Any, tokens: Any, cfg: dict[str, Any], grad_clip: float) -> list[float]:
    """Step `model` over `tokens` without Lightning (forward, backward, clip, AdamW); batch end times."""
    import torch

    device = torch.device("cuda" if cfg["accelerator"] == "gpu" else "cpu")
    model = model.to(device)
    opt = model.configure_optimizers()
    b, ends = cfg["micro_bsz"], []
    for i in range(cfg["warmup"] + cfg["steps"]):
        batch = tokens[i * b:(i + 1) * b].to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg["precision"] == "bf16"):
            loss = model.training_step((batch[:, :-1], batch[:, 1:]), i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
    return ends


def run_one(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train warmup + steps steps of L8-D512 (or the fixed-cost model) under cfg in this process;
    returns the measured row."""
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import train
    from src.trainer import RunPlan, Schedule, TrainingMonitor

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_start(self, trainer, pl_module) -> None:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    ctx = 16 if cfg.get("tiny") else 512
    if cfg.get("tiny") and cfg["accelerator"] == "cpu":
        torch.set_num_threads(1)   # ops this small only wait on a thread pool (20x slower on a busy machine)
    proj = WORK / f"{cfg['accelerator']}-{cfg['precision']}-{cfg['strategy']}-b{cfg['micro_bsz']}"
    args = train.parse_args(["--accelerator", cfg["accelerator"], "--precision", cfg["precision"],
                             "--strategy", cfg["strategy"], "--micro_bsz", str(cfg["micro_bsz"]),
                             "--ds_bucket_mb", str(cfg["ds_bucket_mb"]), "--compile", str(cfg["compile"]),
                             "--ctx_len", str(ctx), *(["--n_embd", "64"] if cfg.get("tiny") else []),
                             "--proj_dir", str(proj), "--enable_progress_bar", "False"])
    train.check_machine(args)
    n_steps = cfg["warmup"] + cfg["steps"]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (n_steps * args.micro_bsz, ctx + 1), generator=gen)
    data = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=args.micro_bsz)
    model = train.build_model(args)
    if cfg.get("bare"):
        step_s = median_step(run_bare(model, tokens, cfg, args.grad_clip), cfg["warmup"])
        return {**cfg, "device": device_label(cfg["accelerator"] == "gpu"), "step_ms": step_s * 1e3}
    # No mini-epoch ends within the run: no checkpoints, no files beyond the log header.
    plan = RunPlan(proj_dir=proj, ctx_len=ctx, real_bsz=args.micro_bsz, world_size=1, epoch_steps=10 ** 9,
                   start_step=0, total_steps=10 ** 9, epoch_save=0)
    schedule = Schedule(args.lr_init, args.lr_final, args.warmup_steps, plan.tokens_per_step, 10 ** 12)
    timer = StepTimer()
    trainer = train.build_trainer(args, n_steps, [TrainingMonitor(plan, schedule, header=["bench_train"]), timer])
    trainer.fit(model, train_dataloaders=data)
    step_s = median_step(timer.ends, cfg["warmup"])
    gpu = cfg["accelerator"] == "gpu"
    peak = (torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {**cfg, "device": device_label(gpu), "step_ms": step_s * 1e3, "tok_s": args.micro_bsz * ctx / step_s,
            "peak_gib": peak / 2 ** 30}


def optimizer_rows(device: str, repeats: int = 7) -> list[tuple[str, ...]]:
    """One AdamW step over L8-D512's parameters (SPEC groups, random gradients) per implementation:
    the per-tensor loop, foreach (multi-tensor) and fused; median of `repeats` after one warm-up."""
    import torch

    import train
    args = train.parse_args(["--accelerator", "cpu", "--proj_dir", str(WORK / "optimizer")])
    model = train.build_model(args).to(device)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    times = {}
    for name, kw in (("per-tensor loop", dict(foreach=False)), ("foreach", dict(foreach=True)),
                     ("fused (train.py without DeepSpeed, not fp16)", dict(fused=True))):
        opt = torch.optim.AdamW(model.optimizer_groups(), lr=1e-6, betas=(0.9, 0.99), eps=1e-18, **kw)
        samples = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        times[name] = statistics.median(samples[1:]) * 1e3
    base = times["per-tensor loop"]
    return [(device_label(device == "cuda"), name, f"{ms:.1f}", f"{base / ms:.2f}x") for name, ms in times.items()]


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in its own process (fresh peak memory, one DeepSpeed engine each)."""
    print(f"... {cfg}", flush=True)
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_train", "--one", json.dumps(cfg)], cwd=REPO,
                       capture_output=True, text=True)
    found = [line[7:] for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode or not found:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        print(f"    FAILED: {tail}", flush=True)
        return {**cfg, "device": cfg["accelerator"], "error": tail[:90]}
    row = json.loads(found[0])
    # Each figure as it comes, so that a run cut short by a time limit still reports what it measured.
    print(f"    {row['step_ms']:.1f} ms/step" + (f", {row['tok_s']:,.0f} tokens/s, peak {row['peak_gib']:.2f} GiB"
                                                  if "tok_s" in row else ""), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration (JSON) in this process
    opts = ap.parse_args()
    import torch   # after argparse: --help stays fast
    if opts.one:
        print("RESULT " + json.dumps(run_one(json.loads(opts.one))), flush=True)
        return

    WORK.mkdir(parents=True, exist_ok=True)
    rows = [measure(cfg) for cfg in configs(opts.device, opts.quick)]
    fixed = [measure(cfg) for cfg in fixed_cost_configs(opts.device, opts.quick)]

    print("\nL8-D512 V6400 ctx 512, one device; median step after warm-up")
    base = {}   # (device, precision, strategy, bucket, micro_bsz) -> tokens/s without compile
    cells = []
    for r in rows:
        head = (r["device"][:24], r["precision"], r["strategy"],
                r["ds_bucket_mb"] if r["strategy"].startswith("deepspeed") else "-", r["compile"], r["micro_bsz"])
        if "error" in r:
            cells.append((*head, "-", "-", "-", f"FAILED: {r['error']}"))
            continue
        key = (r["device"], r["precision"], r["strategy"], r["ds_bucket_mb"], r["micro_bsz"])
        notes = []
        if r["compile"] and key in base:
            notes.append(f"{r['tok_s'] / base[key]:.2f}x eager")
        elif not r["compile"]:
            base[key] = r["tok_s"]
        if "H100" in r["device"]:
            notes.append(f"target >= {TARGET_H100 / 1e3:.0f}k: {'met' if r['tok_s'] >= TARGET_H100 else 'NOT met'}")
        cells.append((*head, f"{r['step_ms']:.1f}", f"{r['tok_s']:,.0f}", f"{r['peak_gib']:.2f}", "; ".join(notes)))
    print(markdown_table(["device", "precision", "strategy", "bucket MB", "compile", "micro_bsz", "step ms",
                          "tokens/s", "peak GiB", "note"], cells, "lllrrrrrrl"))

    print("\nFixed cost of a step: L8 at n_embd 64, ctx 16, micro batch 1 (almost no arithmetic: Python, "
          "dispatch and kernel launches), median step after warm-up")
    bare = {r["device"]: r["step_ms"] for r in fixed if r.get("bare") and "error" not in r}
    cells = []
    for r in fixed:
        loop = "bare PyTorch loop" if r["bare"] else f"train.py Trainer, {r['strategy']}"
        if "error" in r:
            cells.append((r["device"][:24], r["precision"], loop, "-", f"FAILED: {r['error']}"))
        else:
            ratio = f"{r['step_ms'] / bare[r['device']]:.2f}x" if r["device"] in bare else "-"
            cells.append((r["device"][:24], r["precision"], loop, f"{r['step_ms']:.1f}", ratio))
    print(markdown_table(["device", "precision", "loop", "step ms", "vs bare"], cells, "lllrr"))

    devices = [d for d, on in (("cpu", opts.device in ("all", "cpu")),
                               ("cuda", opts.device in ("all", "cuda") and torch.cuda.is_available())) if on]
    print("\nOne AdamW step over L8-D512's 34.2M parameters (fp32), median after a warm-up")
    print(markdown_table(["device", "AdamW", "step ms", "vs per-tensor"],
                         [row for d in devices for row in optimizer_rows(d)], "llrr"))


if __name__ == "__main__":
    main()
