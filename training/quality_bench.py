"""Quality benchmark (issue 15): our defaults against the plain baseline, trained in the same
run for the same training time, on the default corpus and on a ~1 MB subset of it.

    flock -x /tmp/nextchar-cpu.lock .venv/bin/python -m nextchar.training.quality_bench \\
        --out runs/quality --json docs/quality_bench.json --plot docs/quality_bench.png

Legs (each: ours, then the baseline; never in parallel, they share the CPU):
  default corpus, --minutes (10)     target: ours <= baseline - 0.10 nats/char
  1 MB subset, --minutes (10)        target: ours <= baseline - 0.08, exported = best val seen
  1 MB subset, --short-minutes (2)   target: ours <= baseline
and, with --small FILE, `nextchar train --corpus FILE` on its defaults (a ~100 KB text), its
best checkpoint and a text sample.

The 1 MB subset is the first files of the default corpus in sorted order whose cleaned text
reaches 1,000,000 characters, written to OUT/corpus-1mb/ and split as usual. "Ours" is plain
`nextchar train` (every option on auto) scored by the checkpoint `nextchar export` ships
(best.pt); the baseline is the issue's plain model scored by its last checkpoint. Both are
scored the same way (the full validation half, state carried, float32). The budget is training
time (validation pauses the clock), so other load on the cores costs the models steps: the
JSON records the load average around every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import data

# The baseline: 1-layer LSTM, hidden 384, embedding 64, AdamW lr 3e-3 with cosine decay
# (to zero), batch 64 x 128 characters, nothing else: random windows from a zero state, no
# warmup, no clipping, no dropout, float32; scored by its last checkpoint.
BASELINE_ARGS = [
    "--cell", "lstm", "--num-layers", "1", "--hidden-size", "384", "--embed-dim", "64",
    "--lr", "3e-3", "--min-lr-ratio", "0", "--warmup-steps", "0", "--weight-decay", "0.01",
    "--batch-size", "64", "--bptt", "128", "--state", "reset", "--grad-clip", "0",
    "--precision", "fp32", "--dropout", "0", "--embed-dropout", "0",
]
OURS_ARGS: list[str] = []  # the defaults of `train`: every option on auto
SUBSET_CHARS = 1_000_000
TARGETS = {"default": -0.10, "1mb": -0.08, "1mb-short": 0.0}  # ours - baseline must be <=


def write_subset(root: Path, chars: int = SUBSET_CHARS) -> tuple[Path, list[str]]:
    """The first default-corpus files in sorted order whose cleaned text reaches `chars`."""
    docs = sorted(data.load_default_corpus(), key=lambda d: d.name)
    root.mkdir(parents=True, exist_ok=True)
    names, total = [], 0
    for doc in docs:
        (root / Path(doc.name).name).write_text(doc.text, encoding="utf-8")
        names.append(Path(doc.name).name)
        total += len(doc.text)
        if total >= chars:
            break
    return root, names


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from .device import cpu_bf16_supported

    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cpu_bf16": cpu_bf16_supported(), "cuda": torch.cuda.is_available()}


def _commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD"),
            "training_dirty": bool(git("status", "--porcelain", "training"))}


def _train(label: str, out: Path, minutes: float, extra: list[str], corpus: list[str],
           args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "nextchar.training.cli", "train", "--max-minutes", str(minutes),
           "--out", str(out), "--overwrite", "--seed", str(args.seed), "--no-progress", *extra]
    if corpus:
        cmd += ["--corpus", *corpus]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    shown = shlex.join(["nextchar", "train", *(["--corpus", "CORPUS"] if corpus else []),
                        "--max-minutes", f"{minutes:g}", *extra])
    print(f"== {label}: {shown}", flush=True)
    load_before, started = _load(), time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"quality_bench: the {label} run failed (exit {proc.returncode}): "
                         f"{(proc.stderr.strip().splitlines() or [''])[-1]}")
    print("\n".join(line for line in proc.stdout.splitlines()
                    if line.startswith(("corpus", "shakespeare", "step 20:", "done"))), flush=True)
    last = torch.load(out / "checkpoint.pt", weights_only=True)
    return {"label": label, "command": shown, "metrics": last["metrics"],
            "best": last.get("best"), "history": last["history"],
            "model_config": last["model_config"], "train_config": last["train_config"],
            "auto": last.get("auto"), "wall_s": round(time.monotonic() - started, 1),
            "load_before": load_before, "load_after": _load()}


def _export(run: Path, art: Path) -> dict[str, Any]:
    from .export import export_artifact

    manifest = json.loads((export_artifact(run, art) / "manifest.json").read_text("utf-8"))
    return {"checkpoint": manifest["checkpoint"], "files": sorted(manifest["files"]),
            "parity_failed": manifest["parity"]["failed"],
            "max_abs_logit": manifest["parity"]["max_abs_logit"]}


def run_leg(name: str, title: str, corpus: list[str], minutes: float,
            args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.out) / name
    ours = _train(f"{name} ours", root / "ours", minutes, OURS_ARGS, corpus, args)
    ours["export"] = _export(root / "ours", root / "ours-artifact")
    base = _train(f"{name} baseline", root / "baseline", minutes, BASELINE_ARGS, corpus, args)
    ours_val = ours["export"]["checkpoint"]["val_nats_per_char"]  # what export ships
    base_val = base["metrics"]["val_nats_per_char"]  # the baseline's last checkpoint
    best_seen = min(v for v in ours["history"]["val"]["nats"] if v == v)
    leg = {"leg": name, "title": title, "minutes": minutes, "ours": ours, "baseline": base,
           "ours_val": ours_val, "baseline_val": base_val, "delta": ours_val - base_val,
           "target_delta": TARGETS[name], "meets": ours_val - base_val <= TARGETS[name],
           "exported_is_best_seen": abs(ours_val - best_seen) < 1e-9,
           "ours_best_seen": best_seen}
    print(f"{name}: ours {ours_val:.4f} (exported {ours['export']['checkpoint']['file']} step "
          f"{ours['export']['checkpoint']['step']}), baseline {base_val:.4f}: delta "
          f"{leg['delta']:+.4f}, target <= {TARGETS[name]:+.2f}: "
          f"{'meets' if leg['meets'] else 'MISSES'}; exported = best seen: "
          f"{leg['exported_is_best_seen']}", flush=True)
    return leg


def write_small(path: Path, chars: int = 100_000) -> Path:
    """The first `chars` characters (cut at a line end) of the default corpus's first file."""
    doc = sorted(data.load_default_corpus(), key=lambda d: d.name)[0]
    text = doc.text[:chars]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    return path


def run_small(path: str, args: argparse.Namespace) -> dict[str, Any]:
    from .sample import sample_text

    if path == "auto":
        path = str(write_small(Path(args.out) / "small-100k.txt"))

    run = Path(args.out) / "small" / "ours"
    # `nextchar train --corpus FILE` exactly: its own default budget, everything on auto.
    cmd = [sys.executable, "-m", "nextchar.training.cli", "train", "--corpus", path, "--out",
           str(run), "--overwrite", "--no-progress"]
    if args.small_minutes:
        cmd += ["--max-minutes", str(args.small_minutes)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"== small: nextchar train --corpus {path}", flush=True)
    load_before, started = _load(), time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (run.parent / "ours.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"quality_bench: the small run failed: {proc.stderr[-300:]}")
    last = torch.load(run / "checkpoint.pt", weights_only=True)
    text = sample_text(run, prompt="\n", chars=400, temperature=0.8, seed=0)
    print(text, flush=True)
    return {"command": f"nextchar train --corpus {Path(path).name}", "metrics": last["metrics"],
            "best": last["best"], "history": last["history"],
            "model_config": last["model_config"], "train_config": last["train_config"],
            "auto": last.get("auto"), "export": _export(run, run.parent / "ours-artifact"),
            "sample_best_t0.8": text, "wall_s": round(time.monotonic() - started, 1),
            "load_before": load_before, "load_after": _load()}


def _table(legs: list[dict[str, Any]]) -> str:
    lines = ["| leg | run | val nats/char (scored) | steps | params | chars seen | best step |",
             "|---|---|---|---|---|---|---|"]
    for leg in legs:
        for who in ("ours", "baseline"):
            r = leg[who]
            m = r["metrics"]
            val = leg["ours_val"] if who == "ours" else leg["baseline_val"]
            lines.append(f"| {leg['leg']} | {who} | {val:.4f} | {m['steps']} | "
                         f"{m['params']:,} | {m['chars_seen']:,} | "
                         f"{(r.get('best') or {}).get('step')} |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """The benchmark's JSON as the tables docs/benchmarks.md shows."""
    lines = ["| leg | run | scored val nats/char | scored checkpoint | steps | params | "
             "chars seen | train time | load avg before / after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for leg in report["legs"]:
        for who in ("ours", "baseline"):
            r, m = leg[who], leg[who]["metrics"]
            if who == "ours":
                ck = leg["ours"]["export"]["checkpoint"]
                scored = f"{ck['file']} (step {ck['step']})"
            else:
                scored = f"last (step {m['steps']})"
            lines.append(
                f"| {leg['leg']} | {who} | {leg[who + '_val']:.4f} | {scored} | {m['steps']} | "
                f"{m['params']:,} | {m['chars_seen']:,} | {m['train_time_s'] / 60:.1f} min | "
                f"{r['load_before'][0]} / {r['load_after'][0]} |")
    lines += ["", "| leg | ours - baseline | target | verdict | exported = best val seen |",
              "|---|---|---|---|---|"]
    for leg in report["legs"]:
        lines.append(f"| {leg['leg']} | {leg['delta']:+.4f} | <= {leg['target_delta']:+.2f} | "
                     f"{'meets' if leg['meets'] else '**misses**'} | "
                     f"{'yes' if leg['exported_is_best_seen'] else 'no'} |")
    lines += ["", "Commands:", ""]
    for leg in report["legs"]:
        for who in ("ours", "baseline"):
            lines.append(f"- {leg['leg']} {who}: `{leg[who]['command']}`")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="(default: 10)")
    p.add_argument("--short-minutes", type=float, default=2.0, help="(default: 2)")
    p.add_argument("--legs", default="1mb,1mb-short,small,default",
                   help="which legs, in order (default: 1mb,1mb-short,small,default)")
    p.add_argument("--small", default="auto", metavar="FILE",
                   help="the small leg: `nextchar train --corpus FILE` on its defaults, then a "
                        "sample (default: auto, the first 100 KB of the default corpus's first "
                        "file)")
    p.add_argument("--small-minutes", type=float, default=None,
                   help="budget of the --small run (default: train's own, 5 minutes)")
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default="docs/quality_bench.json")
    p.add_argument("--plot", default="docs/quality_bench.png")
    p.add_argument("--subset-source", default=None, metavar="DIR",
                   help="for trying the script out: use these files instead of the default "
                        "corpus for every leg")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="print an earlier run's JSON as markdown tables and exit")
    args = p.parse_args(argv)
    if args.report:
        print(markdown(json.loads(Path(args.report).read_text("utf-8"))))
        return 0

    started = datetime.now(timezone.utc)
    report: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "nextchar.training.quality_bench",
                               *(argv if argv is not None else sys.argv[1:])]),
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": _machine(),
        **_commit(), "legs": []}
    if args.subset_source:
        subset, names = [args.subset_source], ["(--subset-source)"]
        default: list[str] = [args.subset_source]
    else:
        root, names = write_subset(Path(args.out) / "corpus-1mb")
        subset, default = [str(root)], []
    report["subset_files"] = names
    legs = {"default": ("default corpus (5.05 M chars)", default, args.minutes),
            "1mb": ("1 MB subset", subset, args.minutes),
            "1mb-short": ("1 MB subset", subset, args.short_minutes)}
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    for name in args.legs.split(","):
        if name == "small":
            report["small"] = run_small(args.small, args)
        else:
            title, corpus, minutes = legs[name]
            report["legs"].append(run_leg(name, f"{title}, {minutes:g} min", corpus, minutes,
                                          args))
            _plot(report, args.plot)
        json_path.write_text(json.dumps(report, indent=1) + "\n")  # a partial run still counts
    report["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + _table(report["legs"]))
    for leg in report["legs"]:
        print(f"{leg['leg']}: ours - baseline = {leg['delta']:+.4f} nats/char (target <= "
              f"{leg['target_delta']:+.2f}): {'meets' if leg['meets'] else 'MISSES'}")
    print(f"json: {json_path}; curves: {args.plot}")
    return 0


def _plot(report: dict[str, Any], path: str) -> None:
    from .curves import save_panels

    save_panels([(leg["title"], [
        (f"ours: {leg['ours_val']:.3f} (best step {leg['ours']['best']['step']})",
         leg["ours"]["history"]["val"]["time_s"], leg["ours"]["history"]["val"]["nats"]),
        (f"baseline: {leg['baseline_val']:.3f} (last)",
         leg["baseline"]["history"]["val"]["time_s"], leg["baseline"]["history"]["val"]["nats"]),
    ]) for leg in report["legs"]], path)


if __name__ == "__main__":
    sys.exit(main())
