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
from nextchar.training.checkpoint import save_checkpoint
from nextchar.training.errors import ExportError, ParityError
from nextchar.training.export import build_random_artifact
from nextchar.training.model import CharRNN, CharRNNConfig
from nextchar.training.onnx_loop import build_loop_graph as export_loop

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
                          "num_layers": 2, "cell": cell, "dropout": 0.0, "embed_dropout": 0.0}
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
    assert m["parity"]["cases"] >= 12 and m["parity"]["failed"] == {}
    assert 1e-4 <= m["parity"]["tolerance"] < 1e-3
    assert set(m["parity"]["max_abs_diff"]) == {"torchscript", "onnxruntime", "onnxruntime_loop"}
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


def _tampered_trace(original, delta: float = 1e-2):
    """Traces a copy whose output bias drifted in one element (a uniform shift of every logit
    would not change a probability; the trace shares the weights it was traced with, so the
    copy keeps eager untouched)."""
    def trace(model, example):
        drifted = copy.deepcopy(model)
        with torch.no_grad():
            drifted.head.bias[1] += delta
        return original(drifted, example)
    return trace


def test_a_wrong_graph_is_left_out_and_the_rest_written(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "_trace", _tampered_trace(export._trace))
    art = build_random_artifact(tmp_path / "art", VOCAB)
    m = json.loads((art / "manifest.json").read_text())
    assert set(m["files"]) == {"model.onnx", "model_loop.onnx"}
    assert not (art / "model.ts").exists()
    assert "torchscript logits: log-probabilities differ from eager" in \
        m["parity"]["failed"]["torchscript"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_gate_refuses_when_no_graph_passes(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "_trace", _tampered_trace(export._trace))
    original = export._export_onnx

    def drifted_onnx(model, example, path):
        drifted = copy.deepcopy(model)
        with torch.no_grad():
            drifted.head.bias[1] += 1e-2
        original(drifted, example, path)

    monkeypatch.setattr(export, "_export_onnx", drifted_onnx)
    monkeypatch.setattr(export, "build_loop_graph", lambda model, opset: _corrupted_loop(
        model, opset))
    with pytest.raises(ParityError, match="no graph passed"):
        build_random_artifact(tmp_path / "art", VOCAB)
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temp folder left


def _corrupted_loop(model, opset: int):
    """The real Loop graph with one weight of its recurrent matrix changed by 0.05."""
    from onnx import numpy_helper

    graph = export_loop(model, opset)
    for init in graph.graph.initializer:
        if init.name.startswith("whh"):
            w = numpy_helper.to_array(init).copy()
            w.flat[3] += 0.05
            init.CopyFrom(numpy_helper.from_array(w, init.name))
            return graph
    raise AssertionError("no recurrent weight in the loop graph")


def test_a_corrupted_loop_graph_weight_is_refused(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(export, "build_loop_graph", _corrupted_loop)
    art = build_random_artifact(tmp_path / "art", VOCAB, cell="lstm", hidden_size=16)
    m = json.loads((art / "manifest.json").read_text())
    assert "model_loop.onnx" not in m["files"] and not (art / "model_loop.onnx").exists()
    assert m["parity"]["failed"]["onnxruntime_loop"].startswith("onnxruntime_loop ")
    assert set(m["files"]) == {"model.onnx", "model.ts"}


def test_large_logits_export_every_graph(tmp_path: Path) -> None:
    """A trained model's logits reach 20-30; float32 summation order then moves them by
    ~1e-4, which a fixed absolute bound on raw logits refused. Scaled weights stand in for
    training."""
    torch.manual_seed(0)
    model = CharRNN(CharRNNConfig(len(VOCAB), 16, 64, 2, "lstm"))
    with torch.no_grad():
        model.head.weight.mul_(100.0)
        model.rnn.weight_hh_l1.mul_(3.0)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint.pt", {
        "name": "big-logits", "model_config": model.config.to_dict(), "vocab": list(VOCAB),
        "unk_id": None, "model_state": model.state_dict(), "metrics": {}})
    art = export.export_artifact(run, tmp_path / "art")
    m = json.loads((art / "manifest.json").read_text())
    assert m["parity"]["max_abs_logit"] > 20, m["parity"]
    assert m["parity"]["failed"] == {}
    assert set(m["files"]) == {"model.onnx", "model_loop.onnx", "model.ts"}


def test_gate_leaves_out_what_onnx_checker_rejects(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    original = export._export_onnx

    def broken_export(model, example, path):
        original(model, example, path)
        graph = onnx.load(str(path))
        graph.graph.node[0].input[0] = "no_such_tensor"  # an input nothing produces
        onnx.save(graph, str(path))

    monkeypatch.setattr(export, "_export_onnx", broken_export)
    art = build_random_artifact(tmp_path / "art", VOCAB)
    m = json.loads((art / "manifest.json").read_text())
    assert "onnx.checker rejects" in m["parity"]["failed"]["onnxruntime"]
    assert set(m["files"]) == {"model_loop.onnx", "model.ts"}


def test_cli_warns_about_a_left_out_graph_in_one_line(hello_run: tuple[Path, dict],
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(export, "_trace", _tampered_trace(export._trace, delta=0.5))
    assert cli.main(["export", str(hello_run[0]), "-o", str(tmp_path / "art")]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("nextchar export: warning: model.ts left out of the artifact: ")
    assert err.count("\n") == 1
    assert "parity gate passed for 2 of 3 graphs" in out
    assert "onnxruntime model.onnx" in out and "onnxruntime_loop model_loop.onnx" in out


def test_export_of_a_checkpoint_file(hello_run: tuple[Path, dict], tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["export", str(hello_run[0] / "checkpoint.pt"), "-o",
                     str(tmp_path / "art"), "--version", "20261127-101500"]) == 0
    out = capsys.readouterr().out
    assert "parity gate passed for 3 of 3 graphs" in out
    # Every graph's measured error is printed, the Loop graph's too (issue 18, item 14).
    assert all(f"{g} " in out for g in ("torchscript", "onnxruntime", "onnxruntime_loop"))
    assert "checkpoint: checkpoint.pt, step 25" in out
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert m["version"] == "20261127-101500" and m["name"] == "hello-rnn"
    assert m["training"]["predicted"] == "ohlol"


# -- what export refuses before it writes anything, and what it no longer refuses -----------
def _run_with_best(hello_run: tuple[Path, dict], tmp_path: Path) -> Path:
    """A run folder whose best.pt is intact (the hello model) and whose checkpoint.pt is not."""
    run = tmp_path / "run"
    run.mkdir()
    good = (hello_run[0] / "checkpoint.pt").read_bytes()
    (run / "best.pt").write_bytes(good)
    (run / "checkpoint.pt").write_bytes(good[:3000])
    return run


def test_a_corrupt_checkpoint_pt_does_not_block_an_intact_best(hello_run: tuple[Path, dict],
                                                               tmp_path: Path,
                                                               capsys: pytest.CaptureFixture
                                                               ) -> None:
    run = _run_with_best(hello_run, tmp_path)
    assert cli.main(["export", str(run / "best.pt"), "-o", str(tmp_path / "art")]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("nextchar export: warning: the run's last step is left out of the "
                          f"manifest: {run / 'checkpoint.pt'} is not a readable checkpoint")
    assert err.count("\n") == 1 and "checkpoint: best.pt, step 25" in out
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert "last_step" not in m["checkpoint"] and m["checkpoint"]["warning"]


@pytest.mark.parametrize("flag, value", [
    ("--name", "team/model"), ("--name", "a\tb"), ("--name", "-x"), ("--name", ""),
    ("--version", "v 1"), ("--version", "1\n2"), ("--version", "x" * 129)])
def test_names_and_versions_a_server_cannot_route_are_refused(flag: str, value: str,
                                                              hello_run: tuple[Path, dict],
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture
                                                              ) -> None:
    assert cli.main(["export", str(hello_run[0]), "-o", str(tmp_path / "art"),
                     f"{flag}={value}"]) == 1
    err = capsys.readouterr().err
    assert err == (f"nextchar export: {flag} {value!r} is refused: names and versions take "
                   "letters, digits, '.', '_' and '-' only (at most 128, the first a letter or "
                   "digit)\n")
    assert list(tmp_path.iterdir()) == []


def test_the_default_names_are_valid() -> None:
    from datetime import datetime, timezone

    from nextchar.training.names import name_problem

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")  # export's default version
    for value in ("shakespeare-lstm", "corpus-gru", "hello-rnn", "random-rnn", "nextchar-lstm",
                  "bench-rnn-h256", "20261202-052127", "v1", "1.2.0", stamp):
        assert name_problem(value, "--name") is None, value


@pytest.mark.parametrize("out", ["", "."])
def test_an_unwritable_out_is_refused_up_front(out: str, hello_run: tuple[Path, dict],
                                               tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(export, "_trace", lambda *a: pytest.fail("the export ran"))
    assert cli.main(["export", str(hello_run[0]), "-o", out]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nextchar export: -o ") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_files_beside_an_artifact_are_not_deleted(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    art = build_random_artifact(tmp_path / "art", VOCAB)
    (art / "NOTES.md").write_text("notes")
    (art / "keep").mkdir()
    before = sorted(p.name for p in art.iterdir())
    run = tmp_path / "run"
    model = CharRNN(CharRNNConfig(len(VOCAB), 4, 8, 1, "rnn"))
    save_checkpoint(run / "checkpoint.pt", {"name": "x", "model_config": model.config.to_dict(),
                                            "vocab": list(VOCAB), "model_state":
                                                model.state_dict()})
    assert cli.main(["export", str(run), "-o", str(art)]) == 1
    assert capsys.readouterr().err == (
        f"nextchar export: {art} holds an artifact and also NOTES.md, keep/, which replacing "
        "it would delete: move them away or choose another -o\n")
    assert sorted(p.name for p in art.iterdir()) == before


def test_non_finite_weights_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = CharRNN(CharRNNConfig(len(VOCAB), 4, 8, 1, "gru"))
    state = model.state_dict()
    state["head.bias"][2] = float("nan")
    path = tmp_path / "diverged.pt"
    save_checkpoint(path, {"name": "x", "model_config": model.config.to_dict(),
                           "vocab": list(VOCAB), "model_state": state})
    assert cli.main(["export", str(path), "-o", str(tmp_path / "art")]) == 1
    assert capsys.readouterr().err == (
        f"nextchar export: {path} holds non-finite weights (nan in head.bias): the run "
        "diverged; use an earlier checkpoint or train again with a lower --lr\n")
    assert not (tmp_path / "art").exists()


def test_sigterm_during_export_leaves_no_temporary_folder(hello_run: tuple[Path, dict],
                                                          tmp_path: Path,
                                                          capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    import os
    import signal

    original = export._trace

    def trace_then_terminated(model, example):
        os.kill(os.getpid(), signal.SIGTERM)  # as `docker stop` would, mid-export
        return original(model, example)

    monkeypatch.setattr(export, "_trace", trace_then_terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["export", str(hello_run[0]), "-o", str(tmp_path / "art")]) == 143
    assert capsys.readouterr().err == "nextchar export: terminated\n"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_model_ts_follows_its_inputs_device(cell: str, tmp_path: Path) -> None:
    """The trace recorded the tracing device (the CPU) as constants (the batch order moved
    with .to(x.device), an arange, lengths.to(ids.device)), so model.ts failed on CUDA. The one
    device left is the lengths' move to the CPU, where packing reads them on every device."""
    art = build_random_artifact(tmp_path / "art", VOCAB, cell=cell, hidden_size=12, seed=3)
    scripted = torch.jit.load(str(art / "model.ts"), map_location="meta")
    devices = [n for n in scripted.graph.nodes() if n.kind() == "prim::Constant"
               and str(n.output().type()) == "Device"]
    assert len(devices) == 1, scripted.code
    (use,) = devices[0].output().uses()
    assert use.user.kind() == "aten::to"
    # ... read by the sort before packing, and by type_as, which moves them to ids' device.
    assert sorted(u.user.kind() for u in use.user.output().uses()) == ["aten::sort",
                                                                       "aten::type_as"]
    # Runs on another device than it was traced on: meta stands in for CUDA on this machine.
    S = 4 if cell == "lstm" else 2
    ids = torch.zeros(3, 5, dtype=torch.int64, device="meta")
    logits, state_out, positions = scripted(ids, torch.tensor([5, 2, 3]),
                                            torch.zeros(S, 3, 12, device="meta"))
    assert [(t.device.type, tuple(t.shape)) for t in (logits, state_out, positions)] == [
        ("meta", (3, len(VOCAB))), ("meta", (S, 3, 12)), ("meta", (3, 5, len(VOCAB)))]
