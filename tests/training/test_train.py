"""The language-model loop on tiny text: checkpoint, curve, resume, export, errors, and DDP
with two processes under torchrun."""

from __future__ import annotations

import argparse
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
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "checkpoint.pt", "loss.png",
                                                     "metrics.json"]


def test_help_shows_each_default_once() -> None:
    """Issue 18 item 9: no `(default 5 unless ...) (default: None)`, and every option that
    has a default says it."""
    parser = cli.build_parser()
    for name, sub in cli._subparsers(parser):
        text = sub.format_help()
        assert "(default: None)" not in text, name
        for action in sub._actions:
            if not action.option_strings or action.help in (None, argparse.SUPPRESS):
                continue
            if action.nargs == 0 or action.required:
                continue  # switches, --help, -o
            assert action.help.count("default") == 1, (name, action.option_strings, action.help)
    train_help = dict(cli._subparsers(parser))["train"].format_help()
    for flag in ("--seed", "--cell", "--hidden-size", "--lr", "--max-steps", "--max-minutes"):
        block = train_help.split(flag, 1)[1].split("\n  -", 1)[0]
        assert "default" in block, flag


def test_too_short_text_says_what_to_change(tiny_corpus: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """Issue 18 item 7."""
    assert _train("--corpus", str(tiny_corpus), "--out", str(tmp_path / "r"), "--max-steps", "1",
                  "--batch-size", "128", "--bptt", "64", "--hidden-size", "8", "--embed-dim", "4",
                  "--no-progress") == 1
    err = capsys.readouterr().err
    assert err.startswith("nextchar train: training text too short (") and err.count("\n") == 1
    assert "for 128 streams of 64+1: --batch-size 128 with --bptt 64 needs at least 8384 chars; " \
           "lower --batch-size or --bptt" in err


def test_progress_in_a_log_is_not_a_redraw_per_step(tiny_corpus: Path, tmp_path: Path,
                                                    capfd: pytest.CaptureFixture) -> None:
    """Issue 18 item 8: stderr not a terminal -> a line per ~30 s, not one per step."""
    args = [a for a in TINY if a != "--no-progress"]
    assert _train("--corpus", str(tiny_corpus), "--out", str(tmp_path / "r"), "--max-steps", "20",
                  *args) == 0
    err = capfd.readouterr().err
    assert err.count("\r") <= 3, err


def test_small_corpus_defaults(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """What `nextchar train --corpus FILE` picks for a ~100 KB text: a narrower model, the
    full 128 x 64 batch, and (for the default 5-minute budget's ~50 epochs) heavy dropout."""
    from nextchar.training import autoconfig

    sizes = autoconfig.choose_sizes(90_000)
    assert (sizes.hidden_size, sizes.num_layers, sizes.bptt, sizes.eval_every) == (256, 1, 64, 100)
    assert autoconfig.choose_batch_size(90_000, 64) == 128
    epochs = autoconfig.planned_epochs(90_000, 128 * 64, None, 5.0, autoconfig.CPU_CHARS_PER_S)
    assert epochs > 30
    assert autoconfig.choose_regularization(epochs).dropout >= 0.3
    assert autoconfig.choose_regularization(2.0).dropout == 0.0  # 5 MB in 10 minutes
    assert autoconfig.choose_sizes(4_500_000).hidden_size == 512

    corpus = tmp_path / "small.txt"
    corpus.write_text(("Now is the winter of our discontent made glorious summer.\n" * 1800)[:100_000])
    run = tmp_path / "r"
    assert _train("--corpus", str(corpus), "--out", str(run), "--max-steps", "1", "--threads", "1",
                  "--no-progress") == 0
    ckpt = torch.load(run / "best.pt", weights_only=True)
    cfg = ckpt["train_config"]
    assert (cfg["hidden_size"], cfg["batch_size"], cfg["bptt"]) == (256, 128, 64)
    assert {"hidden_size", "dropout", "lr", "weight_decay"} <= set(ckpt["auto"]["fields"])
    assert "auto: hidden_size" in capsys.readouterr().out


def test_tiny_text_gets_a_batch_that_fits(tiny_corpus: Path, tmp_path: Path) -> None:
    assert _train("--corpus", str(tiny_corpus), "--out", str(tmp_path / "r"), "--max-steps", "2",
                  "--hidden-size", "8", "--embed-dim", "4", "--threads", "1",
                  "--no-progress") == 0
    cfg = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["train_config"]
    assert 1 <= cfg["batch_size"] < 128


def test_resume_of_a_checkpoint_from_before_precision(tiny_corpus: Path, tmp_path: Path) -> None:
    from nextchar.training.checkpoint import save_checkpoint

    run = tmp_path / "run"
    assert _train("--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "2", *TINY) == 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    del ckpt["train_config"]["precision"]
    ckpt["train_config"]["bf16"] = False
    save_checkpoint(run / "checkpoint.pt", ckpt)
    assert _train("--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "3",
                  "--resume", *TINY) == 0
    after = torch.load(run / "checkpoint.pt", weights_only=True)
    assert after["step"] == 3 and after["train_config"]["precision"] == "fp32"


@pytest.mark.parametrize("flag, value, message", [
    ("--device", "cuda", "--device cuda: no CUDA device is available"),
    ("--precision", "bf16", "--precision bf16: this CPU has no bf16 support"),
    ("--precision", "fp16", "--precision fp16 is for CUDA: on the CPU use --precision bf16"),
])
def test_unusable_device_or_precision_is_one_line(flag: str, value: str, message: str,
                                                  tiny_corpus: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    from nextchar.training.device import cpu_bf16_supported

    if (value in ("cuda", "fp16") and torch.cuda.is_available()) or (
            value == "bf16" and cpu_bf16_supported()):
        pytest.skip(f"{flag} {value} works here")
    assert _train("--corpus", str(tiny_corpus), "--out", str(tmp_path / "r"), "--max-steps", "1",
                  flag, value, *TINY) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"nextchar train: {message}") and err.count("\n") == 1


def test_a_model_too_big_for_memory_is_one_line(tiny_corpus: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    # ~100 GB of weights: torch's allocator refuses at once (RuntimeError, not MemoryError).
    assert _train("--corpus", str(tiny_corpus), "--out", str(tmp_path / "r"), "--max-steps", "1",
                  *TINY, "--hidden-size", "100000000", "--num-layers", "1") == 1
    err = capsys.readouterr().err
    assert err == ("nextchar train: the model does not fit in memory (--hidden-size 100000000, "
                   "--num-layers 1, --embed-dim 8): choose a smaller one\n")


# `backend` ties the conftest's CUDA skip to torch alone (not onnxruntime-gpu).
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torchscript"])
def test_cuda_training_is_device_independent(backend: str, tiny_corpus: Path,
                                             tmp_path: Path) -> None:
    """Trains on the GPU (fp16 autocast, cuDNN LSTM), then resumes and exports on the CPU."""
    run = tmp_path / "run"
    assert _train("--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "4",
                  "--device", "cuda", *TINY) == 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["metrics"]["device"] == "cuda" and ckpt["metrics"]["precision"] == "fp16"
    assert all(t.device.type == "cpu" for t in ckpt["model_state"].values())
    assert _train("--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "6",
                  "--resume", "--device", "cpu", *TINY) == 0
    assert cli.main(["export", str(run), "-o", str(tmp_path / "art")]) == 0


@pytest.mark.parametrize("flag", ["--hidden-size", "--embed-dim"])
@pytest.mark.parametrize("value", ["9223372036854775808", "99999999999999999999"])
def test_a_width_past_any_memory_is_one_line(flag: str, value: str, tiny_corpus: Path,
                                             tmp_path: Path, capsys: pytest.CaptureFixture
                                             ) -> None:
    """From 2**63 on torch cannot even take the size (a TypeError traceback)."""
    assert _train("--corpus", str(tiny_corpus), "--out", str(tmp_path / "r"), *TINY,
                  flag, value) == 1
    assert capsys.readouterr().err == (f"nextchar train: {flag} must be <= 2147483647 "
                                       f"(2**31 - 1), got {value}\n")


def test_a_stack_too_deep_to_build_is_one_line(tiny_corpus: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "r"
    assert _train("--corpus", str(tiny_corpus), "--out", str(run), *TINY,
                  "--num-layers", "100000") == 1
    assert capsys.readouterr().err == "nextchar train: --num-layers must be <= 64, got 100000\n"
    assert not run.exists()  # refused before the run folder is made


def test_auto_shortens_the_window_for_a_tiny_corpus(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("hello world, tiny corpus line\n" * 4)
    run = tmp_path / "r"
    assert _train("--corpus", str(corpus), "--out", str(run), "--max-steps", "2",
                  "--hidden-size", "8", "--embed-dim", "4", "--threads", "1",
                  "--no-progress") == 0
    cfg = torch.load(run / "checkpoint.pt", weights_only=True)["train_config"]
    assert (cfg["batch_size"], cfg["bptt"]) == (1, 12)  # (120 - 8) // 9

    # Too short even for that: the line says how much text a run needs, not to lower
    # sizes that auto already chose as low as they go.
    corpus.write_text("hello\n")
    assert _train("--corpus", str(corpus), "--out", str(tmp_path / "r2"), "--max-steps", "2",
                  "--val-fraction", "0", "--hidden-size", "8", "--no-progress") == 1
    err = capsys.readouterr().err
    assert err == ("nextchar train: the training text is too short (6 chars): a run needs at "
                   "least 17; add text\n")
    # With one size given, only that one is the user's to lower.
    corpus.write_text("hello world, tiny corpus line\n" * 4)
    assert _train("--corpus", str(corpus), "--out", str(tmp_path / "r3"), "--max-steps", "2",
                  "--batch-size", "16", "--hidden-size", "8", "--no-progress") == 1
    assert capsys.readouterr().err.endswith("; lower --batch-size (or leave it on auto)\n")


def test_resume_names_what_it_ignores_and_the_runs_corpus(tiny_corpus: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from nextchar.training import data

    run = tmp_path / "run"
    assert _train("--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "2",
                  *TINY) == 0
    capsys.readouterr()
    assert _train("--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "3",
                  "--resume", *TINY, "--cell", "gru", "--lr", "0.5") == 0
    assert ("warning: --resume continues the run as it was trained; ignoring --cell gru (the "
            "run's: lstm), --lr 0.5 (the run's: 0.008)\n") in capsys.readouterr().out
    assert torch.load(run / "checkpoint.pt", weights_only=True)["model_config"]["cell"] == "lstm"
    # Without --corpus: refused before the default corpus is fetched, naming the run's.
    monkeypatch.setattr(data, "load_default_corpus",
                        lambda *a: pytest.fail("the default corpus was loaded"))
    assert _train("--out", str(run), "--max-steps", "4", "--resume", *TINY) == 1
    assert capsys.readouterr().err == (f"nextchar train: {run / 'checkpoint.pt'} was trained on "
                                       f"--corpus {tiny_corpus}: pass the same --corpus to "
                                       "resume it\n")
    other = tmp_path / "other.txt"
    other.write_text("some other text entirely\n" * 40)
    assert _train("--corpus", str(other), "--out", str(run), "--max-steps", "4", "--resume",
                  *TINY) == 1
    assert f"was trained on a different corpus (--corpus {tiny_corpus}); cannot resume" in \
        capsys.readouterr().err
    # A checkpoint whose corpus record is null (edited by hand) is refused the same way.
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["corpus"] = None
    torch.save(ckpt, run / "checkpoint.pt")
    assert _train("--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "4",
                  "--resume", *TINY) == 1
    err = capsys.readouterr().err
    assert "was trained on a different corpus" in err and "Traceback" not in err, err


def test_progress_in_a_log_is_lines_not_carriage_returns(capsys: pytest.CaptureFixture) -> None:
    from nextchar.training.train import progress_bar

    bar = progress_bar(20, 4, enabled=True)  # capsys's stderr is not a terminal
    bar.interval_s = 0.0  # a line per update instead of one per 30 s
    bar.set_postfix(loss="1.234", lr="8.0e-03", refresh=False)
    bar.update(1)
    bar.update(1)
    bar.close()
    assert capsys.readouterr().err == ("step 5/20: loss 1.234, lr 8.0e-03\n"
                                       "step 6/20: loss 1.234, lr 8.0e-03\n")


def test_every_validation_reports_the_training_loss_just_before_it(
        tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """With --eval-every 5 the training loss was only recorded every 10 steps: step 5 said
    `train nan`, step 15 repeated step 10's."""
    assert _train("--corpus", str(tiny_corpus), "--out", str(tmp_path / "r"), "--max-steps", "20",
                  *TINY, "--eval-every", "5") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")
             and ": val " in line]
    trains = [float(line.split(", train ")[1].split(",")[0]) for line in lines]
    assert [line.split(":")[0] for line in lines] == ["step 5", "step 10", "step 15"]
    assert all(t == t for t in trains) and len(set(trains)) == 3, lines


def test_a_min_lr_ratio_above_one_is_refused(tiny_corpus: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """50 made the "decay" climb to 50x the peak learning rate, and the run went on."""
    assert _train("--corpus", str(tiny_corpus), "--out", str(tmp_path / "r"), "--max-steps", "2",
                  *TINY, "--min-lr-ratio", "50") == 1
    assert capsys.readouterr().err == ("nextchar train: --min-lr-ratio must be in [0, 1] (the "
                                       "schedule's end as a fraction of --lr), got 50.0\n")


def test_a_batch_past_any_memory_is_one_line(tiny_corpus: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """--state reset takes any batch size (no streams to cut): the zero state's allocation
    was a traceback, after the run folder was made."""
    run = tmp_path / "r"
    args = ["--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "1", *TINY,
            "--state", "reset"]
    assert _train(*args, "--batch-size", "1000000000000") == 1
    assert capsys.readouterr().err == ("nextchar train: --batch-size must be <= 2147483647 "
                                       "(2**31 - 1), got 1000000000000\n")
    # 2 x 2**31 x 16 float32: 275 GB of state, which the allocator refuses at once.
    assert _train(*args, "--batch-size", "2147483647") == 1
    assert capsys.readouterr().err == ("nextchar train: the batch's recurrent state does not "
                                       "fit in memory (--batch-size 2147483647, --hidden-size "
                                       "16): choose a smaller --batch-size\n")
    assert not run.exists()


def test_a_learning_rate_past_float32_is_divergence(tiny_corpus: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """AdamW's step refused lr 1e39 with `value cannot be converted to type float without
    overflow`, a traceback."""
    assert _train("--corpus", str(tiny_corpus), "--out", str(tmp_path / "r"), "--max-steps",
                  "2", *TINY, "--lr", "1e39", "--warmup-steps", "1", "--precision",
                  "fp32") == 1
    assert capsys.readouterr().err == ("nextchar train: the weight update became inf at step 1 "
                                       "(training diverged); lower --lr\n")


def test_eval_chars_below_two_is_refused(tiny_corpus: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    """One character predicts none: the validation loss was nan, reported as divergence."""
    assert _train("--corpus", str(tiny_corpus), "--out", str(tmp_path / "r"), "--max-steps",
                  "2", *TINY, "--eval-chars", "1", "--eval-every", "1") == 1
    assert capsys.readouterr().err == ("nextchar train: --eval-chars must be >= 2 (each "
                                       "character after the first is scored), got 1\n")
    assert _train("--corpus", str(tiny_corpus), "--out", str(tmp_path / "r"), "--max-steps",
                  "2", *TINY, "--eval-chars", "2", "--eval-every", "1") == 0


def test_a_gpu_runs_precision_resumes_on_the_cpu(tiny_corpus: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """--precision was taken from the checkpoint alone: fp16 (what a CUDA run records) was
    `ignoring --precision fp32`, then `--precision fp16 is for CUDA`."""
    from nextchar.training.checkpoint import save_checkpoint

    run = tmp_path / "run"
    assert _train("--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "2", *TINY,
                  "--precision", "fp32") == 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["train_config"].update(precision="fp16", device="cuda")
    save_checkpoint(run / "checkpoint.pt", ckpt)  # as a CUDA run writes it, CRCs and all
    capsys.readouterr()
    assert _train("--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "3",
                  "--resume", "--device", "cpu", "--precision", "fp32", *TINY) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.out + captured.err
    after = torch.load(run / "checkpoint.pt", weights_only=True)
    assert after["step"] == 3 and after["train_config"]["precision"] == "fp32"
    assert after["metrics"]["precision"] == "fp32"
    # Without --precision: auto's choice for this device, and a line that says so.
    after["train_config"]["precision"] = "fp16"
    save_checkpoint(run / "checkpoint.pt", after)
    assert _train("--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "4",
                  "--resume", "--device", "cpu", *TINY) == 0
    assert ("warning: the run trained with --precision fp16, which cpu here lacks: resuming "
            "with --precision auto\n") in capsys.readouterr().out
    assert torch.load(run / "checkpoint.pt", weights_only=True)["train_config"][
        "precision"] == "auto"


def test_resume_with_another_process_count_is_one_line(tiny_corpus: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """The data position of other streams crashed the RNN (`Expected sequence length to be
    larger than 0`). The checkpoint says 2 processes, as a torchrun run's would."""
    from nextchar.training.checkpoint import save_checkpoint

    run = tmp_path / "run"
    assert _train("--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "2",
                  *TINY) == 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["data_state"]["streams"] = 8
    save_checkpoint(run / "checkpoint.pt", ckpt)
    capsys.readouterr()
    assert _train("--corpus", str(tiny_corpus), "--out", str(run), "--max-steps", "3",
                  "--resume", *TINY) == 1
    assert capsys.readouterr().err == (
        f"nextchar train: {run / 'checkpoint.pt'} cannot be resumed: its data position is for "
        "2 processes x --batch-size 4 (8 streams), this run's is 1 process x --batch-size 4 (4 "
        "streams): resume with the number of processes it was trained with\n")
