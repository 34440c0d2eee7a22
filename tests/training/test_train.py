"""The language-model loop on tiny text: checkpoint, curve, resume, export, errors, and DDP
with two processes under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nextchar.training import cli
from nextchar.training.train import TrainConfig, lr_at

TINY = ["--hidden-size", "16", "--embed-dim", "8", "--batch-size", "4", "--bptt", "16",
        "--eval-every", "3", "--warmup-steps", "2", "--threads", "1", "--no-progress"]


def _train(*args: str) -> int:
    return cli.main(["train", *args])


def test_train_checkpoint_resume_export(tiny_corpus: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert _train("--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "4", *TINY) == 0
    out = capsys.readouterr().out
    assert "step 3: val" in out and "bits/char" in out and "done: 4 steps" in out
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["metrics"]["steps"] == 4
    assert ckpt["vocab"] == sorted(set(ckpt["vocab"]))
    assert ckpt["model_config"]["cell"] == "lstm" and ckpt["train_config"]["seed"] == 1337
    assert ckpt["metrics"]["val_bits_per_char"] > 0 and ckpt["metrics"]["val_full"]
    assert (run / "loss.png").stat().st_size > 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4

    # An existing run is neither silently replaced nor silently continued.
    assert _train("--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "6", *TINY) == 1
    assert "pass --resume" in capsys.readouterr().err

    assert _train("--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "6",
                  "--resume", *TINY) == 0
    assert "resuming" in capsys.readouterr().out
    resumed = torch.load(run / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == 6 and resumed["history"]["val"]["step"][0] == 3

    assert cli.main(["export", str(run), "-o", str(tmp_path / "art")]) == 0
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["training"]["steps"] == 6 and manifest["model"]["cell"] == "lstm"
    assert manifest["name"] == "corpus-lstm"


def test_same_seed_same_weights(tiny_corpus: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert _train("--corpus", str(tiny_corpus), "--out", str(tmp_path / name),
                      "--max-steps", "3", "--cell", "gru", *TINY) == 0
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model_state"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_corpus_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _train("--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "r")) == 1
    err = capsys.readouterr().err
    assert err == f"nextchar train: corpus path not found: {tmp_path / 'nope'}\n"


def test_resume_without_a_checkpoint(tiny_corpus: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    assert _train("--corpus", str(tiny_corpus), "--out", str(tmp_path / "r"), "--resume",
                  *TINY) == 1
    assert capsys.readouterr().err.startswith("nextchar train: no checkpoint at")


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = TrainConfig(lr=1e-2, warmup_steps=10, min_lr_ratio=0.1, max_steps=100)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(1e-3)
    assert lr_at(cfg, 10, 0.1) == pytest.approx(1e-3 + 9e-3 * 0.5 * (1 + 0.9510565))
    assert lr_at(cfg, 99, 1.0) == pytest.approx(1e-3)


def test_ddp_two_processes(tiny_corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "nextchar.training.cli", "train", "--corpus", str(tiny_corpus), "--out", str(run),
         "--max-steps", "3", *TINY],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["metrics"]["world_size"] == 2 and ckpt["step"] == 3
    assert ckpt["chars_seen"] == 3 * 2 * 4 * 16
    assert proc.stdout.count("done: 3 steps") == 1  # only rank 0 reports and writes
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "loss.png", "metrics.json"]
