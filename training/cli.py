"""The `train` and `export` commands. The top-level `nextchar` command dispatches them here:

    python -m nextchar.training.cli train --preset hello
    python -m nextchar.training.cli train --max-minutes 2 --out runs/lm
    python -m nextchar.training.cli export runs/lm -o artifacts/lm

Errors the user can act on (missing corpus, corrupt checkpoint, failed parity gate, ...) print
one line, `error: ...`, and exit 1; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields

from .errors import TrainingError


def _train_defaults() -> dict:
    from .train import TrainConfig

    return {f.name: f.default for f in fields(TrainConfig) if f.name != "corpus"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextchar", description="Train and export models.")
    sub = parser.add_subparsers(dest="command", required=True)

    d = _train_defaults()
    t = sub.add_parser(
        "train", help="train a model (the hello preset or a character-level language model)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train the seed's hello preset, or a character-level language model on the "
                    "default Shakespeare corpus or on --corpus.")
    t.add_argument("--preset", choices=["hello"], help="the seed tutorial's hello -> ohlol task")
    t.add_argument("--corpus", nargs="+", metavar="PATH", default=[],
                   help="UTF-8 files or folders (default: the Shakespeare corpus, cached)")
    t.add_argument("--out", default=None,
                   help="run folder (default runs/hello for --preset hello, else runs/lm)")
    t.add_argument("--name", default=None, help="model name for the artifact")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--seed", type=int, default=d["seed"])
    t.add_argument("--max-minutes", type=float, default=None,
                   help="training-time budget; validation pauses the clock "
                        "(default 5 unless --max-steps is given)")
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's; cores / processes under torchrun)")
    g = t.add_argument_group("model")
    g.add_argument("--cell", choices=["rnn", "gru", "lstm"], default=d["cell"])
    g.add_argument("--embed-dim", type=int, default=d["embed_dim"])
    g.add_argument("--hidden-size", type=int, default=d["hidden_size"])
    g.add_argument("--num-layers", type=int, default=d["num_layers"])
    g.add_argument("--dropout", type=float, default=d["dropout"])
    g = t.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="rows per process")
    g.add_argument("--bptt", type=int, default=d["bptt"], help="truncated-BPTT window, chars")
    g.add_argument("--state", choices=["carry", "reset"], default=d["state"],
                   help="carry: contiguous streams with the state carried between windows; "
                        "reset: random windows from a zero state")
    g.add_argument("--lr", type=float, default=d["lr"])
    g.add_argument("--min-lr-ratio", type=float, default=d["min_lr_ratio"],
                   help="the cosine schedule ends at lr * this")
    g.add_argument("--warmup-steps", type=int, default=d["warmup_steps"])
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    g.add_argument("--grad-clip", type=float, default=d["grad_clip"], help="0 turns it off")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=d["bf16"],
                   help="bf16 autocast for training steps (weights stay float32)")
    g = t.add_argument_group("validation")
    g.add_argument("--val-fraction", type=float, default=d["val_fraction"],
                   help="tail of each document held out")
    g.add_argument("--eval-every", type=int, default=d["eval_every"], help="steps")
    g.add_argument("--eval-chars", type=int, default=d["eval_chars"],
                   help="periodic validation reads at most this many chars; the final one all")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g.add_argument("--quiet", action="store_true", help="hello preset: no per-epoch lines")

    e = sub.add_parser("export", help="export a run to an artifact (ONNX + TorchScript + manifest)")
    e.add_argument("run", help="run folder or checkpoint file")
    e.add_argument("-o", "--out", required=True, help="artifact folder to write")
    e.add_argument("--version", default=None, help="artifact version (default: UTC YYYYmmdd-HHMMSS)")
    e.add_argument("--name", default=None, help="artifact name (default: the run's)")
    return parser


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train, train_hello

    if args.preset == "hello":
        if args.corpus or args.resume:
            raise TrainingError("--preset hello trains on 'hello' alone: drop --corpus/--resume")
        result = train_hello(args.out or "runs/hello", quiet=args.quiet)
        return 0 if result["all_ohlol"] else 1
    config = TrainConfig(
        out=args.out or "runs/lm", corpus=list(args.corpus), name=args.name,
        resume=args.resume, overwrite=args.overwrite, seed=args.seed,
        max_minutes=args.max_minutes, max_steps=args.max_steps, threads=args.threads,
        cell=args.cell, embed_dim=args.embed_dim, hidden_size=args.hidden_size,
        num_layers=args.num_layers, dropout=args.dropout, batch_size=args.batch_size,
        bptt=args.bptt, state=args.state, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, bf16=args.bf16, val_fraction=args.val_fraction,
        eval_every=args.eval_every, eval_chars=args.eval_chars, progress=not args.no_progress,
    )
    train(config, log=print)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_artifact

    out = export_artifact(args.run, args.out, version=args.version, name=args.name)
    import json

    manifest = json.loads((out / "manifest.json").read_text("utf-8"))
    diffs = manifest["parity"]["max_abs_diff"]
    print(f"wrote {out} ({manifest['name']} {manifest['version']}): parity gate passed, "
          f"{manifest['parity']['cases']} cases, max |diff| torchscript "
          f"{diffs['torchscript']:.2g}, onnxruntime {diffs['onnxruntime']:.2g}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `train ...` or `export ...`; returns the exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return _train(args) if args.command == "train" else _export(args)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
