"""What a run writes where: --out is checked before anything is read, a folder that holds
anything is written only with --resume or --overwrite, and --overwrite deletes the earlier
run's files first, so that export never ships another run's best.pt. The hello preset follows
the same rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nextchar.training import cli

TINY = ["--hidden-size", "16", "--embed-dim", "8", "--batch-size", "4", "--bptt", "16",
        "--eval-every", "3", "--warmup-steps", "2", "--threads", "1", "--no-progress"]


def _train(*args: str) -> int:
    return cli.main(["train", *args])


def _ckpt(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture
def gru_run(tiny_corpus: Path, tmp_path: Path) -> Path:
    """An earlier run: a GRU 16 with best.pt, metrics.json and loss.png."""
    run = tmp_path / "old"
    assert _train("--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "3",
                  "--cell", "gru", *TINY) == 0
    return run


def test_overwrite_deletes_the_earlier_runs_files(gru_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """With no validation text the new run writes best.pt too, but metrics.json and loss.png
    of a run that fails early must not survive either: all four are the new run's or gone."""
    corpus = tmp_path / "one.txt"
    corpus.write_text("a single line of text, far too short to hold out validation\n")
    capsys.readouterr()
    assert _train("--corpus", str(corpus), "--out", str(gru_run), "--overwrite",
                  "--max-steps", "2", "--eval-every", "1", "--hidden-size", "8", "--embed-dim",
                  "4", "--threads", "1", "--no-progress") == 0
    out = capsys.readouterr().out
    assert f"--overwrite: deleted the earlier run's checkpoint.pt, best.pt, metrics.json, " \
           f"loss.png in {gru_run}" in out
    for name in ("checkpoint.pt", "best.pt"):
        ckpt = _ckpt(gru_run / name)
        assert ckpt["model_config"]["cell"] == "lstm" and ckpt["step"] == 2, name


def test_a_run_folder_without_checkpoint_pt_is_not_written(gru_run: Path, tiny_corpus: Path,
                                                           tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    only_best = tmp_path / "only-best"
    only_best.mkdir()
    (only_best / "best.pt").write_bytes((gru_run / "best.pt").read_bytes())
    assert _train("--corpus", str(tiny_corpus), "--out", str(only_best), "--max-steps", "1",
                  *TINY) == 1
    assert capsys.readouterr().err == (f"nextchar train: {only_best} holds a run's best.pt: pass "
                                       f"--overwrite to replace it\n")
    assert (only_best / "best.pt").read_bytes() == (gru_run / "best.pt").read_bytes()
    assert sorted(p.name for p in only_best.iterdir()) == ["best.pt"]


def test_a_folder_of_other_files_is_not_written(tiny_corpus: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "mydata.txt").write_text("precious")
    assert _train("--corpus", str(tiny_corpus), "--out", str(mine), "--max-steps", "1",
                  *TINY) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"nextchar train: {mine} is not empty (mydata.txt) and holds no run")
    assert err.count("\n") == 1 and sorted(p.name for p in mine.iterdir()) == ["mydata.txt"]
    # --overwrite writes the run beside the files it does not own.
    assert _train("--corpus", str(tiny_corpus), "--out", str(mine), "--max-steps", "1",
                  "--overwrite", *TINY) == 0
    assert (mine / "mydata.txt").read_text() == "precious" and (mine / "checkpoint.pt").exists()


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_out_on_a_file_is_refused_before_the_corpus_is_read(where: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    from nextchar.training import data

    def never(*args, **kwargs):
        raise AssertionError("the corpus was read")

    monkeypatch.setattr(data, "read_corpus", never)
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = afile if where == "file" else afile / "sub" / "run"
    assert _train("--corpus", str(tmp_path), "--out", str(out), *TINY) == 1
    what = "is a file" if where == "file" else f"is under {afile}, a file"
    assert capsys.readouterr().err == (f"nextchar train: --out {out} {what}, not a folder: "
                                       "choose another --out\n")


@pytest.mark.parametrize("argv, message", [
    (["--corpus", ""], "corpus path is empty"),
    (["--out", ""], "--out is empty: name the run folder"),
    (["--preset", "hello", "--out", ""], "--out is empty: name the run folder"),
], ids=["corpus", "out", "hello-out"])
def test_empty_paths_are_refused(argv: list[str], message: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # Path("") is "." : nothing may land here
    assert _train(*argv, *TINY) == 1
    assert capsys.readouterr().err == f"nextchar train: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_hello_keeps_an_existing_run_unless_overwrite(gru_run: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    before = (gru_run / "best.pt").read_bytes()
    assert _train("--preset", "hello", "--out", str(gru_run), "--quiet") == 1
    assert capsys.readouterr().err == (f"nextchar train: {gru_run / 'checkpoint.pt'} exists: "
                                       "pass --overwrite to replace it\n")
    assert (gru_run / "best.pt").read_bytes() == before
    assert _ckpt(gru_run / "checkpoint.pt")["model_config"]["cell"] == "gru"

    assert _train("--preset", "hello", "--out", str(gru_run), "--quiet", "--overwrite") == 0
    # The GRU's best.pt and metrics.json are gone: export now ships the hello model.
    assert sorted(p.name for p in gru_run.iterdir()) == ["checkpoint.pt", "loss.png"]
    assert _ckpt(gru_run / "checkpoint.pt")["name"] == "hello-rnn"

    # A folder with only an earlier hello run in it is trained again without --overwrite
    # (`make demo` twice): the fixed seeds give the same model, so nothing is lost.
    model = _ckpt(gru_run / "checkpoint.pt")["model_state"]
    assert _train("--preset", "hello", "--out", str(gru_run), "--quiet") == 0
    again = _ckpt(gru_run / "checkpoint.pt")["model_state"]
    assert all(torch.equal(model[k], again[k]) for k in model)
    (gru_run / "notes.txt").write_text("mine")  # ... but not one that holds more
    assert _train("--preset", "hello", "--out", str(gru_run), "--quiet") == 1
    assert "pass --overwrite to replace it" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--device", "cuda", "--device cuda: no CUDA device is available"),
    ("--precision", "fp16", "--precision fp16 is for CUDA: on the CPU use --precision bf16"),
])
def test_hello_refuses_a_device_this_machine_lacks(flag: str, value: str, message: str,
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip(f"{flag} {value} works here")
    assert _train("--preset", "hello", "--out", str(tmp_path / "h"), "--quiet", flag,
                  value) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"nextchar train: {message}") and err.count("\n") == 1
    assert not (tmp_path / "h").exists()
