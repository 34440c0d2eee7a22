"""What tracing costs per call: the same server with `--otel` off and on, interleaved.

    python bench/tracing_bench.py --out docs/tracing_bench.json        # `make bench-tracing`

Two `nextchar serve` processes on the peer benchmark's model (loop graph), one with `--otel
--otel-exporter none` (every call sampled: its spans are made and ended, then dropped, so this
is the cost of making them on the server's threads, not of shipping them), one without. Loads:
nextchar.v1 Predict of one 64-character text at concurrency 1 and 64 (closed loops, this
process). Repeats alternate the order; the report gives medians and on/off ratios, and the
per-call difference in microseconds at concurrency 1.
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
from datetime import datetime, timezone
from pathlib import Path

from ab_core import PREDICT, closed_loop, predict_payloads
from peer_bench import Server, free_port, peer_artifact

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"tracing off": [], "tracing on (all sampled, exporter none)":
            ["--otel", "--otel-exporter", "none"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "tracing_bench.json")
    args = p.parse_args(argv)
    artifact = peer_artifact()
    payloads = predict_payloads(1)
    samples: dict[str, dict[int, list[dict[str, float]]]] = {v: {} for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="nextchar-otel-") as tmp:
        work = Path(tmp)
        servers = {}
        try:
            for name, flags in VARIANTS.items():
                port = free_port()
                servers[name] = Server(name, [sys.executable, "-m", "nextchar", "serve",
                                              "--model", str(artifact), "--host", "127.0.0.1",
                                              "--port", str(port), "--no-http", "--log-level",
                                              "WARNING", *flags], port, work,
                                       work / f"{len(servers)}.log")
                servers[name].wait_ready("peer-rnn")
            names = list(VARIANTS)
            for rep in range(args.repeats):
                for name in (names if rep % 2 == 0 else names[::-1]):
                    for c in (1, 64):
                        address = servers[name].address
                        asyncio.run(closed_loop(address, PREDICT, payloads, c, 1.0))
                        s = asyncio.run(closed_loop(address, PREDICT, payloads, c, args.seconds))
                        s["loadavg_1m"] = os.getloadavg()[0]
                        samples[name].setdefault(c, []).append(s)
                        print(f"rep {rep + 1} {name:<42} c={c:<3} {s['rps']:8.1f} req/s p50 "
                              f"{s['p50_ms']:6.2f} p99 {s['p99_ms']:6.2f} ms", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    off, on = list(VARIANTS)
    rows = []
    for c in (1, 64):
        med = {v: {k: statistics.median(s[k] for s in samples[v][c])
                   for k in ("rps", "p50_ms", "p99_ms")} for v in VARIANTS}
        rows.append({"concurrency": c, "off": med[off], "on": med[on],
                     "rps_on_over_off": round(med[on]["rps"] / med[off]["rps"], 3),
                     "us_per_call_added": round(1e6 / med[on]["rps"] - 1e6 / med[off]["rps"], 1)})
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    args.out.write_text(json.dumps({
        "command": " ".join([sys.executable, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {os.cpu_count()} cores", "commit": head,
        "rows": rows, "samples": {v: {str(c): x for c, x in d.items()} for v, d in samples.items()},
    }, indent=1))
    print("\n| concurrency | off req/s | on req/s | on/off | off p50 ms | on p50 ms | added us/call |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['off']['rps']:.0f} | {r['on']['rps']:.0f} | "
              f"{r['rps_on_over_off']:.3f} | {r['off']['p50_ms']:.2f} | {r['on']['p50_ms']:.2f} | "
              f"{r['us_per_call_added']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
