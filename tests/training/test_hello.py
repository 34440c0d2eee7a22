"""The seed's task: all three seed models learn hello -> ohlol, and the exported embedding
model answers it too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nextchar.training import cli, hello
from nextchar.training.checkpoint import load_checkpoint


def test_all_three_seed_models_predict_ohlol(hello_run: tuple[Path, dict]) -> None:
    _, result = hello_run
    assert {k: m["predicted"] for k, m in result["models"].items()} == {
        "onehot_rnncell": "ohlol", "onehot_rnn": "ohlol", "embedding_rnn": "ohlol"}
    assert result["all_ohlol"] is True


def test_hello_checkpoint_is_a_plain_run(hello_run: tuple[Path, dict]) -> None:
    run, result = hello_run
    ckpt = load_checkpoint(run)  # weights_only=True inside
    assert ckpt["vocab"] == ["e", "h", "l", "o"]
    assert ckpt["model_config"]["cell"] == "rnn"
    assert ckpt["metrics"]["predicted"] == "ohlol"
    assert (run / "loss.png").stat().st_size > 0
    assert result["checkpoint"] == str(run / "checkpoint.pt")


def test_cli_prints_the_seed_style_epochs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["train", "--preset", "hello", "--out", str(tmp_path / "h")]) == 0
    out = capsys.readouterr().out
    for plan in hello.PLANS:
        assert f"Predicted: o h l o l, Epoch [{plan.epochs}/{plan.epochs}] loss = " in out
    assert "all three seed models predict 'ohlol'" in out


def test_exported_hello_answers_ohlol(hello_run: tuple[Path, dict], tmp_path: Path) -> None:
    import onnxruntime as ort
    import torch

    from nextchar.training.export import export_artifact

    run, _ = hello_run
    art = export_artifact(run, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    vocab = manifest["vocab"]
    ids = np.array([[vocab.index(c) for c in "hello"]], dtype=np.int64)
    lengths = np.array([5], dtype=np.int64)
    state = np.zeros((manifest["state_layers"], 1, manifest["model"]["hidden_size"]), np.float32)
    session = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    _, _, position_logits = session.run(None, {"ids": ids, "lengths": lengths, "state": state})
    assert "".join(vocab[i] for i in position_logits[0].argmax(-1)) == "ohlol"
    scripted = torch.jit.load(str(art / "model.ts"))
    _, _, position_logits = scripted(torch.from_numpy(ids), torch.from_numpy(lengths),
                                     torch.from_numpy(state))
    assert "".join(vocab[i] for i in position_logits[0].argmax(-1).tolist()) == "ohlol"


def test_cli_refuses_what_a_language_model_refuses(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """Only --corpus/--resume were checked: these trained and exited 0, --name dropped."""
    out = tmp_path / "h"
    for args, message in [
        (["--hidden-size", "0"], "--hidden-size must be >= 1, got 0"),
        (["--lr", "nan"], "--lr must be >= 0 and finite, got nan"),
        (["--max-steps", "-5"], "--max-steps must be >= 1"),
        (["--seed", "-3"], "--seed must be >= 0 and finite, got -3"),
        (["--threads", "0"], "--threads must be in 1..1024, got 0"),
        (["--max-minutes", "-1"], "--max-minutes must be > 0 and finite, got -1.0"),
        (["--name", "bad name/x"], "--name 'bad name/x' is refused: names and versions take "
                                   "letters, digits, '.', '_' and '-' only (at most 128, the "
                                   "first a letter or digit)"),
    ]:
        assert cli.main(["train", "--preset", "hello", "--out", str(out), "--quiet",
                         *args]) == 1, args
        assert capsys.readouterr().err == f"nextchar train: {message}\n"
        assert not out.exists()


def test_cli_names_what_the_preset_ignores_and_takes_name(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture
                                                           ) -> None:
    out = tmp_path / "h"
    assert cli.main(["train", "--preset", "hello", "--out", str(out), "--quiet",
                     "--hidden-size", "16", "--lr", "0.5", "--state", "reset",
                     "--name", "hi"]) == 0
    assert capsys.readouterr().err == (
        "nextchar train: warning: --preset hello trains its fixed models (sizes, epochs, "
        "learning rate and seeds): ignoring --hidden-size 16, --state reset, --lr 0.5\n")
    ckpt = load_checkpoint(out)
    assert ckpt["name"] == "hi" and ckpt["model_config"]["hidden_size"] == 8
