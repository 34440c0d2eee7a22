"""The run keeps its best model: on a tiny corpus where overfitting is forced, best.pt is the
checkpoint with the lowest validation loss, `nextchar export` ships it and says its step, and
the manifest records it; early stopping and `--resume` from either checkpoint."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from nextchar.training import cli

# A big model, a high constant learning rate and no regularisation on ~4 KB of random word
# sequences: validation improves while the model learns the words, then rises while it
# memorises the training lines.
OVERFIT = ["--hidden-size", "96", "--embed-dim", "16", "--batch-size", "8", "--bptt", "32",
           "--lr", "2e-2", "--min-lr-ratio", "1", "--warmup-steps", "2", "--dropout", "0",
           "--embed-dropout", "0", "--weight-decay", "0", "--eval-every", "20", "--threads", "1",
           "--no-progress"]


@pytest.fixture(scope="module")
def random_words(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6)))
             for _ in range(40)]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(120)) + "\n"
    path = tmp_path_factory.mktemp("words") / "words.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def overfit_run(random_words: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("overfit") / "run"
    assert cli.main(["train", "--corpus", str(random_words), "--out", str(run),
                     "--max-steps", "140", *OVERFIT]) == 0
    return run


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_best_is_the_lowest_validation_loss(overfit_run: Path) -> None:
    last, best = _load(overfit_run / "checkpoint.pt"), _load(overfit_run / "best.pt")
    val = last["history"]["val"]
    lowest = min(range(len(val["nats"])), key=lambda i: val["nats"][i])
    assert val["nats"][-1] > val["nats"][lowest] + 0.01, val  # it did overfit
    assert best["step"] == val["step"][lowest] < last["step"] == 140
    assert best["metrics"]["val_nats_per_char"] == pytest.approx(val["nats"][lowest])
    assert last["best"]["step"] == best["step"]
    metrics = json.loads((overfit_run / "metrics.json").read_text())
    assert metrics["best"]["step"] == best["step"]


def test_export_ships_the_best_and_says_its_step(overfit_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    best_step = _load(overfit_run / "best.pt")["step"]
    assert cli.main(["export", str(overfit_run), "-o", str(tmp_path / "art")]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: best.pt, step {best_step}, val " in out
    assert "(the run's last: step 140, val " in out
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert m["checkpoint"]["file"] == "best.pt" and m["checkpoint"]["step"] == best_step
    assert m["checkpoint"]["last_step"] == 140 and m["training"]["steps"] == best_step

    assert cli.main(["export", str(overfit_run), "-o", str(tmp_path / "last"),
                     "--checkpoint", "last"]) == 0
    assert "checkpoint: checkpoint.pt, step 140" in capsys.readouterr().out


def test_resume_from_best_and_from_last(overfit_run: Path, random_words: Path,
                                        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    for which in ("best", "last"):
        run = tmp_path / which
        shutil.copytree(overfit_run, run)
        start = _load(run / ("best.pt" if which == "best" else "checkpoint.pt"))
        args = ["train", "--corpus", str(random_words), "--out", str(run), "--max-steps", "160",
                "--resume", *([which] if which == "best" else []), *OVERFIT]
        assert cli.main(args) == 0
        assert f"resuming {run / ('best.pt' if which == 'best' else 'checkpoint.pt')} at step " \
               f"{start['step']}" in capsys.readouterr().out
        after = _load(run / "checkpoint.pt")
        assert after["step"] == 160
        # The history continues the one it resumed from: nothing after the resumed step
        # survives from the abandoned branch.
        steps = after["history"]["val"]["step"]
        assert steps == sorted(steps) and steps[: len(start["history"]["val"]["step"])] == \
            start["history"]["val"]["step"]
        best = _load(run / "best.pt")
        assert best["metrics"]["val_nats_per_char"] <= start["best"]["val_nats_per_char"]


def test_early_stopping(random_words: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert cli.main(["train", "--corpus", str(random_words), "--out", str(run),
                     "--max-steps", "400", "--patience", "2", *OVERFIT]) == 0
    out = capsys.readouterr().out
    assert "early stop: 2 validations without a new best (--patience 2)" in out
    last, best = _load(run / "checkpoint.pt"), _load(run / "best.pt")
    assert last["metrics"]["stopped_early"] and last["step"] == best["step"] + 2 * 20 < 400


# -- without validation text ------------------------------------------------------------------
NO_VAL = ["--hidden-size", "8", "--embed-dim", "4", "--eval-every", "2", "--threads", "1",
          "--no-progress"]


def _strict_json(path: Path) -> dict:
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{path} holds {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_without_validation_text_best_is_the_last(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """A one-line corpus holds nothing out: best.pt follows the last checkpoint (what the
    warning says), so export ships the last state, and metrics.json stays JSON (null, not NaN).
    --resume of such a run works, and its best.pt still follows."""
    corpus = tmp_path / "one.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog and then some more\n")
    run = tmp_path / "run"
    assert cli.main(["train", "--corpus", str(corpus), "--out", str(run), "--max-steps", "6",
                     *NO_VAL]) == 0
    out = capsys.readouterr().out
    assert "warning: no validation text (--val-fraction 0.1 holds out no whole line of this " \
           "corpus): val loss is reported as nan, and best.pt is always the last checkpoint" in out
    assert _load(run / "best.pt")["step"] == _load(run / "checkpoint.pt")["step"] == 6
    metrics = _strict_json(run / "metrics.json")
    assert metrics["val_nats_per_char"] is None and metrics["best"]["step"] == 6

    assert cli.main(["train", "--corpus", str(corpus), "--out", str(run), "--max-steps", "8",
                     "--resume", *NO_VAL]) == 0
    assert _load(run / "best.pt")["step"] == 8


def test_patience_without_validation_text_is_refused(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("line one of the corpus\nline two of the corpus\n" * 20)
    assert cli.main(["train", "--corpus", str(corpus), "--out", str(tmp_path / "r"),
                     "--max-steps", "6", "--val-fraction", "0", "--patience", "1",
                     *NO_VAL]) == 1
    assert capsys.readouterr().err == (
        "nextchar train: --patience needs validation text, and there is none (--val-fraction "
        "0): drop --patience, or add text\n")
    assert not (tmp_path / "r").exists()


def test_one_line_documents_hold_out_whole_documents(tmp_path: Path) -> None:
    """A folder of one-line files: the per-document split keeps every line for training, so
    the last files (from 90% of the corpus on) are held out instead, and validation runs."""
    lines = tmp_path / "lines"
    lines.mkdir()
    for i in range(20):
        (lines / f"{i:02d}.txt").write_text(f"line {i:02d} of twenty, each a file\n")
    run = tmp_path / "run"
    assert cli.main(["train", "--corpus", str(lines), "--out", str(run), "--max-steps", "4",
                     "--patience", "1", *NO_VAL]) == 0
    last = _load(run / "checkpoint.pt")
    one = len("line 00 of twenty, each a file\n")
    assert last["corpus"]["val_chars"] == 2 * one + 1  # the last two files, a blank line between
    assert all(math.isfinite(v) for v in last["history"]["val"]["nats"])
