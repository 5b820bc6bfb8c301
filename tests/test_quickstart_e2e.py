"""End to end: the quickstart script itself (make_data -> init -> pretrain -> SFT -> chat -> eval) on
the bundled sample, at a smaller size than the README's run."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def mini_epoch_losses(log: Path) -> list[float]:
    return [float(m.group(1)) for line in log.read_text().splitlines()
            if (m := re.match(r"epoch \d+ loss ([0-9.]+)", line))]


@pytest.mark.slow
def test_quickstart_chain_on_cpu(tmp_path: Path) -> None:
    # A space in OUT_DIR: make_data's printed flags must reach the demo scripts as whole words.
    qs = tmp_path / "quick start"
    env = dict(os.environ, SKIP_SETUP="1", VENV_DIR=sys.prefix, OUT_DIR=str(qs),
               N_LAYER="1", N_EMBD="64", CTX_LEN="128", M_BSZ="8", PRETRAIN_EPOCHS="1", SFT_EPOCHS="1",
               EPOCH_STEPS="25", THREADS="1", PROMPT="Copy these words: cat dog")
    r = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("pretrain-run", "sft-run"):
        losses = mini_epoch_losses(qs / stage / "train_log.txt")
        assert len(losses) >= 3, stage
        assert losses[-1] < 0.8 * losses[0], (stage, losses)     # the loss falls in every stage
    assert (qs / "pretrain-run" / "rwkv-init.pth").is_file() and (qs / "sft-run" / "rwkv-final.pth").is_file()
    out = r.stdout
    chat = out.split("5/6 chat")[1].split("==== [quickstart] 6/6")[0]
    answer_lines = [l for l in chat.splitlines()[1:] if l.strip() and not l.startswith("RWKV-7 ")]
    assert answer_lines, chat                                   # the chat printed an answer
    scores = re.findall(r"\[eval\] (.+?): accuracy ([0-9.]+)%", out)
    assert [s[0] for s in scores] == ["untrained init", "after pretrain + SFT"]
    assert float(scores[0][1]) < 5.0
