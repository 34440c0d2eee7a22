"""The CLI's multi-model commands against a real server on a model repository: `nextchar models`,
`load`/`unload`, `--model` on predict/generate/info/batch/reload, `--priority`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from nextchar.client.cli import main as cli_main

VOCABS = {"letters": "abcdefghijklmnopqrstuvwxyz ", "digits": "0123456789+="}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nextchar.training.export import build_random_artifact

    root = tmp_path_factory.mktemp("repo") / "models"
    for i, (name, vocab) in enumerate(VOCABS.items()):
        src = build_random_artifact(root.parent / f"src-{name}", vocab=vocab, cell="gru",
                                    embed_dim=8, hidden_size=16, num_layers=1, seed=i, name=name)
        shutil.copytree(src, root / name / "1")
    return root


@pytest.fixture(scope="module")
def repo_server(repository: Path, tiny_server: Any) -> Any:
    with type(tiny_server)(model_repository=repository, default_model="letters") as st:
        yield st


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def models_table(capsys: pytest.CaptureFixture[str], address: str) -> dict[str, list[str]]:
    code, out, err = run(capsys, "models", "--server", address)
    assert code == 0, err
    lines = out.splitlines()
    assert [line for line in lines if line != line.rstrip()] == []  # no padding at line ends
    assert lines[0].split()[:4] == ["NAME", "VERSION", "STATE", "DEFAULT"]
    return {line.split()[0]: line.split()[1:] for line in lines[1:]}


def test_models_lists_each_model_with_its_version_state_and_default(repo_server, capsys) -> None:
    table = models_table(capsys, repo_server.address)
    assert table["letters"] == ["1", "READY", "yes"]
    assert table["digits"] == ["1", "READY"]
    code, out, _ = run(capsys, "models", "--server", repo_server.address, "--json")
    listing = json.loads(out)
    assert code == 0 and listing["default_model"] == "letters"
    assert {m["name"]: m["state"] for m in listing["models"]} == {
        "letters": "MODEL_STATE_READY", "digits": "MODEL_STATE_READY"}


def test_predict_generate_info_by_model_name(repo_server, capsys) -> None:
    address = repo_server.address
    code, out, err = run(capsys, "predict", "--server", address, "--model", "digits",
                         "--priority", "high", "--json", "12+")
    assert code == 0, err
    assert all(t["char"] in VOCABS["digits"] for t in json.loads(out)["top"])
    code, out, err = run(capsys, "generate", "--server", address, "--model", "digits",
                         "--priority", "low", "--max-chars", "5", "--seed", "1", "1")
    assert code == 0, err
    assert set(out.strip()) <= set(VOCABS["digits"])
    code, out, _ = run(capsys, "info", "--server", address, "--model", "digits")
    info = json.loads(out)
    assert (info["name"], info["version"]) == ("digits", "1")
    assert info["vocab"] == list(VOCABS["digits"])
    code, _, err = run(capsys, "predict", "--server", address, "--model", "nope", "ab")
    assert code == 1
    assert err.startswith("nextchar predict: NOT_FOUND: ") and "digits" in err


def test_batch_by_model_name_in_the_low_lane(repo_server, tmp_path: Path, capsys) -> None:
    (tmp_path / "in.txt").write_text("12+3\n4=\n")
    code, _, err = run(capsys, "batch", str(tmp_path / "in.txt"), "-o", str(tmp_path / "o.jsonl"),
                       "--server", repo_server.address, "--model", "digits", "--no-progress")
    assert code == 0, err
    meta = json.loads((tmp_path / "o.jsonl.meta.json").read_text())
    assert meta["model"]["name"] == "digits"
    records = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == ["12+3", "4="] and all("top" in r for r in records)


def test_unload_then_load(repo_server, capsys) -> None:
    address = repo_server.address
    code, out, err = run(capsys, "unload", "--server", address, "digits")
    assert code == 0, err
    assert json.loads(out) == {"model": "digits", "version": "1"}
    # Unload answers once new calls are refused; the runtime then closes in the background
    # (UNLOADING, as Triton's index shows while its last calls finish), then UNAVAILABLE.
    states = [models_table(capsys, address)["digits"][1]]
    deadline = time.monotonic() + 10
    while states[-1] == "UNLOADING" and time.monotonic() < deadline:
        time.sleep(0.05)
        states.append(models_table(capsys, address)["digits"][1])
    assert set(states) <= {"UNLOADING", "UNAVAILABLE"} and states[-1] == "UNAVAILABLE", states
    code, _, err = run(capsys, "predict", "--server", address, "--model", "digits", "1")
    assert code == 1 and "NOT_FOUND" in err
    code, out, err = run(capsys, "load", "--server", address, "digits")
    assert code == 0, err
    assert json.loads(out)["version"] == "1"
    assert models_table(capsys, address)["digits"] == ["1", "READY"]
    code, _, err = run(capsys, "unload", "--server", address, "nope")
    assert code == 1 and err.startswith("nextchar unload: NOT_FOUND: ")


def test_reload_by_model_name_says_why_nothing_changed(repo_server, capsys) -> None:
    code, out, err = run(capsys, "reload", "--server", repo_server.address, "--model", "digits")
    assert code == 0, err
    outcome = json.loads(out)
    assert outcome["model"] == "digits" and outcome["reloaded"] is False
    assert outcome["version"] == "1"


def test_batch_stops_when_its_model_is_unloaded_and_resumes_once_loaded(
        repo_server, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """NOT_FOUND on Predict is the model, not a text (a bad text is INVALID_ARGUMENT): the rest
    of the job became NOT_FOUND error records with exit 0, and a rerun after loading the model
    again took the job as done."""
    from nextchar.client import NextCharClient
    from nextchar.client.batch import RemoteTarget

    address = repo_server.address
    inp, out = tmp_path / "in.txt", tmp_path / "o.jsonl"
    inp.write_text("".join(f"{i}+{i}=\n" for i in range(10)))
    real_predict = RemoteTarget.predict
    calls = []

    def predict(self: RemoteTarget, texts: list[str], *args: Any) -> Any:
        calls.append(texts)
        if len(calls) == 3:  # two answered and written; the model goes before the third
            with NextCharClient(address) as admin:
                admin.unload_model("digits")
        return real_predict(self, texts, *args)

    monkeypatch.setattr(RemoteTarget, "predict", predict)
    argv = ["batch", str(inp), "-o", str(out), "--server", address, "--model", "digits",
            "--concurrency", "1", "--texts-per-request", "1", "--no-progress"]
    try:
        code, _, err = run(capsys, *argv)
        assert code == 1, err
        assert err.splitlines()[-1].startswith("nextchar batch: NOT_FOUND: model 'digits' "), err
        assert err.splitlines()[-1].endswith(
            " (check --model, or load the model on the server again); stopped after 2/10 "
            "items: rerun the same command to resume"), err
        assert len(calls) == 3
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["index"] for r in records] == [0, 1] and all("top" in r for r in records)
    finally:
        code, _, err = run(capsys, "load", "--server", address, "digits")
        assert code == 0, err
    monkeypatch.setattr(RemoteTarget, "predict", real_predict)
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert "resuming" in err and err.splitlines()[-1].endswith(f"10/10 in {out}")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(10)) and all("top" in r for r in records)
