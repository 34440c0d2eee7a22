"""Quality benchmark: our default language-model config against the issue's plain baseline,
each trained for the same time budget on the default corpus and scored on the same validation
split (full val text, state carried, float32).

    python -m nextchar.training.quality_bench --max-minutes 10 [--out runs/bench] [--md FILE]

Runs the two trainings one after the other (never in parallel: they share the CPU), prints a
markdown table (command, val nats/char, bits/char, steps, params, training time) and writes the
validation curves to docs/benchmark-curve.png. Run it on a quiet machine: the budget is
wall-clock training time, so other load on the cores costs the models steps.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from .curves import save_comparison

# The baseline: 1-layer LSTM, hidden 384, embedding 64, AdamW lr 3e-3 with cosine decay
# (to zero), batch 64 x 128 characters, nothing else: random windows from a zero state, no
# warmup, no clipping, float32.
BASELINE_ARGS = [
    "--cell", "lstm", "--num-layers", "1", "--hidden-size", "384", "--embed-dim", "64",
    "--lr", "3e-3", "--min-lr-ratio", "0", "--warmup-steps", "0", "--weight-decay", "0.01",
    "--batch-size", "64", "--bptt", "128", "--state", "reset", "--grad-clip", "0", "--no-bf16",
    "--dropout", "0",
]
OURS_ARGS: list[str] = []  # the defaults of `train`


def _run(label: str, extra: list[str], args: argparse.Namespace) -> dict:
    out = Path(args.out) / label
    cmd = [sys.executable, "-m", "nextchar.training.cli", "train", "--max-minutes",
           str(args.max_minutes), "--out", str(out), "--overwrite", "--seed", str(args.seed),
           "--eval-every", str(args.eval_every), "--no-progress", *extra]
    if args.corpus:
        cmd += ["--corpus", *args.corpus]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    shown = f"nextchar train --max-minutes {args.max_minutes} {shlex.join(extra)}".strip()
    print(f"== {label}: {shown}", flush=True)
    started = time.monotonic()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {label} run failed (exit {proc.returncode})")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    m = ckpt["metrics"]
    return {"label": label, "command": shown, "metrics": m, "history": ckpt["history"],
            "config": ckpt["model_config"], "wall_s": time.monotonic() - started}


def _table(rows: list[dict]) -> str:
    lines = ["| run | command | val nats/char | val bits/char | steps | params | train time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        lines.append(
            f"| {r['label']} | `{r['command']}` | {m['val_nats_per_char']:.4f} | "
            f"{m['val_bits_per_char']:.4f} | {m['steps']} | {m['params']:,} | "
            f"{m['train_time_s'] / 60:.1f} min |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-minutes", type=float, default=10.0)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--corpus", nargs="+", default=None,
                   help="instead of the default corpus (for trying the script out)")
    p.add_argument("--plot", default="docs/benchmark-curve.png")
    p.add_argument("--md", default=None, help="also write the table to this file")
    args = p.parse_args(argv)

    rows = [_run("ours", OURS_ARGS, args), _run("baseline", BASELINE_ARGS, args)]
    ours, base = (r["metrics"]["val_nats_per_char"] for r in rows)
    table = _table(rows)
    verdict = (f"ours - baseline = {ours - base:+.4f} nats/char "
               f"({'meets' if base - ours >= 0.10 else 'misses'} the >= 0.10 target)")
    print("\n" + table + "\n\n" + verdict)
    save_comparison(
        [(f"{r['label']}: {r['metrics']['val_nats_per_char']:.3f}", r["history"]["val"]["time_s"],
          r["history"]["val"]["nats"]) for r in rows],
        args.plot, f"default corpus, {args.max_minutes:g} training minutes each")
    print(f"curve: {args.plot}")
    if args.md:
        Path(args.md).write_text(table + "\n\n" + verdict + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
