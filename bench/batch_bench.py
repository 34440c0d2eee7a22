"""Batch-job benchmark: `nextchar batch` over 100k lines through one server, two server processes,
and in-process (`--local`), on a realistically sized model.

    flock -x /tmp/nextchar-cpu.lock .venv/bin/python bench/batch_bench.py          # ~5 minutes
    make bench-batch                                                                 # the same
    .venv/bin/python bench/batch_bench.py --lines 5000 --workdir /tmp/bb            # smoke run

The model is a random-init artifact of the size a real character model has (84-character
vocabulary, RNN, embed 64, hidden 256, 2 layers): throughput does not depend on the weights.
Every run is the real CLI in a subprocess, timed from start to exit (start-up, GetModelInfo,
reading, writing and fsync included); the job's own items/s from its summary line is reported
beside it. Each output is checked: one line per input line, in order, no error records.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from serve_process import ServeProcess

REPO = Path(__file__).resolve().parents[1]
# 84 characters, as a Shakespeare-like corpus has.
VOCAB84 = "\n !\"&'(),-.:;?$%*/[]_@0123456789" + "".join(map(chr, range(65, 91))) + \
    "".join(map(chr, range(97, 123)))
MODEL = {"cell": "rnn", "embed_dim": 64, "hidden_size": 256, "num_layers": 2}
CLI = [sys.executable, "-m", "nextchar.client.cli"]


def build_artifact(root: Path) -> Path:
    from nextchar.training.export import build_random_artifact

    path = root / "rnn-v84-h256"
    if not (path / "manifest.json").exists():
        build_random_artifact(path, vocab=VOCAB84, seed=0, name="bench-batch-rnn-h256", **MODEL)
    return path


def write_input(path: Path, lines: int, chars: int) -> None:
    if path.exists() and path.stat().st_size == lines * (chars + 1):
        return
    rng = random.Random(0)
    alphabet = VOCAB84.replace("\n", "")
    with path.open("w", encoding="utf-8") as f:
        for _ in range(lines):
            f.write("".join(rng.choices(alphabet, k=chars)) + "\n")


def Server(artifact: Path, extra: list[str]) -> ServeProcess:  # noqa: N802 (reads as a class)
    return ServeProcess(["--model", str(artifact), "--log-level", "WARNING", *extra])


@dataclass
class Run:
    name: str
    command: str
    wall_s: float
    lines_per_s: float  # end to end: lines / wall seconds of the CLI process
    job_items_per_s: float  # the job's own summary (after start-up and GetModelInfo)
    client_cpu_s: float  # user+sys of the CLI process (the model itself, with --local)
    server_cpu_s: float  # user+sys of the server processes during the job

    @property
    def cores_used(self) -> float:
        return (self.client_cpu_s + self.server_cpu_s) / self.wall_s


def run_batch(name: str, inp: Path, out: Path, target: list[str], opts: list[str],
              lines: int, servers: list[Server] | None = None) -> Run:
    servers = servers or []
    server_cpu = sum(s.cpu_s() for s in servers)
    cmd = [*CLI, "batch", str(inp), "-o", str(out), "--restart", "--no-progress", *target, *opts]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu = sum(s.cpu_s() for s in servers) - server_cpu
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}: {proc.stderr.strip()}")
    m = re.search(r"(\d+) items \((\d+) errors.* ([0-9.]+) items/s", proc.stderr)
    if not m or int(m.group(1)) != lines or int(m.group(2)) != 0:
        raise SystemExit(f"{name}: unexpected summary: {proc.stderr.strip()}")
    check_output(out, lines)
    shown = " ".join(["nextchar", "batch", "IN", "-o", "OUT", *target, *opts])
    return Run(name, shown, wall, lines / wall, float(m.group(3)),
               (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
               server_cpu)


def check_output(out: Path, lines: int) -> None:
    with out.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            rec = json.loads(line)
            if rec["index"] != i or "error" in rec:
                raise SystemExit(f"{out}: line {i} is wrong: {line[:200]}")
    if i + 1 != lines:
        raise SystemExit(f"{out}: {i + 1} lines, expected {lines}")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {platform.machine()} ({cpu}), no GPU used, {platform.system()}"


def commit() -> str:
    """The commit the server code came from, marked when server/client/proto differ from it."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "server", "client", "proto")
    return git("rev-parse", "--short", "HEAD") + (" (+ uncommitted changes)" if dirty else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lines", type=int, default=100_000)
    p.add_argument("--chars", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--texts-per-request", type=int, default=64)
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "batch-bench")
    p.add_argument("--out", type=Path, help="write the runs here as JSON (make bench-batch: "
                   "docs/batch_bench.json)")
    args = p.parse_args()
    load_start = os.getloadavg()[0]
    args.workdir.mkdir(parents=True, exist_ok=True)
    artifact = build_artifact(args.workdir)
    inp = args.workdir / f"in-{args.lines}x{args.chars}.txt"
    write_input(inp, args.lines, args.chars)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tpr = ["--texts-per-request", str(args.texts_per_request)]
    c1, c2 = args.concurrency, 2 * args.concurrency
    runs: list[Run] = []

    one = Server(artifact, [])
    try:
        for c in (c1, c2):
            runs.append(run_batch(f"one server process, concurrency {c}", inp,
                                  args.workdir / "out-one.jsonl", ["--server", one.address],
                                  ["--concurrency", str(c), *tpr], args.lines, [one]))
    finally:
        one.stop()
    two = [Server(artifact, []), Server(artifact, [])]
    try:
        runs.append(run_batch(f"two server processes (round_robin), concurrency {c2}", inp,
                              args.workdir / "out-two.jsonl",
                              ["--server", two[0].address, "--server", two[1].address],
                              ["--concurrency", str(c2), *tpr], args.lines, two))
    finally:
        for s in two:
            s.stop()
    for c in (c1, c2):
        runs.append(run_batch(f"in-process (--local), concurrency {c}", inp,
                              args.workdir / "out-local.jsonl", ["--local", str(artifact)],
                              ["--concurrency", str(c), *tpr], args.lines))

    print(f"\n{args.lines} lines x {args.chars} chars; model {MODEL} V={len(VOCAB84)}; "
          f"{date}; {machine()}; commit {commit()}; load average (1 min) {load_start:.2f} at "
          f"the start, {os.getloadavg()[0]:.2f} at the end\n")
    if args.out:
        args.out.write_text(json.dumps({
            "date_utc": date, "machine": machine(), "commit": commit(),
            "command": " ".join(["bench/batch_bench.py", *sys.argv[1:]]),
            "lines": args.lines, "chars": args.chars, "model": {"vocab": len(VOCAB84), **MODEL},
            "loadavg_1m_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
            "runs": [{**asdict(r), "cores_used": round(r.cores_used, 2)} for r in runs],
        }, indent=1) + "\n", encoding="utf-8")
    print("| run | lines/s (end to end) | job items/s | wall s | CLI CPU s | server CPU s "
          "| cores used | command |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in runs:
        print(f"| {r.name} | {r.lines_per_s:,.0f} | {r.job_items_per_s:,.0f} | {r.wall_s:.1f} | "
              f"{r.client_cpu_s:.1f} | {r.server_cpu_s:.1f} | {r.cores_used:.2f} | "
              f"`{r.command}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
