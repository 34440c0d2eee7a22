"""Checkpoints load with weights_only=True; a corrupt, truncated or missing one is one clear
line and exit 1, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nextchar.training import cli
from nextchar.training.checkpoint import load_checkpoint, save_checkpoint
from nextchar.training.errors import CheckpointError


@pytest.fixture
def good_checkpoint(hello_run: tuple[Path, dict]) -> Path:
    return hello_run[0] / "checkpoint.pt"


def test_plain_torch_load_weights_only(good_checkpoint: Path) -> None:
    ckpt = torch.load(good_checkpoint, weights_only=True)
    assert ckpt["format"] == "nextchar-checkpoint"
    assert isinstance(ckpt["model_state"]["embed.weight"], torch.Tensor)


def _damaged(good: Path, tmp_path: Path, kind: str) -> Path:
    bad = tmp_path / "run" / "checkpoint.pt"
    bad.parent.mkdir()
    data = good.read_bytes()
    if kind == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        bad.write_bytes(b"not a checkpoint at all\n" * 10)
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "flipped":
        mid = len(data) // 2
        bad.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 64]) +
                        data[mid + 64 :])
    return bad


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "flipped"])
def test_damaged_checkpoint_is_one_line(kind: str, good_checkpoint: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    bad = _damaged(good_checkpoint, tmp_path, kind)
    code = cli.main(["export", str(bad.parent), "-o", str(tmp_path / "art")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"nextchar export: {bad}") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "art").exists()


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nowhere")


def test_not_a_nextchar_checkpoint(tmp_path: Path) -> None:
    torch.save({"model": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a nextchar checkpoint"):
        load_checkpoint(tmp_path / "x.pt")


def test_wrong_shapes_are_a_clear_error(good_checkpoint: Path, tmp_path: Path) -> None:
    from nextchar.training.export import export_artifact

    ckpt = load_checkpoint(good_checkpoint)
    ckpt["model_config"]["hidden_size"] = 9
    save_checkpoint(tmp_path / "c.pt", ckpt)
    with pytest.raises(CheckpointError, match="does not describe a valid model"):
        export_artifact(tmp_path / "c.pt", tmp_path / "art")


def test_real_process_exit_status(good_checkpoint: Path, tmp_path: Path) -> None:
    bad = _damaged(good_checkpoint, tmp_path, "truncated")
    proc = subprocess.run([sys.executable, "-m", "nextchar.training.cli", "export",
                           str(bad), "-o", str(tmp_path / "art")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("nextchar export: ") and "Traceback" not in proc.stderr
