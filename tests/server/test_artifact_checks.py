"""A manifest that does not describe its graph files is refused when the model loads, in one
line that names the mismatch: an unknown-character id outside the vocabulary, a vocab_size
that is not the vocabulary's, graph files from another export (a hand-assembled artifact)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nextchar.server.artifact import load_artifact
from nextchar.server.errors import ArtifactError


@pytest.fixture
def edited(tmp_path: Path, tiny_artifact: Path) -> Callable[[Callable[[dict[str, Any]], None]], Path]:
    def make(edit: Callable[[dict[str, Any]], None]) -> Path:
        art = tmp_path / "art"
        shutil.copytree(tiny_artifact, art)
        manifest = json.loads((art / "manifest.json").read_text())
        edit(manifest)
        (art / "manifest.json").write_text(json.dumps(manifest))
        return art

    return make


@pytest.mark.parametrize("unk_id", [999, "len(vocab)", -1, "x", True, 1.0])
def test_an_unk_id_outside_the_vocabulary_is_refused(edited, unk_id: Any) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["unk_id"] = len(m["vocab"]) if unk_id == "len(vocab)" else unk_id

    art = edited(edit)
    n = len(json.loads((art / "manifest.json").read_text())["vocab"])
    unk_id = n if unk_id == "len(vocab)" else unk_id
    with pytest.raises(ArtifactError) as e:
        load_artifact(art)
    assert str(e.value) == (f"{art / 'manifest.json'}: unk_id must be null or an id of the "
                            f"vocabulary (0..{n - 1}), got {unk_id!r}")


def test_an_unk_id_in_the_vocabulary_loads(edited) -> None:
    assert load_artifact(edited(lambda m: m.update(unk_id=0))).unk_id == 0


def test_a_vocab_size_that_is_not_the_vocabularys_is_refused(edited) -> None:
    art = edited(lambda m: m["model"].update(vocab_size=99))
    with pytest.raises(ArtifactError, match=r"model.vocab_size is 99 but vocab holds \d+ "
                                            r"characters$"):
        load_artifact(art)


@pytest.mark.parametrize("graph", ["loop", "standard"])
def test_onnx_graphs_that_do_not_match_the_manifest_are_named(edited, graph: str) -> None:
    from nextchar.server.backends.onnx import OnnxBackend

    art = edited(lambda m: m["model"].update(hidden_size=32))
    with pytest.raises(ArtifactError) as e:
        OnnxBackend(load_artifact(art), onnx_graph=graph)
    name = "model_loop.onnx" if graph == "loop" else "model.onnx"
    assert str(e.value) == (f"{art / name}: does not match its manifest: state has dimension 16 "
                            f"at axis 2 (shape [2, 'B', 16]), the manifest's model.hidden_size "
                            f"says 32; re-export the artifact")


@pytest.fixture
def root_logging() -> Iterator[None]:
    """`nextchar serve` in-process configures the root logger on this test's stderr; later
    tests must not log into that closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_serve_says_which_shape_a_torchscript_graph_refused(edited, capfd, root_logging) -> None:
    """TorchScript declares no shapes: its warm-up finds it, and the line says what was tried."""
    from nextchar.client.cli import main

    art = edited(lambda m: m["model"].update(hidden_size=32))
    code = main(["serve", "--model", str(art), "--backend", "torchscript", "--port", "0",
                 "--no-http"])
    err = capfd.readouterr().err.strip().splitlines()  # the log's lines, then the refusal
    assert code == 1 and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith(f"nextchar serve: {art}: warm-up: the model failed on an input "
                              f"shaped as its manifest says (state [2, B, 32], "), err[-1]
    assert "The following operation failed" not in err[-1]
