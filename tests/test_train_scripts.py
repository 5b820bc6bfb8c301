"""The demo scripts chained as a user runs them: make_data -> prepare (init) -> pretrain -> SFT, on CPU.

The scripts run from another working directory with tiny sizes set through their environment
variables; the data is a slice of the bundled sample converted by data/make_data.py.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.dataset import SFTDataset
from src.model import RWKV, ModelConfig, lm_loss
from src.tokenizer import tokenizer_file
from src.trainer import read_train_log
from tests.test_train_run import one_thread  # noqa: F401  (autouse fixture)
from tests.test_train_run import wait_for_file

REPO = Path(__file__).resolve().parents[1]
SIZES = {"N_LAYER": "2", "N_EMBD": "64", "HEAD_SIZE": "32", "CTX_LEN": "64"}


def make_data(tmp: Path, source: str, lines: int) -> dict[str, str]:
    """First `lines` records of data/sample/<source>.jsonl -> binidx; returns make_data's printed flags."""
    jsonl = tmp / f"{source}.jsonl"
    with open(REPO / "data" / "sample" / f"{source}.jsonl", encoding="utf-8") as f:
        jsonl.write_text("".join(next(f) for _ in range(lines)), encoding="utf-8")
    r = subprocess.run([sys.executable, str(REPO / "data" / "make_data.py"), str(jsonl), "1", SIZES["CTX_LEN"],
                        "--out", str(tmp / source)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    flags = dict(re.findall(r"(MY_EXIT_TOKENS|MAGIC_PRIME|DATA_FILE|DATA_TYPE)=(\S+)", r.stdout))
    assert len(flags) == 4, r.stdout
    return flags


def sft_loss(weights: Path, data: str) -> float:
    """The model's masked (reply-only) loss over every distinct SFT sample of `data` (ctx 64, one batch)."""
    ds = SFTDataset(data, int(SIZES["CTX_LEN"]))
    x, y, m = (torch.stack(t) for t in zip(*(ds[i] for i in range(ds.n_samples))))
    model = RWKV(ModelConfig(vocab_size=6400, n_layer=2, n_embd=64, head_size=32))
    model.load_state_dict({k: v.float() for k, v in torch.load(weights, weights_only=True).items()})
    with torch.no_grad():
        return float(lm_loss(model.float()(x), y, m))


def run_script(name: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **SIZES, **env}
    r = subprocess.run(["bash", str(REPO / name)], cwd=cwd, env=full_env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_prepare_pretrain_sft_chain(tmp_path: Path) -> None:
    pre, sft = make_data(tmp_path, "pretrain", 100), make_data(tmp_path, "sft", 160)
    assert pre["DATA_TYPE"] == "binidx" and sft["DATA_TYPE"] == "sft"
    pt, ft = tmp_path / "out" / "pt", tmp_path / "out" / "pt-sft"

    # stage 1 with the published flags (cpu, bf16, deepspeed_stage_2): bf16 weights, no data read
    # A fixed seed: with an unseeded init the few-step SFT stage below fell only most of the time.
    run_script("demo-training-prepare.sh", tmp_path, PROJ_DIR=str(pt), DATA_FILE=str(tmp_path / "absent"),
               RANDOM_SEED="1")
    init = torch.load(pt / "rwkv-init.pth", weights_only=True)
    cfg = ModelConfig(vocab_size=6400, n_layer=2, n_embd=64, head_size=32)
    model = RWKV(cfg)
    assert {k: v.shape for k, v in init.items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert all(v.dtype == torch.bfloat16 for v in init.values())

    # pretrain: no GPU here, so the script picks cpu/auto and, on a CPU without AMX, fp32; it starts
    # from rwkv-init.pth
    no_amx = tmp_path / "cpuinfo"
    no_amx.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    common = dict(M_BSZ="8", EPOCH_STEPS="4", LR_INIT="3e-3", LR_FINAL="1e-3", RANDOM_SEED="1", CPUINFO=str(no_amx))
    r = run_script("demo-training-run.sh", tmp_path, PROJ_DIR=str(pt), **common,
                   **{k: pre[k] for k in ("DATA_FILE", "MY_EXIT_TOKENS", "MAGIC_PRIME", "DATA_TYPE")})
    assert "parameters on cpu x 1 (fp32, strategy auto)" in r.stdout
    log = (pt / "train_log.txt").read_text()
    assert f"from {pt / 'rwkv-init.pth'}" in log and "accelerator = cpu" in log and "precision = fp32" in log
    rows = read_train_log(pt / "train_log.txt")
    assert rows[-1]["tokens"] >= int(pre["MY_EXIT_TOKENS"]) > rows[-1]["tokens"] - 8 * 64
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, rows
    assert (pt / "rwkv-final.pth").is_file()

    # SFT: PRETRAIN_DIR's rwkv-final.pth is the default LOAD_MODEL; PROJ_DIR defaults to PRETRAIN_DIR-sft
    run_script("demo-training-run-sft.sh", tmp_path, PRETRAIN_DIR=str(pt), EPOCH_STEPS="2", M_BSZ="8",
               LR_INIT="1e-3", LR_FINAL="1e-3", RANDOM_SEED="1", CPUINFO=str(no_amx),
               **{k: sft[k] for k in ("DATA_FILE", "MY_EXIT_TOKENS", "MAGIC_PRIME")})
    log = (ft / "train_log.txt").read_text()
    assert f"from {pt / 'rwkv-final.pth'} (weights only: a new start" in log and "data_type = sft" in log
    assert "sft_whole_seq = 0" in log
    rows = read_train_log(ft / "train_log.txt")
    assert rows[-1]["loss"] < rows[0]["loss"], rows
    assert (ft / "rwkv-final.pth").is_file()
    # The mini-epoch means above are 2 steps each, on other samples every time: their noise (~0.3) is as
    # large as what 14 steps learn, so with RANDOM_SEED 2 instead of 1 the last one is 0.23 above the
    # first. The same samples before and after SFT show the learning whatever the seed: 0.44-0.54 lower
    # with seeds 1-4 (0 if SFT trained nothing), so 0.2 holds with a wide margin.
    before_sft, after_sft = (sft_loss(w / "rwkv-final.pth", sft["DATA_FILE"]) for w in (pt, ft))
    assert after_sft < before_sft - 0.2, (before_sft, after_sft)
    # the tokenizer make_data used went with the data into both runs' folders, where the chat takes it
    used = (tmp_path / "pretrain.tokenizer.json").read_bytes()
    assert used == tokenizer_file(None).read_bytes() == (pt / "tokenizer.json").read_bytes()
    assert (ft / "tokenizer.json").read_bytes() == used

    # rerunning the finished SFT command trains nothing more and keeps the result
    before = (ft / "rwkv-final.pth").read_bytes()
    r = run_script("demo-training-run-sft.sh", tmp_path, PRETRAIN_DIR=str(pt), EPOCH_STEPS="2", M_BSZ="8",
                   CPUINFO=str(no_amx), **{k: sft[k] for k in ("DATA_FILE", "MY_EXIT_TOKENS", "MAGIC_PRIME")})
    assert "nothing to train" in r.stdout and (ft / "rwkv-final.pth").read_bytes() == before


@pytest.mark.slow
def test_sigterm_to_the_script_stops_train_py(tmp_path: Path) -> None:
    """`timeout`, `kill PID` and schedulers signal the script's own process: train.py must get it (the script
    execs it), stop at a step end and exit 143. Before, bash died at once and train.py trained on, orphaned."""
    pre = make_data(tmp_path, "pretrain", 400)
    pt = tmp_path / "pt"
    run_script("demo-training-prepare.sh", tmp_path, PROJ_DIR=str(pt), PRECISION="fp32", STRATEGY="auto")
    env = {**os.environ, "PYTHON": sys.executable, **SIZES, "PROJ_DIR": str(pt), "M_BSZ": "8", "EPOCH_STEPS": "4",
           "PRECISION": "fp32", **{k: pre[k] for k in ("DATA_FILE", "MY_EXIT_TOKENS", "MAGIC_PRIME", "DATA_TYPE")}}
    proc = subprocess.Popen(["bash", str(REPO / "demo-training-run.sh")], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_file(pt / "rwkv-0.pth", proc)
        proc.send_signal(signal.SIGTERM)                 # the script's pid only, as `kill PID` does
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 143, out[-3000:]
        assert re.search(r"stopped by SIGTERM at step \d+; rerun the same command", out), out[-3000:]
        assert not (pt / "rwkv-final.pth").exists()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)          # whatever is left of the session (nothing, with exec)
        except ProcessLookupError:
            pass


def _clean_env() -> dict[str, str]:
    """This process's environment without the settings machine_defaults.sh fills in."""
    return {k: v for k, v in os.environ.items() if k not in ("PRECISION", "STRATEGY", "ACCELERATOR", "CPU_PRECISION")}


@pytest.mark.parametrize("env,expected", [
    ({"CPUINFO": "amx"}, "cpu bf16 auto"),
    ({"CPUINFO": "plain"}, "cpu fp32 auto"),
    ({"CPUINFO": "amx", "PRECISION": "fp32"}, "cpu fp32 auto"),
    ({"CPUINFO": "amx", "CPU_PRECISION": "fp32"}, "cpu fp32 auto"),
    ({"CPUINFO": "plain", "CPU_PRECISION": "bf16", "STRATEGY": "ddp"}, "cpu bf16 ddp"),
    ({"CPUINFO": "amx", "ACCELERATOR": "gpu"}, "gpu bf16 deepspeed_stage_2"),
    ({"CPUINFO": "plain", "ACCELERATOR": "gpu", "PRECISION": "fp16", "STRATEGY": "ddp"}, "gpu fp16 ddp"),
])
def test_machine_defaults(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    """The demo scripts' shared defaults: bf16 on CPUs with AMX bf16 units, fp32 on others; what the
    user sets wins."""
    infos = {"amx": "flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n",
             "plain": "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"}
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(infos[env["CPUINFO"]])
    r = subprocess.run(["bash", "-c", 'source scripts/machine_defaults.sh && echo "$ACCELERATOR $PRECISION $STRATEGY"'],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**_clean_env(), "PYTHON": sys.executable, "ACCELERATOR": "cpu", **env, "CPUINFO": str(cpuinfo)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == expected.split()


def test_machine_defaults_rejects_an_unknown_cpu_precision() -> None:
    r = subprocess.run(["bash", "-c", "source scripts/machine_defaults.sh"], cwd=REPO, capture_output=True, text=True,
                       env={**_clean_env(), "PYTHON": sys.executable, "ACCELERATOR": "cpu", "CPU_PRECISION": "fp16"},
                       timeout=120)
    assert r.returncode == 2 and "CPU_PRECISION=fp16 is not one of auto, fp32, bf16" in r.stderr


SETTINGS = ("N_LAYER", "N_EMBD", "HEAD_SIZE", "VOCAB_SIZE", "CTX_LEN", "PROJ_DIR", "PRETRAIN_DIR", "M_BSZ", "LR_INIT",
            "LR_FINAL", "GRAD_CP", "WARMUP_STEPS", "BETA1", "BETA2", "ADAM_EPS", "WEIGHT_DECAY", "COMPILE", "EPOCH_SAVE",
            "EPOCH_STEPS", "N_NODE", "GPU_PER_NODE", "DS_BUCKET_MB", "MY_EXIT_TOKENS", "MAGIC_PRIME", "DATA_FILE",
            "DATA_TYPE", "LOAD_MODEL", "WANDB", "RANDOM_SEED", "MODEL_TYPE", "SFT_WHOLE_SEQ", "PRECISION", "STRATEGY",
            "ACCELERATOR", "CPU_PRECISION")


def script_argv(tmp_path: Path, name: str, **env: str) -> tuple[dict[str, str], str]:
    """The flags a demo script passes to train.py (PYTHON is a stub that prints them) and the stub's cwd."""
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\nexec {sys.executable} -c "import json, os, sys; '
                    f'print(json.dumps([os.getcwd()] + sys.argv[1:]))" "$@"\n')
    stub.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    r = subprocess.run(["bash", str(REPO / name)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={**clean, "PYTHON": str(stub), "ACCELERATOR": "gpu", **env})
    assert r.returncode == 0, r.stderr
    cwd, script, *args = json.loads(r.stdout)
    assert script == "train.py" and len(args) % 2 == 0, args
    return dict(zip(args[::2], args[1::2])), cwd


# SPEC section 4, the published flags of the demo scripts (a GPU machine: bf16 + DeepSpeed ZeRO-2)
PUBLISHED = {"--micro_bsz": "16", "--lr_init": "6e-4", "--lr_final": "2e-5", "--grad_cp": "0", "--epoch_save": "1",
             "--num_nodes": "1", "--devices": "1", "--ds_bucket_mb": "2", "--adam_eps": "1e-18", "--beta1": "0.9",
             "--beta2": "0.99", "--weight_decay": "0.001", "--warmup_steps": "10", "--train_stage": "3",
             "--precision": "bf16", "--strategy": "deepspeed_stage_2", "--ctx_len": "512", "--n_layer": "8",
             "--n_embd": "512", "--head_size": "64", "--vocab_size": "6400", "--my_exit_tokens": "441795307",
             "--magic_prime": "862811", "--data_file": "data/pretrain_hq", "--data_type": "binidx"}


def test_demo_scripts_default_to_the_published_flags_and_take_every_setting_from_the_environment(tmp_path):
    flags, cwd = script_argv(tmp_path, "demo-training-run.sh")
    assert cwd == str(REPO)   # run from another folder, the script works from the repo root
    assert {k: flags[k] for k in PUBLISHED} == PUBLISHED
    sft, _ = script_argv(tmp_path, "demo-training-run-sft.sh")
    assert {k: sft[k] for k in PUBLISHED} == {**PUBLISHED, "--lr_init": "2e-5", "--lr_final": "1e-6",
                                              "--my_exit_tokens": "1843253579", "--magic_prime": "3600053",
                                              "--data_file": "data/sft_512", "--data_type": "sft"}
    assert sft["--load_model"] == "out/L8-D512-x070/rwkv-final.pth" and sft["--proj_dir"] == "out/L8-D512-x070-sft"
    prep, _ = script_argv(tmp_path, "demo-training-prepare.sh", ACCELERATOR="")
    assert {k: prep[k] for k in ("--train_stage", "--accelerator", "--micro_bsz", "--precision", "--strategy")} == \
        {"--train_stage": "1", "--accelerator": "cpu", "--micro_bsz": "1", "--precision": "bf16",
         "--strategy": "deepspeed_stage_2"}
    # the optimizer settings were written into the command line; every setting is a variable now
    over = dict(WARMUP_STEPS="3", BETA1="0.8", BETA2="0.95", ADAM_EPS="1e-8", WEIGHT_DECAY="0.1",
                PROJ_DIR="my run", DATA_FILE="my data/x")
    for name in ("demo-training-run.sh", "demo-training-run-sft.sh"):
        flags, _ = script_argv(tmp_path, name, **over)
        assert {k: flags[f"--{k.lower()}"] for k in over} == over, name
        # settings named otherwise than their flags (the published values, 1 and 1, hide a mix-up)
        flags, _ = script_argv(tmp_path, name, N_NODE="2", GPU_PER_NODE="4", M_BSZ="8", EPOCH_STEPS="7")
        assert [flags[k] for k in ("--num_nodes", "--devices", "--micro_bsz", "--epoch_steps")] == ["2", "4", "8", "7"]
    sft, _ = script_argv(tmp_path, "demo-training-run-sft.sh", SFT_WHOLE_SEQ="1")
    assert sft["--sft_whole_seq"] == "1"
