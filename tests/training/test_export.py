"""Export writes model.onnx + model.ts + manifest.json per docs/artifact.md behind the parity
gate, and leaves nothing behind when it refuses."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from nextchar.training import cli, export
from nextchar.training.errors import ExportError, ParityError
from nextchar.training.export import build_random_artifact

VOCAB = "\n abcdefghij.,"


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_random_artifact_follows_the_contract(cell: str, tmp_path: Path) -> None:
    art = build_random_artifact(tmp_path / "art", VOCAB, cell=cell, hidden_size=12, seed=3)
    m = json.loads((art / "manifest.json").read_text("utf-8"))
    # Every file is pinned by the manifest (the CPU-fast Loop graph rides along as a third).
    assert {"model.onnx", "model.ts"} <= set(m["files"])
    assert sorted(p.name for p in art.iterdir()) == sorted([*m["files"], "manifest.json"])
    S = 4 if cell == "lstm" else 2
    assert m["format"] == "nextchar-artifact" and m["format_version"] == 1
    assert m["vocab"] == list(VOCAB) and m["unk_id"] is None
    assert m["model"] == {"vocab_size": len(VOCAB), "embed_dim": 8, "hidden_size": 12,
                          "num_layers": 2, "cell": cell, "dropout": 0.0}
    assert m["state_layers"] == S
    assert m["inputs"] == [
        {"name": "ids", "dtype": "int64", "shape": ["B", "T"]},
        {"name": "lengths", "dtype": "int64", "shape": ["B"]},
        {"name": "state", "dtype": "float32", "shape": [S, "B", 12]},
    ]
    assert m["outputs"] == [
        {"name": "logits", "dtype": "float32", "shape": ["B", len(VOCAB)]},
        {"name": "state_out", "dtype": "float32", "shape": [S, "B", 12]},
        {"name": "position_logits", "dtype": "float32", "shape": ["B", "T", len(VOCAB)]},
    ]
    for name in m["files"]:
        data = (art / name).read_bytes()
        assert m["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert m["onnx_opset"] == 17
    assert set(m["versions"]) == {"torch", "onnx", "onnxruntime", "nextchar"}
    assert re.fullmatch(r"\d{8}-\d{6}", m["version"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", m["created_at"])
    assert m["parity"]["tolerance"] == 1e-4 and m["parity"]["cases"] >= 12
    assert max(m["parity"]["max_abs_diff"].values()) <= 1e-4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_version_override_and_replacing_an_artifact(tmp_path: Path) -> None:
    art = build_random_artifact(tmp_path / "art", VOCAB, version="v1")
    art = build_random_artifact(tmp_path / "art", VOCAB, version="v2", seed=1)
    assert json.loads((art / "manifest.json").read_text())["version"] == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    with pytest.raises(ExportError, match="not empty"):
        build_random_artifact(target, VOCAB)
    assert (target / "notes.txt").read_text() == "precious"


def _tampered_trace(original):
    """Traces a copy whose output bias drifted by 1e-3 (the trace shares the weights it was
    traced with, so the copy keeps eager untouched)."""
    def trace(model, example):
        drifted = copy.deepcopy(model)
        with torch.no_grad():
            drifted.head.bias.add_(1e-3)
        return original(drifted, example)
    return trace


def test_gate_refuses_a_tampered_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "_trace", _tampered_trace(export._trace))
    with pytest.raises(ParityError, match="torchscript logits differs from eager"):
        build_random_artifact(tmp_path / "art", VOCAB)
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temp folder left


def test_gate_refuses_what_onnx_checker_rejects(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    original = export._export_onnx

    def broken_export(model, example, path):
        original(model, example, path)
        graph = onnx.load(str(path))
        graph.graph.node[0].input[0] = "no_such_tensor"  # an input nothing produces
        onnx.save(graph, str(path))

    monkeypatch.setattr(export, "_export_onnx", broken_export)
    with pytest.raises(ExportError, match="onnx.checker rejects"):
        build_random_artifact(tmp_path / "art", VOCAB)
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_a_refused_gate_in_one_line(hello_run: tuple[Path, dict], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(export, "_trace", _tampered_trace(export._trace))
    assert cli.main(["export", str(hello_run[0]), "-o", str(tmp_path / "art")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: parity gate: ") and err.count("\n") == 1
    assert not (tmp_path / "art").exists()


def test_export_of_a_checkpoint_file(hello_run: tuple[Path, dict], tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["export", str(hello_run[0] / "checkpoint.pt"), "-o",
                     str(tmp_path / "art"), "--version", "20261127-101500"]) == 0
    assert "parity gate passed" in capsys.readouterr().out
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert m["version"] == "20261127-101500" and m["name"] == "hello-rnn"
    assert m["training"]["predicted"] == "ohlol"
