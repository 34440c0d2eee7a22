"""Priority lanes under a batch job: interactive Predict latency on an idle server, and while a
`nextchar batch` job keeps the same server saturated, with the job in the low lane (lanes on)
and in the high lane beside the interactive calls (what a server without lanes does).

    python bench/priority_bench.py --out docs/priority_bench.json     # `make bench-priority`

One `nextchar serve` on the peer benchmark's model (loop graph); the interactive caller is one
closed loop of single 64-character Predict calls (this process); the job is the real
`nextchar batch` CLI over a file of 64-character lines, 4 requests of 64 texts in flight, in
its own process, at nice 19: in production the job's client runs on another machine, and here
it must not take the 2 cores from the server it measures (both lane settings run it the same
way; --job-nice 0 runs it at normal priority). Phases are interleaved (idle, low, high, in a rotated order per repeat); the
report gives medians over repeats and each phase's p99 over the idle p99 of the same repeat.
Target (issue 13): with lanes, p99 under the job <= 2x idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from ab_core import PREDICT, closed_loop, predict_payloads
from peer_bench import VOCAB, Server, free_port, peer_artifact

# nextchar serve's HTTP front end defaults to port 8000: servers this script starts pick a free
# one, so they never collide with each other or with a server already on 8000.
os.environ.setdefault("NEXTCHAR_HTTP_PORT", "0")

REPO = Path(__file__).resolve().parents[1]


def write_job_input(path: Path, lines: int, chars: int = 64) -> None:
    rng = np.random.default_rng(1)
    alphabet = np.array(list(VOCAB[1:]))
    with path.open("w") as f:
        for _ in range(lines):
            f.write("".join(rng.choice(alphabet, size=chars)) + "\n")


def start_job(address: str, priority: str, inp: Path, out: Path,
              nice: int) -> subprocess.Popen[bytes]:
    out.unlink(missing_ok=True)
    return subprocess.Popen([sys.executable, "-m", "nextchar", "batch", str(inp), "-o", str(out),
                             "--server", address, "--priority", priority, "--no-progress",
                             "--restart"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=lambda: os.nice(nice))


def lines_in(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--job-lines", type=int, default=400_000)
    p.add_argument("--job-nice", type=int, default=19, help="niceness of the batch job's client")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra `nextchar serve` argument (repeatable), e.g. "
                   "--serve-arg=--gil-switch-interval-ms=1")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "priority_bench.json")
    args = p.parse_args(argv)
    artifact = peer_artifact()
    payloads = predict_payloads(1)
    phases: dict[str, list[dict[str, float]]] = {"idle": [], "job low (lanes)": [],
                                                  "job high (no lanes)": []}
    order = list(phases)
    with tempfile.TemporaryDirectory(prefix="nextchar-prio-") as tmp:
        work = Path(tmp)
        inp = work / "job.txt"
        write_job_input(inp, args.job_lines)
        port = free_port()
        server = Server("nextchar", [sys.executable, "-m", "nextchar", "serve", "--model",
                                     str(artifact), "--host", "127.0.0.1", "--port", str(port),
                                     "--log-level", "WARNING", *args.serve_arg], port, work,
                        work / "server.log")
        try:
            server.wait_ready("peer-rnn")
            asyncio.run(closed_loop(server.address, PREDICT, payloads, 1, 2.0))  # warm-up
            for rep in range(args.repeats):
                shift = rep % len(order)
                for phase in order[shift:] + order[:shift]:
                    job = None
                    out = work / "out.jsonl"
                    if phase != "idle":
                        job = start_job(server.address, "low" if "low" in phase else "high",
                                        inp, out, args.job_nice)
                        time.sleep(3.0)  # the job connects, reads its spec and saturates
                    before, t0 = lines_in(out), time.perf_counter()
                    s = asyncio.run(closed_loop(server.address, PREDICT, payloads, 1,
                                                args.seconds))
                    s["job_texts_per_s"] = (lines_in(out) - before) / (time.perf_counter() - t0)
                    s["loadavg_1m"] = os.getloadavg()[0]
                    if job is not None:
                        if job.poll() is not None:
                            raise SystemExit(f"the batch job ended early (exit {job.returncode}):"
                                             f" raise --job-lines")
                        job.terminate()
                        job.wait(30)
                    phases[phase].append(s)
                    print(f"rep {rep + 1} {phase:<20} interactive {s['rps']:7.1f} req/s p50 "
                          f"{s['p50_ms']:6.2f} p99 {s['p99_ms']:6.2f} ms; job "
                          f"{s['job_texts_per_s']:8.0f} texts/s", flush=True)
        finally:
            server.stop()
    rows = []
    for phase, samples in phases.items():
        ratios = [s["p99_ms"] / idle["p99_ms"] for s, idle in zip(samples, phases["idle"],
                                                                    strict=True)]
        rows.append({"phase": phase,
                     **{k: round(statistics.median(s[k] for s in samples), 3)
                        for k in ("rps", "p50_ms", "p99_ms", "job_texts_per_s")},
                     "p99_over_idle": round(statistics.median(ratios), 2)})
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    result = {"command": " ".join([sys.executable, *sys.argv]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.node()} {os.cpu_count()} cores", "commit": head,
              "repeats": args.repeats, "seconds": args.seconds, "job_nice": args.job_nice,
              "serve_args": args.serve_arg,
              "rows": rows, "samples": phases}
    args.out.write_text(json.dumps(result, indent=1))
    print("\n| phase | interactive req/s | p50 ms | p99 ms | p99 / idle p99 | job texts/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['p99_over_idle']:.2f} | {r['job_texts_per_s']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
