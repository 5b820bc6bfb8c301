"""train.py rejects bad input with a message that names the problem and the fix, before any training."""
from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy

import train
from src.dataset import SFTDataset
from src.trainer import TrainingError
from tests.test_train_run import (CTX, MICRO_BSZ, MODEL, as_flags, largest_magic_prime, tiny_flags,
                                  write_progressions)
from tests.test_train_run import one_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    prefix = tmp_path_factory.mktemp("data") / "prog"
    return prefix, write_progressions(prefix, seed=7)


@pytest.fixture()
def proj(tmp_path: Path) -> Path:
    """A proj_dir holding a stage-1 init of the tiny model."""
    assert train.main(["--train_stage", "1", "--proj_dir", str(tmp_path), "--precision", "fp32",
                       *as_flags(MODEL)]) == 0
    return tmp_path


def rejected(argv: list[str], pattern: str, proj: Path) -> None:
    with pytest.raises(TrainingError, match=pattern):
        train.main(argv)
    assert not (proj / "train_log.txt").exists(), "training started before the input was checked"


def test_missing_data_file(proj: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "pretrain"
    rejected(tiny_flags(missing, 1000, proj), rf"{missing}\.(idx|bin) not found.*make_data\.py", proj)
    rejected(tiny_flags(missing, 1000, proj, data_file=""), r"--data_file is required", proj)


def next_magic_prime(p: int, step: int) -> int:
    """The next prime q % 3 == 2 after p, upwards (step 1) or downwards (step -1)."""
    q = p + step
    while not (q % 3 == 2 and all(q % d for d in range(2, math.isqrt(q) + 1))):
        q += step
    return q


def test_magic_prime_and_exit_tokens_must_match_the_data(data: tuple[Path, int], proj: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    prefix, n = data
    p = largest_magic_prime(n, CTX)
    right = rf"--my_exit_tokens {n} --magic_prime {p}\b"
    rejected(tiny_flags(prefix, n, proj, magic_prime=p - 6), rf"--magic_prime {p - 6} does not fit .*: {p - 6} is "
             rf"not prime; use {right}", proj)
    above, below = next_magic_prime(p, +1), next_magic_prime(p, -1)
    rejected(tiny_flags(prefix, n, proj, magic_prime=above), rf"--magic_prime {above} does not fit .*need more than "
             rf"the {n} tokens.*{right}", proj)
    # SPEC's start check: prime, p % 3 == 2, > 90 % of the windows; a smaller prime than the largest passes it
    windows = n // CTX
    assert 0.9 * windows < below < p
    args = train.parse_args(tiny_flags(prefix, n, proj, magic_prime=below))
    assert train.check_data(args) == below
    assert f"--magic_prime {below} is valid" in capsys.readouterr().out
    too_few = next_magic_prime(int(0.9 * windows) + 1, -1)
    rejected(tiny_flags(prefix, n, proj, magic_prime=too_few), rf"--magic_prime {too_few} does not fit .*covers only",
             proj)
    rejected(tiny_flags(prefix, n, proj, my_exit_tokens=n - 1), rf"--my_exit_tokens {n - 1} does not match.*{right} "
             rf"for ctx_len {CTX} \(the demo scripts' MY_EXIT_TOKENS={n} MAGIC_PRIME={p}\)", proj)
    # the same data at another ctx_len has another prime
    p64 = largest_magic_prime(n, 64)
    rejected(tiny_flags(prefix, n, proj, ctx_len=64), rf"--magic_prime {p} does not fit .* --magic_prime {p64}\b",
             proj)


def test_real_bsz_must_divide_a_mini_epoch(data: tuple[Path, int], proj: Path) -> None:
    prefix, n = data
    rejected(tiny_flags(prefix, n, proj, micro_bsz=11, epoch_steps=0),
             r"real_bsz = num_nodes 1 x devices 1 x micro_bsz 11 = 11 does not divide the 40320", proj)


def test_data_too_small_for_the_mini_epoch_or_epoch_count(data: tuple[Path, int], proj: Path) -> None:
    prefix, n = data
    p = largest_magic_prime(n, CTX)
    # 40320 samples per mini-epoch (epoch_steps 0) do not fit a few hundred windows
    rejected(tiny_flags(prefix, n, proj, micro_bsz=8, epoch_steps=0),
             rf"holds {p} samples .* fewer than one mini-epoch .*--epoch_steps to at most {p // 8}", proj)
    rejected(tiny_flags(prefix, n, proj, epoch_count=p // 16 + 1),
             rf"--epoch_count {p // 16 + 1} needs .* at most {p // 16} mini-epochs", proj)


def test_unknown_strategy_and_precision_are_argparse_errors(data: tuple[Path, int], proj: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    prefix, n = data
    for flag, value in (("strategy", "deepspeed_stage_9"), ("precision", "fp8"), ("data_type", "jsonl")):
        with pytest.raises(SystemExit) as e:
            train.main(tiny_flags(prefix, n, proj, **{flag: value}))
        assert e.value.code == 2
        assert f"argument --{flag}: invalid choice: '{value}'" in capsys.readouterr().err


def test_cpu_refuses_deepspeed_fp16_and_the_cuda_kernel(data: tuple[Path, int], proj: Path) -> None:
    prefix, n = data
    rejected(tiny_flags(prefix, n, proj, strategy="deepspeed_stage_2"),
             r"--strategy deepspeed_stage_2 needs GPUs .* use --strategy auto .* or ddp", proj)
    rejected(tiny_flags(prefix, n, proj, precision="fp16"), r"--precision fp16 .* needs a GPU", proj)
    rejected(tiny_flags(prefix, n, proj, wkv_impl="cuda"), r"--wkv_impl cuda needs a GPU", proj)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_gpu_asked_for_without_one(data: tuple[Path, int], proj: Path) -> None:
    prefix, n = data
    rejected(tiny_flags(prefix, n, proj, accelerator="gpu"), r"--accelerator gpu but torch sees no CUDA/ROCm device",
             proj)


def test_gpu_kernel_needs_ctx_len_multiple_of_16(data: tuple[Path, int], proj: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    prefix, n = data
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only the check runs: it fails first
    monkeypatch.setattr(train, "toolchain_problem", lambda: None)
    rejected(tiny_flags(prefix, n, proj, accelerator="gpu", ctx_len=40),
             r"--ctx_len 40 is not a multiple of 16, which the WKV7 GPU kernel needs .* --wkv_impl torch", proj)


@pytest.mark.parametrize("capability,precision,noted", [((7, 5), "bf16", True), ((7, 0), "tf32", True),
                                                       ((7, 5), "fp16", False), ((8, 6), "bf16", False)])
def test_gpu_without_bf16_tensor_cores_is_told_about_fp16(capability: tuple[int, int], precision: str, noted: bool,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A T4 / RTX 20xx / V100 emulates bf16: train.py says that fp16 is the fast choice there, and only there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(train, "toolchain_problem", lambda: None)
    train.check_machine(train.parse_args(["--accelerator", "gpu", "--precision", precision]))
    out = capsys.readouterr().out
    assert ("Tesla T4 (compute capability %d.%d) has no bf16 or TF32 tensor cores" % capability in out) == noted, out
    if noted:
        assert f"--precision {precision} runs its matrix products several times slower" in out
        assert "--precision fp16 (PRECISION=fp16 for the demo scripts)" in out


def test_gpu_training_without_the_kernel_toolchain(data: tuple[Path, int], proj: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """No nvcc/ninja on a GPU machine: an error before training, not a quiet ~25x slower WKV7."""
    from torch.utils import cpp_extension
    from src.wkv7 import kernel

    prefix, n = data
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    kernel.toolchain_problem.cache_clear()
    try:
        rejected(tiny_flags(prefix, n, proj, accelerator="gpu"),
                 r"the WKV7 GPU kernel cannot be built: nvcc \(CUDA toolkit\) was not found \(set CUDA_HOME.* "
                 r"--wkv_impl torch", proj)
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
        monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
        kernel.toolchain_problem.cache_clear()
        rejected(tiny_flags(prefix, n, proj, accelerator="gpu"), r"cannot be built: ninja is missing \(pip install ninja\)",
                 proj)
        # --wkv_impl torch needs no toolchain: the next check (the kernel's ctx_len rule) no longer applies either
        monkeypatch.setattr(train, "build_trainer", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("reached")))
        with pytest.raises(RuntimeError, match="reached"):
            train.main(tiny_flags(prefix, n, proj, accelerator="gpu", wkv_impl="torch", ctx_len=40,
                                  magic_prime=largest_magic_prime(n, 40)))
    finally:
        kernel.toolchain_problem.cache_clear()


def test_stage_3_needs_something_to_start_from(data: tuple[Path, int], tmp_path: Path) -> None:
    prefix, n = data
    empty = tmp_path / "empty"
    rejected(tiny_flags(prefix, n, empty), rf"{empty} holds no rwkv-init.pth or rwkv-N.pth .* run stage 1 first", empty)
    rejected(tiny_flags(prefix, n, empty, load_model=tmp_path / "x.pth"), r"--load_model .*x.pth: no such file", empty)


def test_checkpoint_of_another_shape_names_the_tensor(data: tuple[Path, int], proj: Path) -> None:
    prefix, n = data
    rejected(tiny_flags(prefix, n, proj, n_embd=128, head_size=32),
             r"does not fit the model .*\n  emb.weight: checkpoint \[64, 64\] vs model \[64, 128\]", proj)
    rejected(tiny_flags(prefix, n, proj, n_layer=3), r"(?s)blocks.2.ln1.weight: not in the checkpoint.*\n"
             r"The checkpoint is L2-D64 \(head_size 32, vocab 64\); to build its shape add: --n_layer 2$", proj)
    rejected(tiny_flags(prefix, n, proj, n_embd=128, head_size=64, vocab_size=97),
             r"to build its shape add: --n_embd 64 --head_size 32 --vocab_size 64$", proj)
    rejected(tiny_flags(prefix, n, proj, dim_ffn=512), r"to build its shape add: --dim_ffn 256$", proj)


def test_checkpoint_with_other_lora_widths_names_the_flags(data: tuple[Path, int], tmp_path: Path) -> None:
    """A checkpoint made elsewhere whose LoRA widths are not SPEC's formula (RWKV-7 models of n_embd 2048 use
    96/96/64/256 where the formula gives 128/128/64/224): the error gives the flags, and with them it trains."""
    from src.model import RWKV, ModelConfig

    prefix, n = data
    theirs = tmp_path / "theirs.pth"
    model = RWKV(ModelConfig(**MODEL, d_decay_lora=64, d_gate_lora=96))   # formula at n_embd 64: 32 each
    torch.save(model.state_dict(), theirs)
    proj = tmp_path / "ft"
    rejected(tiny_flags(prefix, n, proj, load_model=theirs, epoch_count=1),
             r"(?s)blocks.0.att.w1: checkpoint \[64, 64\] vs model \[64, 32\].*\n"
             r"The checkpoint is L2-D64 \(head_size 32, vocab 64\); to build its shape add: --d_decay_lora 64 "
             r"--d_gate_lora 96$", proj)
    assert train.main(tiny_flags(prefix, n, proj, load_model=theirs, epoch_count=1, d_decay_lora=64,
                                 d_gate_lora=96)) == 0
    final = torch.load(proj / "rwkv-final.pth", weights_only=True)
    assert final["blocks.1.att.w1"].shape == (64, 64) and final["blocks.1.att.g2"].shape == (96, 64)
    with pytest.raises(ValueError, match="--d_mv_lora -32 must be >= 0"):
        ModelConfig(**MODEL, d_mv_lora=-32)


def test_the_tokenizer_goes_beside_the_checkpoints_and_another_one_stops(tmp_path: Path) -> None:
    """make_data's PREFIX.tokenizer.json ends up in proj_dir (the chat takes it from there); data made with
    another tokenizer than a start checkpoint's (or proj_dir's) stops before training."""
    import json

    from src.tokenizer import copy_tokenizer, data_tokenizer_file, tokenizer_file

    prefix = tmp_path / "d"
    n = write_progressions(prefix, seed=8)
    plain = tmp_path / "plain"        # data without a tokenizer beside it (made elsewhere): nothing to carry
    assert train.main(["--train_stage", "1", "--proj_dir", str(plain), "--precision", "fp32", *as_flags(MODEL)]) == 0
    assert train.main(tiny_flags(prefix, n, plain, epoch_count=1)) == 0
    assert not (plain / "tokenizer.json").exists()

    default = tokenizer_file(None)
    copy_tokenizer(default, data_tokenizer_file(prefix))
    run = tmp_path / "run"
    assert train.main(tiny_flags(prefix, n, run, load_model=plain / "rwkv-final.pth", epoch_count=1)) == 0
    assert (run / "tokenizer.json").read_bytes() == default.read_bytes()

    vocab = json.loads(default.read_text(encoding="utf-8"))
    a, b = list(vocab["model"]["vocab"])[300:302]                       # two ids swapped: other token ids
    vocab["model"]["vocab"][a], vocab["model"]["vocab"][b] = vocab["model"]["vocab"][b], vocab["model"]["vocab"][a]
    data_tokenizer_file(prefix).write_text(json.dumps(vocab), encoding="utf-8")
    ft = tmp_path / "ft"
    rejected(tiny_flags(prefix, n, ft, load_model=run / "rwkv-final.pth", epoch_count=1),
             rf"{run}/tokenizer.json is not the tokenizer {prefix} was made with \({prefix}.tokenizer.json\): the "
             rf"model there learnt other token ids.*--tokenizer {run}/tokenizer.json\), or delete", ft)
    shutil.copytree(run, ft, dirs_exist_ok=True)   # a proj_dir holding the other tokenizer: the same stop
    (ft / "rwkv-final.pth").rename(ft / "rwkv-0.pth")
    (ft / "train_log.txt").unlink()
    rejected(tiny_flags(prefix, n, ft, epoch_count=2), rf"{ft}/tokenizer.json is not the tokenizer", ft)

    other = tmp_path / "other.json"
    other.write_text(json.dumps(vocab), encoding="utf-8")
    vocab["model"]["vocab"][a], vocab["model"]["vocab"][b] = vocab["model"]["vocab"][b], vocab["model"]["vocab"][a]
    data_tokenizer_file(prefix).write_text(json.dumps(vocab), encoding="utf-8")   # same tokenizer, other layout
    assert train.main(tiny_flags(prefix, n, ft, epoch_count=2)) == 0
    # a tokenizer.json that is not JSON (cut short, a Git LFS pointer): one line, not a traceback
    lfs = tmp_path / "lfs"
    copy_tokenizer(other, lfs / "tokenizer.json")
    (lfs / "tokenizer.json").write_text("version https://git-lfs.github.com/spec/v1\n")
    rejected(tiny_flags(prefix, n, lfs, load_model=run / "rwkv-final.pth", epoch_count=1),
             rf"{lfs}/tokenizer.json or {prefix}.tokenizer.json is not a tokenizer.json \(", lfs)
    # a new start from elsewhere into a proj_dir that holds another tokenizer: the same stop
    mixed = tmp_path / "mixed"
    copy_tokenizer(other, mixed / "tokenizer.json")
    rejected(tiny_flags(prefix, n, mixed, load_model=run / "rwkv-final.pth", epoch_count=1),
             rf"{mixed}/tokenizer.json is not the tokenizer {prefix} was made with", mixed)

    # data without a tokenizer beside it (made before make_data wrote one): the start checkpoint's goes on
    bare = tmp_path / "bare"
    for ext in ("bin", "idx"):
        shutil.copy(f"{prefix}.{ext}", f"{bare}.{ext}")
    from_run = tmp_path / "from_run"
    assert train.main(tiny_flags(bare, n, from_run, load_model=run / "rwkv-final.pth", epoch_count=1)) == 0
    assert (from_run / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()

    # a refused start writes nothing: an SFT command pointed at the unfinished pretraining in `plain`
    (plain / "rwkv-final.pth").unlink()
    with pytest.raises(TrainingError, match=rf"{plain} holds a run on binidx data"):
        train.main(tiny_flags(prefix, n, plain, data_type="sft", sft_whole_seq=1, magic_prime=0, epoch_count=3))
    assert not (plain / "tokenizer.json").exists()


def test_bad_numbers(data: tuple[Path, int], proj: Path) -> None:
    prefix, n = data
    rejected(tiny_flags(prefix, n, proj, micro_bsz=0), r"--micro_bsz must be >= 1, got 0", proj)
    rejected(tiny_flags(prefix, n, proj, lr_init=0), r"--lr_init must be > 0", proj)
    rejected(tiny_flags(prefix, n, proj, my_testing="x060"), r"only the x070 .* is implemented", proj)
    rejected(tiny_flags(prefix, n, proj, n_embd=80), r"--n_embd 80 is not a multiple of --head_size 32", proj)
    # optimizer numbers that torch.optim would refuse only once the model and the Trainer are built
    rejected(tiny_flags(prefix, n, proj, lr_init="inf"), r"--lr_init must be > 0 and --lr_final >= 0, both finite",
             proj)
    rejected(tiny_flags(prefix, n, proj, beta1=1), r"--beta1 must be in \[0, 1\), got 1.0", proj)   # torch refuses 1
    rejected(tiny_flags(prefix, n, proj, beta2=-0.5), r"--beta2 must be in \[0, 1\), got -0.5", proj)
    rejected(tiny_flags(prefix, n, proj, adam_eps=-1), r"--adam_eps must be finite and >= 0, got -1.0", proj)
    rejected(tiny_flags(prefix, n, proj, weight_decay=-0.1), r"--weight_decay must be finite and >= 0", proj)
    rejected(tiny_flags(prefix, n, proj, grad_clip=-1), r"--grad_clip must be finite and >= 0, got -1.0 \(0 turns",
             proj)
    rejected(tiny_flags(prefix, n, proj, my_exit_tokens=n, epoch_count=2),
             rf"--epoch_count 2 with --my_exit_tokens {n}: the run stops at my_exit_tokens", proj)


def test_notes_on_settings_that_train_but_likely_not_as_meant(data: tuple[Path, int], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from data.make_data import make_data

    prefix, n = data
    args = train.parse_args(tiny_flags(prefix, n, tmp_path, lr_init=1e-4, lr_final=1e-3))
    train.check_machine(args)
    assert "note: --lr_final 0.001 is above --lr_init 0.0001: the lr rises over the run" in capsys.readouterr().out
    with pytest.raises(TrainingError, match="holds no rwkv-init.pth"):   # the note comes before the start is sought
        train.main(tiny_flags(prefix, n, tmp_path / "empty", warmup_steps=4, epoch_count=1))
    out = capsys.readouterr().out
    assert "note: --warmup_steps 4 is not below this run's 4 steps: the lr never leaves warmup" in out
    with pytest.raises(TrainingError, match="holds no rwkv-init.pth"):
        train.main(tiny_flags(prefix, n, tmp_path / "empty", warmup_steps=3, epoch_count=1))
    assert "warmup" not in capsys.readouterr().out
    # SFT data (it has a .mask) given as pretraining data; and conversations longer than the SFT ctx_len
    convs = [{"conversations": [{"role": "user", "content": "hello " * k}, {"role": "assistant", "content": "hi"}]}
             for k in (2, 3, 40, 50)] * 20
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(c) for c in convs) + "\n")
    r = make_data(tmp_path / "c.jsonl", 1, 32, out=tmp_path / "c", progress=False)
    train.check_data(train.parse_args(tiny_flags(tmp_path / "c", r.num_tokens, tmp_path, magic_prime=r.magic_prime,
                                                 vocab_size=6400)))
    assert f"note: {tmp_path / 'c'} is SFT data (it has a .mask): --data_type binidx pretrains on all of it" in \
        capsys.readouterr().out
    train.check_data(train.parse_args(tiny_flags(tmp_path / "c", r.num_tokens, tmp_path, data_type="sft",
                                                 magic_prime=0, vocab_size=6400)))
    assert (f"note: 40 of 80 conversations in {tmp_path / 'c'} are longer than ctx_len + 1 = 33 tokens: their ends "
            "are never trained") in capsys.readouterr().out


def test_stage_1_keeps_a_run_s_init(data: tuple[Path, int], proj: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rerunning the prepare script (the quickstart again, a resubmitted `prepare && run` job) succeeds and leaves
    the run's rwkv-init.pth as it is, even with other sizes."""
    prefix, n = data
    assert train.main(tiny_flags(prefix, n, proj, epoch_count=1)) == 0
    before = (proj / "rwkv-init.pth").read_bytes()
    stage_1 = ["--train_stage", "1", "--proj_dir", str(proj), "--precision", "fp32", *as_flags(MODEL),
               "--n_embd", "128"]
    capsys.readouterr()
    assert train.main(stage_1) == 0
    assert f"stage 1: {proj} holds a run (rwkv-0.pth), which stage 2/3 continue: its rwkv-init.pth is left" in \
        capsys.readouterr().out
    for name in ("rwkv-0.pth", "rwkv-0.state.pth"):
        (proj / name).unlink()
    assert train.main(stage_1) == 0 and "holds a run (rwkv-final.pth)" in capsys.readouterr().out
    assert (proj / "rwkv-init.pth").read_bytes() == before


def test_unwritable_proj_dir_and_a_failed_save(data: tuple[Path, int], proj: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    prefix, n = data
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    rejected(tiny_flags(prefix, n, a_file / "run", load_model=proj / "rwkv-init.pth"),
             rf"--proj_dir {a_file / 'run'} cannot take files \(Not a directory\): give a writable folder", a_file)
    with pytest.raises(TrainingError, match="cannot take files"):
        train.main(["--train_stage", "1", "--proj_dir", str(a_file / "run"), *as_flags(MODEL)])

    def full_disk(obj, f, *a, **k):   # what torch.save's zip writer does on ENOSPC
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0") from e

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(TrainingError, match=rf"cannot write {proj}/rwkv-0.state.pth: No space left on device; "
                                            "nothing was written under that name and the files before it are intact"):
        train.main(tiny_flags(prefix, n, proj, epoch_count=1))
    assert not list(proj.glob(".*.tmp")) and not list(proj.glob("rwkv-0*"))   # no temporaries, nothing half-saved


def test_resume_refuses_moved_mini_epochs_other_data_and_names_a_damaged_checkpoint(
        data: tuple[Path, int], proj: Path) -> None:
    prefix, n = data
    assert train.main(tiny_flags(prefix, n, proj, epoch_count=2, my_exit_tokens=0)) == 0    # rwkv-0, rwkv-1, final
    (proj / "rwkv-final.pth").unlink()
    with pytest.raises(TrainingError, match=r"rwkv-1.pth was saved after 32 samples \(8 steps of 4\), but these "
                                            r"flags make mini-epochs of 2 steps of 4.*\(--epoch_steps 4\)"):
        train.main(tiny_flags(prefix, n, proj, epoch_steps=2, epoch_count=6))
    # the same file as SFT data (an SFT command pointed at the pretraining's folder)
    with pytest.raises(TrainingError, match=rf"{proj} holds a run on binidx data \({prefix}\); this command trains "
                                            rf"on sft data \({prefix}\)"):
        train.main(tiny_flags(prefix, n, proj, data_type="sft", sft_whole_seq=1, magic_prime=0, epoch_count=3))
    with pytest.raises(TrainingError, match="does not fit the model built from the flags") as e:
        train.main(tiny_flags(prefix, n, proj, epoch_count=3, n_layer=3))
    assert "newest checkpoint" not in str(e.value)       # other flags, not a damaged file
    # a newest checkpoint cut short (a copy interrupted): the error says how to continue from the one before
    (proj / "rwkv-1.pth").write_bytes((proj / "rwkv-1.pth").read_bytes()[:100])
    with pytest.raises(TrainingError, match=rf"(?s)cannot read {proj}/rwkv-1.pth.*\nIt is {proj}'s newest checkpoint: "
                                            r"if it is damaged .* move it and rwkv-1.state.pth out of"):
        train.main(tiny_flags(prefix, n, proj, epoch_count=3))


def test_weights_copied_from_another_run_resume_without_this_run_s_optimizer(data: tuple[Path, int], proj: Path,
                                                                              tmp_path: Path) -> None:
    prefix, n = data
    other = tmp_path / "other"
    assert train.main(["--train_stage", "1", "--proj_dir", str(other), "--precision", "fp32", *as_flags(MODEL)]) == 0
    for run in (proj, other):
        assert train.main(tiny_flags(prefix, n, run, epoch_count=2)) == 0
    shutil.copy(other / "rwkv-1.pth", proj / "rwkv-1.pth")
    (proj / "rwkv-final.pth").unlink()
    assert train.main(tiny_flags(prefix, n, proj, epoch_count=3)) == 0
    assert ("weights only: rwkv-1.state.pth was saved with other weights than rwkv-1.pth (copied from another "
            "run?)") in (proj / "train_log.txt").read_text()


def test_data_file_given_with_its_suffix_carries_the_tokenizer(data: tuple[Path, int], proj: Path,
                                                               tmp_path: Path) -> None:
    from src.tokenizer import copy_tokenizer, data_tokenizer_file, tokenizer_file

    prefix, n = data
    for ext in ("bin", "idx"):
        shutil.copy(f"{prefix}.{ext}", tmp_path / f"d.{ext}")
    copy_tokenizer(tokenizer_file(None), data_tokenizer_file(tmp_path / "d"))
    assert train.main(tiny_flags(tmp_path / "d.bin", n, proj, epoch_count=1)) == 0
    assert (proj / "tokenizer.json").read_bytes() == tokenizer_file(None).read_bytes()


def test_token_ids_beyond_the_vocabulary(data: tuple[Path, int], proj: Path) -> None:
    prefix, n = data
    top = int(np.fromfile(f"{prefix}.bin", dtype=np.uint16).max())
    rejected(tiny_flags(prefix, n, proj, vocab_size=top),
             rf"{prefix} holds token id {top} but --vocab_size is {top}: use --vocab_size {top + 1} or more", proj)


def test_load_model_that_is_not_a_checkpoint(data: tuple[Path, int], tmp_path: Path) -> None:
    prefix, n = data
    junk = tmp_path / "notes.pth"
    junk.write_text("not a checkpoint\n")
    fresh = tmp_path / "fresh"
    rejected(tiny_flags(prefix, n, fresh, load_model=junk), rf"cannot read {junk} as a PyTorch checkpoint", fresh)
    assert not fresh.exists() or not any(fresh.iterdir())


def test_epoch_begin_past_the_end_of_a_new_run(data: tuple[Path, int], proj: Path, tmp_path: Path) -> None:
    """--load_model with --epoch_begin beyond the run's steps must not pass the weights off as rwkv-final.pth."""
    prefix, n = data
    fresh = tmp_path / "fresh"
    # epoch_count 4 x epoch_steps 4 = 16 steps: mini-epochs 0..3 exist
    rejected(tiny_flags(prefix, n, fresh, load_model=proj / "rwkv-init.pth", epoch_begin=10),
             r"--epoch_begin 10 starts at step 40, past this run's 16 steps: use at most 3", fresh)
    assert not (fresh / "rwkv-final.pth").exists()
    # the first step past the end (mini-epoch 4 starts at step 16) is past it too
    rejected(tiny_flags(prefix, n, fresh, load_model=proj / "rwkv-init.pth", epoch_begin=4),
             r"--epoch_begin 4 starts at step 16, past this run's 16 steps: use at most 3", fresh)
    assert not (fresh / "rwkv-final.pth").exists()


def test_sft_exit_tokens_mean_one_pass_over_the_samples(data: tuple[Path, int], proj: Path) -> None:
    """SFT samples are padded or packed conversations, more tokens than the data's count: my_exit_tokens =
    that count trains one whole pass (every sample once); pretraining keeps the token count."""
    prefix, n = data
    sft = train.parse_args(tiny_flags(prefix, n, proj, data_type="sft", my_exit_tokens=n, magic_prime=0, epoch_count=0))
    steps, exit_tokens = train.plan_epochs(sft, samples_per_pass=1001)
    assert steps == math.ceil(1001 / sft.real_bsz) and exit_tokens == steps * sft.real_bsz * CTX
    pre = train.parse_args(tiny_flags(prefix, n, proj, my_exit_tokens=n, epoch_count=0))
    assert train.plan_epochs(pre, samples_per_pass=1001) == (math.ceil(n / (pre.real_bsz * CTX)), n)


@pytest.mark.parametrize("devices,precision", [(1, "bf16"), (2, "bf16"), (1, "fp16")])
def test_deepspeed_config_has_no_per_step_host_waits(devices: int, precision: str) -> None:
    """What build_strategy hands DeepSpeed, read back through DeepSpeed's own config parser: the
    --ds_bucket_mb buckets, no throughput timer (3 device syncs a step), no bf16 overflow check (a
    flag read back every step), overlap_comm only where there are several GPUs to overlap with."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    args = train.parse_args(["--accelerator", "gpu", "--strategy", "deepspeed_stage_2", "--precision", precision,
                             "--ds_bucket_mb", "3", "--devices", str(devices)])
    config = DeepSpeedConfig(dict(train.build_strategy(args).config, gradient_clipping=1.0))
    zero = config.zero_config
    assert (zero.stage, zero.reduce_bucket_size, zero.allgather_bucket_size) == (2, 3_000_000, 3_000_000)
    assert zero.overlap_comm == (devices > 1)
    assert not config.timers_config.enabled
    if precision == "bf16":
        assert config.bfloat16_config.enabled and not config.bfloat16_config.check_grad_overflow
    else:   # fp16 keeps DeepSpeed's loss scaler, whose overflow check it needs; Lightning fills that section
        assert not config.bfloat16_config.enabled


def test_wandb_online_without_an_api_key(data: tuple[Path, int], proj: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """--wandb online with no key anywhere: one error before any compute naming the ways out; offline needs none."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))          # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setattr(train, "build_model", lambda *a: (_ for _ in ()).throw(RuntimeError("reached")))
    prefix, n = data
    rejected(tiny_flags(prefix, n, proj, wandb="mini-rwkv"),
             r"--wandb mini-rwkv: wandb has no API key on this machine. Run `wandb login`.*WANDB_MODE=offline", proj)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(RuntimeError, match="reached"):   # the check passes; training would start
        train.main(tiny_flags(prefix, n, proj, wandb="mini-rwkv"))


def test_slurm_auto_requeue_is_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Under SLURM, Lightning's auto-requeue would catch SIGUSR1, write its own hpc_ckpt_N.ckpt into
    proj_dir and load it in the requeued job over train.py's resume: train.py turns it off."""
    args = train.parse_args(["--accelerator", "cpu", "--precision", "fp32", "--proj_dir", str(tmp_path)])
    outside = train.build_trainer(args, 1, [])
    assert not isinstance(outside._accelerator_connector.cluster_environment, SLURMEnvironment)
    for k, v in dict(SLURM_NTASKS="1", SLURM_JOB_NAME="pretrain", SLURM_JOB_ID="42", SLURM_NODEID="0",
                     SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODELIST="node1").items():
        monkeypatch.setenv(k, v)
    inside = train.build_trainer(args, 1, [])
    env = inside._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and not env.auto_requeue
    before = signal.getsignal(signal.SIGUSR1)
    inside._signal_connector.register_signal_handlers()   # what fit() does first
    try:
        assert signal.getsignal(signal.SIGUSR1) is before, "a SIGUSR1 (requeue) handler was installed"
    finally:
        inside._signal_connector.teardown()


def test_torchrun_inside_a_slurm_job_keeps_its_ranks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """torchrun in a SLURM allocation: Lightning takes ranks from TorchElastic (it comes first), not from
    SLURM_PROCID, which is the same for every process torchrun starts on a node; turning SLURM's
    auto-requeue off must not force SLURM's ranks on them."""
    for k, v in dict(SLURM_NTASKS="2", SLURM_JOB_NAME="pretrain", SLURM_JOB_ID="42", SLURM_NODEID="0",
                     SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODELIST="node1", TORCHELASTIC_RUN_ID="run",
                     WORLD_SIZE="4", RANK="3", LOCAL_RANK="1", GROUP_RANK="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT="29500").items():
        monkeypatch.setenv(k, v)
    # building the trainer sets the process-wide rank (3 here): put it back afterwards
    from lightning_fabric.utilities import rank_zero as fabric_rank_zero
    from pytorch_lightning.utilities import rank_zero as pl_rank_zero
    for module in (fabric_rank_zero, pl_rank_zero):
        monkeypatch.setattr(module.rank_zero_only, "rank", module.rank_zero_only.rank)
    args = train.parse_args(["--accelerator", "cpu", "--precision", "fp32", "--devices", "2", "--num_nodes", "2",
                             "--strategy", "ddp", "--proj_dir", str(tmp_path)])
    env = train.build_trainer(args, 1, [])._accelerator_connector.cluster_environment
    assert not isinstance(env, SLURMEnvironment)
    assert (env.global_rank(), env.world_size()) == (3, 4)


def test_mini_epoch_counts_every_process_of_every_node(data: tuple[Path, int], proj: Path) -> None:
    """real_bsz = num_nodes x devices x micro_bsz; a mini-epoch is 40320 samples of that (SPEC)."""
    prefix, n = data
    args = train.parse_args(tiny_flags(prefix, n, proj, num_nodes=3, devices=2, micro_bsz=4, epoch_steps=0))
    assert train.plan_epochs(args, samples_per_pass=10**6) == (4 * 1680, 4 * 1680 * 24 * CTX)
    assert (args.real_bsz, args.epoch_steps, args.epoch_count) == (24, 40320 // 24, 4)


def test_epoch_count_0_trains_every_whole_mini_epoch_of_the_data(data: tuple[Path, int], proj: Path) -> None:
    prefix, n = data
    args = train.parse_args(tiny_flags(prefix, n, proj, epoch_count=0))     # 4 steps x 4 samples a mini-epoch
    assert train.plan_epochs(args, samples_per_pass=1000) == (62 * 4, 62 * 4 * MICRO_BSZ * CTX)
    assert args.epoch_count == 62
    args = train.parse_args(tiny_flags(prefix, n, proj, epoch_count=62))    # all of them, asked for by number
    assert train.plan_epochs(args, samples_per_pass=1000) == (62 * 4, 62 * 4 * MICRO_BSZ * CTX)


def test_where_a_run_starts(tmp_path: Path) -> None:
    """proj_dir's own rwkv-N.pth (N >= 0, also 0) first, then --load_model, then proj_dir/rwkv-init.pth."""
    proj, other = tmp_path / "proj", tmp_path / "pretrain-final.pth"
    proj.mkdir()
    other.write_bytes(b"x")
    (proj / "rwkv-init.pth").write_bytes(b"x")

    def start(**over: object) -> tuple[Path, int, bool]:
        flags = {"proj_dir": proj, "epoch_begin": 2, **over}
        return train.find_start(train.parse_args(as_flags(flags)))

    assert start() == (proj / "rwkv-init.pth", 2, False)
    assert start(load_model=other) == (other, 2, False)          # an SFT proj_dir may hold a stage-1 init
    (proj / "rwkv-0.pth").write_bytes(b"x")
    assert start(load_model=other) == (proj / "rwkv-0.pth", 1, True)   # after mini-epoch 0: continue at 1
    (proj / "rwkv-7.pth").write_bytes(b"x")
    assert start() == (proj / "rwkv-7.pth", 8, True)


def test_strategy_for_the_machine(tmp_path: Path) -> None:
    def strategy(*argv: str):
        return train.build_strategy(train.parse_args(["--proj_dir", str(tmp_path), *argv]))

    assert strategy() == "auto"
    assert isinstance(strategy("--strategy", "ddp"), DDPStrategy)
    assert isinstance(strategy("--devices", "2"), DDPStrategy)
    assert isinstance(strategy("--num_nodes", "2"), DDPStrategy)       # one GPU on each of two machines
    zero2 = strategy("--strategy", "deepspeed_stage_2_offload", "--ds_bucket_mb", "2")
    assert isinstance(zero2, DeepSpeedStrategy)
    z = zero2.config["zero_optimization"]
    assert z["stage"] == 2 and z["offload_optimizer"]["device"] == "cpu" and "offload_param" not in z
    assert z["allgather_bucket_size"] == z["reduce_bucket_size"] == 2_000_000
    z = strategy("--strategy", "deepspeed_stage_3_offload").config["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    z = strategy("--strategy", "deepspeed_stage_3").config["zero_optimization"]
    assert z["stage"] == 3 and "offload_optimizer" not in z and "offload_param" not in z


def test_sft_needs_no_magic_prime_but_refuses_a_wrong_one(data: tuple[Path, int], proj: Path) -> None:
    """--data_type sft samples whole conversations and uses no prime (0, or make_data's NONE), yet a prime
    that does not fit the data at this ctx_len means other data or another ctx_len: refused, naming the
    right one."""
    prefix, n = data
    p, p64 = largest_magic_prime(n, CTX), largest_magic_prime(n, 64)
    sft = dict(data_type="sft", sft_whole_seq=1)
    rejected(tiny_flags(prefix, n, proj, magic_prime=p64, **sft),
             rf"--magic_prime {p64} does not match {prefix} \({n} tokens\) at ctx_len {CTX}: --data_type sft does "
             rf"not use it; pass 0 or {p}$", proj)
    samples = SFTDataset(prefix, CTX, whole_sequence=True).n_samples
    for fine in ("0", "NONE", str(p)):
        assert train.check_data(train.parse_args(tiny_flags(prefix, n, proj, magic_prime=fine, **sft))) == samples


def test_sft_without_exit_tokens_trains_epoch_count_mini_epochs(data: tuple[Path, int], proj: Path) -> None:
    """--my_exit_tokens 0 means --epoch_count mini-epochs for SFT as for pretraining (not one pass)."""
    prefix, n = data
    args = train.parse_args(tiny_flags(prefix, n, proj, data_type="sft", my_exit_tokens=0, magic_prime=0,
                                       epoch_count=3))
    assert train.plan_epochs(args, samples_per_pass=1001) == (3 * 4, 3 * 4 * MICRO_BSZ * CTX)
    assert args.epoch_count == 3


def test_sft_sample_order_follows_the_random_seed(data: tuple[Path, int], proj: Path) -> None:
    """--random_seed picks the order of the SFT samples (-1: order 0): a rerun sees the same batches,
    another seed another order. Batches as train.py's data module hands them to the Trainer."""
    prefix, n = data

    def batches(seed: int) -> list[list[list[int]]]:
        args = train.parse_args(tiny_flags(prefix, n, proj, data_type="sft", sft_whole_seq=1, magic_prime=0,
                                           random_seed=seed))
        train.check_machine(args)
        train.plan_epochs(args, train.check_data(args))
        module = train.TrainData(args, epoch_begin=0, n_epochs=1, n_steps=4)
        module.trainer = SimpleNamespace(global_rank=0, world_size=1)
        return [x.tolist() for x, _, _ in module.train_dataloader()]

    def expected(seed: int) -> list[list[list[int]]]:
        ds = SFTDataset(prefix, CTX, whole_sequence=True, seed=seed, micro_bsz=MICRO_BSZ,
                        samples_per_epoch=4 * MICRO_BSZ)
        return [[ds[i][0].tolist() for i in range(b * MICRO_BSZ, (b + 1) * MICRO_BSZ)] for b in range(4)]

    assert batches(5) == expected(5) != expected(6)
    assert batches(-1) == expected(0)


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float32),
                                             ("fp32", torch.float32), ("tf32", torch.float32)])
def test_stage_1_writes_bf16_weights_only_for_bf16(tmp_path: Path, precision: str, dtype: torch.dtype) -> None:
    """SPEC section 4: rwkv-init.pth is bf16 when --precision is bf16; fp32 otherwise (fp16 trains fp32
    master weights, and bf16 would lose precision fp16 keeps)."""
    assert train.main(["--train_stage", "1", "--proj_dir", str(tmp_path), "--precision", precision,
                       *as_flags(MODEL)]) == 0
    assert {v.dtype for v in torch.load(tmp_path / "rwkv-init.pth", weights_only=True).values()} == {dtype}


def test_cli_reports_a_problem_in_one_line_with_exit_status_2(data: tuple[Path, int], proj: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """A problem the user must fix: exit status 2 and one line naming it, no traceback."""
    prefix, n = data
    assert train.cli(tiny_flags(prefix, n, proj, micro_bsz=0)) == 2
    assert capsys.readouterr().err == "error: --micro_bsz must be >= 1, got 0\n"


def test_cli_destroys_a_gloo_process_group_before_it_returns(data: tuple[Path, int], proj: Path) -> None:
    """A CPU rank that leaves with its gloo group alive can abort at interpreter exit (gloo's threads still
    hold tensors): cli() destroys the group on its way out, after an error too. One rank, in-process store."""
    prefix, n = data
    dist = torch.distributed
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        dist.all_reduce(torch.ones(3))                  # the group has done work, as a training rank's has
        assert train.cli(tiny_flags(prefix, n, proj, micro_bsz=0)) == 2
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
