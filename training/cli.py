"""The `train` and `export` commands, which the top-level `nextchar` command dispatches here:

    nextchar train --preset hello
    nextchar train --corpus my_texts/ --max-minutes 10 --out runs/mine
    nextchar export runs/mine -o artifacts/mine         # the run's best checkpoint

(`python -m nextchar.training.cli train ...` is the same, and is what torchrun starts.)

Errors the user can act on (missing corpus, corrupt checkpoint, failed parity gate, a bad
flag value, ...) print one line, `nextchar train: ...` or `nextchar export: ...`, and exit
non-zero (1; 2 for a command line argparse rejects, after its usage line); no traceback.
SIGINT and SIGTERM exit 130 and 143: training saves its current step first, export removes its
temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import fields
from typing import Any

from .errors import Interrupted, Terminated, TrainingError

AUTO = "auto: from the corpus size and budget, see docs/training.md"


def _train_defaults() -> dict[str, Any]:
    from .train import TrainConfig

    return {f.name: f.default for f in fields(TrainConfig) if f.name != "corpus"}


def _d(text: str, default: object) -> str:
    """Help text with its default, written once (no formatter adds a second)."""
    return f"{text} (default: {default})" if text else f"default: {default}"


def _add_train(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = _train_defaults()
    t = sub.add_parser(
        "train", help="train a model (the hello preset or a character-level language model)",
        description="Train the seed's hello preset, or a character-level language model on the "
                    "default Shakespeare corpus or on --corpus. Options marked auto are chosen "
                    "from the corpus size and the budget; the run prints what it chose.")
    t.add_argument("--preset", choices=["hello"],
                   help="the seed tutorial's hello -> ohlol task (default: none, a language model)")
    t.add_argument("--corpus", nargs="+", metavar="PATH", default=[],
                   help="UTF-8 files or folders (default: the Shakespeare corpus, cached)")
    t.add_argument("--out", default=None,
                   help="run folder (default: runs/hello for --preset hello, else runs/lm)")
    t.add_argument("--name", default=None, help="model name for the artifact (default: "
                                                "<corpus>-<cell>)")
    t.add_argument("--resume", nargs="?", const="last", choices=["last", "best"], default=None,
                   help="continue the run in --out from its last checkpoint (checkpoint.pt) "
                        "or, with `--resume best`, from its best (best.pt) (default: off)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --out (its files are deleted as the new run "
                        "starts), or write into a folder that holds other files")
    t.add_argument("--seed", type=int, default=d["seed"], help=_d("weights and data order",
                                                                  d["seed"]))
    t.add_argument("--max-minutes", type=float, default=None,
                   help="training-time budget; validation pauses the clock (default: 5, or "
                        "none when --max-steps is given)")
    t.add_argument("--max-steps", type=int, default=None,
                   help="step budget; with --max-minutes too, whichever ends first (default: "
                        "none)")
    t.add_argument("--patience", type=int, default=d["patience"],
                   help=_d("stop after this many validations without a new best; 0 never",
                           d["patience"]))
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d["device"],
                   help=_d("auto: cuda when available", d["device"]))
    t.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's; cores / processes under "
                        "torchrun)")
    g = t.add_argument_group("model")
    g.add_argument("--cell", choices=["rnn", "gru", "lstm"], default=d["cell"],
                   help=_d("", d["cell"]))
    g.add_argument("--embed-dim", type=int, default=d["embed_dim"], help=_d("", d["embed_dim"]))
    g.add_argument("--hidden-size", type=int, default=None, help=_d("", AUTO))
    g.add_argument("--num-layers", type=int, default=None, help=_d("", AUTO))
    g.add_argument("--dropout", type=float, default=None,
                   help=_d("between layers and on the output, training only", AUTO))
    g.add_argument("--embed-dropout", type=float, default=None,
                   help=_d("on the input embeddings, training only", AUTO))
    g = t.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=None, help=_d("rows per process", AUTO))
    g.add_argument("--bptt", type=int, default=None,
                   help=_d("truncated-BPTT window, chars", AUTO))
    g.add_argument("--state", choices=["carry", "reset"], default=d["state"],
                   help=_d("carry: contiguous streams with the state carried between "
                           "windows; reset: random windows from a zero state", d["state"]))
    g.add_argument("--lr", type=float, default=None, help=_d("peak learning rate", AUTO))
    g.add_argument("--min-lr-ratio", type=float, default=d["min_lr_ratio"],
                   help=_d("the cosine schedule ends at lr * this", d["min_lr_ratio"]))
    g.add_argument("--warmup-steps", type=int, default=d["warmup_steps"],
                   help=_d("", d["warmup_steps"]))
    g.add_argument("--weight-decay", type=float, default=None, help=_d("AdamW's", AUTO))
    g.add_argument("--grad-clip", type=float, default=d["grad_clip"],
                   help=_d("0 turns it off", d["grad_clip"]))
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   default=d["precision"],
                   help=_d("autocast of the training steps, weights stay float32; auto: bf16 "
                           "on CPUs with bf16 support, fp32 on others, fp16 on CUDA",
                           d["precision"]))
    # Before --precision: kept so that older command lines still run.
    g.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                   help=argparse.SUPPRESS)
    g.add_argument("--no-bf16", dest="precision", action="store_const", const="fp32",
                   help=argparse.SUPPRESS)
    g = t.add_argument_group("validation")
    g.add_argument("--val-fraction", type=float, default=d["val_fraction"],
                   help=_d("tail of each document held out", d["val_fraction"]))
    g.add_argument("--eval-every", type=int, default=None, help=_d("steps", AUTO))
    g.add_argument("--eval-chars", type=int, default=d["eval_chars"],
                   help=_d("periodic validation reads at most this many chars; the final one "
                           "all", d["eval_chars"]))
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--quiet", action="store_true", help="hello preset: no per-epoch lines")
    return t


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextchar", description="Train and export models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    e = sub.add_parser("export", help="export a run to an artifact (ONNX + TorchScript + manifest)")
    e.add_argument("run", help="run folder or checkpoint file")
    e.add_argument("-o", "--out", required=True, help="artifact folder to write")
    e.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help="from a run folder: its best checkpoint (best.pt, the lowest "
                        "validation loss) or its last (checkpoint.pt) (default: best)")
    e.add_argument("--version", default=None,
                   help="artifact version (default: the UTC time, YYYYmmdd-HHMMSS)")
    e.add_argument("--name", default=None, help="artifact name (default: the run's)")
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.items())
    return []


# TrainConfig's fields that only a language model uses: the hello preset's sizes, epochs and
# learning rate are fixed (its seeds reach "ohlol" with them).
_NOT_HELLO = ("out", "corpus", "name", "resume", "resume_from", "overwrite", "device",
              "precision", "progress")


def _config(args: argparse.Namespace, out: str) -> Any:
    from .train import TrainConfig

    return TrainConfig(
        out=out, corpus=list(args.corpus),
        name=args.name, resume=args.resume is not None, resume_from=args.resume or "last",
        overwrite=args.overwrite, seed=args.seed, max_minutes=args.max_minutes,
        max_steps=args.max_steps, threads=args.threads, device=args.device,
        cell=args.cell, embed_dim=args.embed_dim, hidden_size=args.hidden_size,
        num_layers=args.num_layers, dropout=args.dropout, embed_dropout=args.embed_dropout,
        batch_size=args.batch_size, bptt=args.bptt, state=args.state, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, precision=args.precision,
        val_fraction=args.val_fraction, eval_every=args.eval_every, eval_chars=args.eval_chars,
        patience=args.patience, progress=not args.no_progress,
    )


def _hello(args: argparse.Namespace) -> int:
    from .device import resolve_device, resolve_precision
    from .train import TrainConfig, train_hello

    if args.corpus or args.resume:
        raise TrainingError("--preset hello trains on 'hello' alone: drop --corpus/--resume")
    out = "runs/hello" if args.out is None else args.out
    _config(args, out)  # a value a language model refuses is refused here too, in its words
    ignored = [f"--{f.name.replace('_', '-')} {getattr(args, f.name)}"
               for f in fields(TrainConfig)
               if f.name not in _NOT_HELLO and getattr(args, f.name) != f.default]
    if ignored:
        print("nextchar train: warning: --preset hello trains its fixed models (sizes, epochs, "
              f"learning rate and seeds): ignoring {', '.join(ignored)}", file=sys.stderr)
    # Refused as for a language model when this machine lacks them; the preset itself always
    # trains on the CPU in float32, which is what makes its fixed seeds give the same result.
    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device)
    if (args.device != "auto" and device.type != "cpu") or (args.precision != "auto" and dtype):
        print("nextchar train: warning: --preset hello trains on the CPU in float32 (its fixed "
              "seeds give the same models every run): ignoring --device/--precision",
              file=sys.stderr)
    result = train_hello(out, quiet=args.quiet, overwrite=args.overwrite, name=args.name)
    return 0 if result["all_ohlol"] else 1


def _train(args: argparse.Namespace) -> int:
    from .train import train

    if args.preset == "hello":
        return _hello(args)
    train(_config(args, "runs/lm" if args.out is None else args.out), log=print)
    return 0


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Terminated, as SIGINT raises KeyboardInterrupt, so that export removes
    its temporary folder on either (the default action of SIGTERM kills without cleanup)."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: signals are not ours to set
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _export(args: argparse.Namespace) -> int:
    from .export import GRAPH_FILES, export_artifact

    with _sigterm_raises():
        out = export_artifact(args.run, args.out, version=args.version, name=args.name,
                              checkpoint=args.checkpoint)
    manifest = json.loads((out / "manifest.json").read_text("utf-8"))
    choice, parity = manifest["checkpoint"], manifest["parity"]
    if choice.get("warning"):
        print(f"nextchar export: warning: {choice['warning']}", file=sys.stderr)
    for graph, reason in parity["failed"].items():
        print(f"nextchar export: warning: {GRAPH_FILES[graph]} left out of the artifact: "
              f"{reason}", file=sys.stderr)
    val = choice.get("val_nats_per_char")
    line = f"checkpoint: {choice['file']}, step {choice['step']}"
    if val is not None:
        line += f", val {val:.4f} nats/char"
    if choice.get("last_step") is not None:
        last_val = choice.get("last_val_nats_per_char")
        line += f" (the run's last: step {choice['last_step']}" + (
            f", val {last_val:.4f})" if last_val is not None else ")")
    print(line + (f"; {choice['note']}" if choice.get("note") else ""))
    diffs = ", ".join(f"{g} {GRAPH_FILES[g]} {v:.2g}" for g, v in parity["max_abs_diff"].items())
    print(f"wrote {out} ({manifest['name']} {manifest['version']}): parity gate passed for "
          f"{len(parity['max_abs_diff'])} of {len(GRAPH_FILES)} graphs, {parity['cases']} "
          f"cases, max |log-prob diff| {diffs} (tolerance up to {parity['tolerance']:.2g}, "
          f"max |logit| {parity['max_abs_logit']:.3g})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `train ...` or `export ...`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # reported by the subcommand, so the line names it: `nextchar train: ...`
            dict(_subparsers(parser))[args.command].error(
                f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:  # argparse: --help (0) or usage + one error line (2)
        return e.code if isinstance(e.code, int) else 2
    prog = f"nextchar {args.command}"
    # export's warnings (a graph left out) are printed below as one line each, not twice.
    logging.getLogger("nextchar.training").addHandler(logging.NullHandler())
    try:
        return _train(args) if args.command == "train" else _export(args)
    except Interrupted as e:  # training saved its state first
        print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_status
    except TrainingError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a folder without write permission, ...
        print(f"{prog}: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
