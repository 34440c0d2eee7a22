"""How training stops when it cannot go on: a loss that is no longer a number (diverged) ends
the run in one line with the last good checkpoint kept, and SIGINT or SIGTERM (Ctrl-C,
`docker stop`) save the current step before the process exits 130 or 143."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import torch

from nextchar.training import cli, train
from nextchar.training.checkpoint import load_checkpoint, model_from_checkpoint

TINY = ["--hidden-size", "16", "--embed-dim", "8", "--batch-size", "4", "--bptt", "16",
        "--eval-every", "3", "--warmup-steps", "2", "--threads", "1", "--no-progress"]


def _train(*args: str) -> int:
    return cli.main(["train", *args])


def test_divergence_stops_in_one_line_and_keeps_good_files(tiny_corpus: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert _train("--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "40", *TINY,
                  "--lr", "1e6", "--grad-clip", "0", "--warmup-steps", "0") == 1
    err = capsys.readouterr().err
    assert err.startswith("nextchar train: ") and err.count("\n") == 1, err
    # The line says which step checkpoint.pt keeps: a validated one before the nan.
    kept = re.search(r"became nan at step (\d+) \(training diverged\); lower --lr or leave "
                     r"--grad-clip on; (.+) keeps step (\d+)$", err.rstrip("\n"))
    assert kept, err
    assert kept[2] == str(run / "checkpoint.pt") and 0 < int(kept[3]) < int(kept[1]), err
    for name in ("checkpoint.pt", "best.pt"):  # both written, both finite weights
        model_from_checkpoint(load_checkpoint(run / name), run / name)
    assert load_checkpoint(run / "checkpoint.pt")["step"] == int(kept[3])
    assert 0 < load_checkpoint(run / "best.pt")["step"] <= int(kept[3])


def _signal_at(monkeypatch: pytest.MonkeyPatch, signum: int, at_step: int) -> None:
    """Sends signum to this process while step `at_step` runs (from inside lr_at)."""
    original = train.lr_at

    def lr_at(cfg, step, progress):
        if step == at_step:
            os.kill(os.getpid(), signum)
        return original(cfg, step, progress)

    monkeypatch.setattr(train, "lr_at", lr_at)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_a_signal_saves_the_current_step(signum: int, tiny_corpus: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _signal_at(monkeypatch, signum, at_step=4)  # the 5th step; the last validation was at 3
    assert _train("--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "1000",
                  *TINY) == 128 + signum
    name = signal.Signals(signum).name
    assert capsys.readouterr().err == (f"nextchar train: {name}: stopped at step 5, saved "
                                       f"{run / 'checkpoint.pt'}; continue with --resume\n")
    last = torch.load(run / "checkpoint.pt", weights_only=True)
    assert last["step"] == 5 and last["metrics"]["interrupted"]
    assert torch.load(run / "best.pt", weights_only=True)["step"] == 3  # not validated: kept
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # put back

    monkeypatch.undo()
    assert _train("--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "7",
                  "--resume", *TINY) == 0
    assert "resuming " + str(run / "checkpoint.pt") + " at step 5" in capsys.readouterr().out
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 7
