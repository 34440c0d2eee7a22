"""The 64-stream Generate burst (bench/ab_core.py's `generate_load`) against servers started
with different NEXTCHAR_* settings, interleaved: characters/s and the first character's latency.

    .venv/bin/python bench/generate_variants.py               # every variant of VARIANTS
    REPEATS=3 .venv/bin/python bench/generate_variants.py nice0 nice5   # only the named ones

Each variant: REPEATS (default 3) repeats of a fresh server, 2 bursts per server; medians
printed at the end. Variants: the defaults, a 1 ms GIL switch interval, --generate-flush-ms 0,
60 and 200 (each with no message cap), no message cap (--generate-max-messages-per-s 0),
--worker-nice 0/5/10/19 (docs/benchmarks.md, "Worker priority"), --backend-workers 1/2, and
--generate-prefill-wait-ms 0 and 100 (the default: 50).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

from ab_core import generate_load
from peer_bench import Server, free_port, peer_artifact

VARIANTS = {"default": {}, "gil1": {"NEXTCHAR_GIL_SWITCH_INTERVAL_MS": "1"},
            "flush0": {"NEXTCHAR_GENERATE_FLUSH_MS": "0", "NEXTCHAR_GENERATE_MAX_MESSAGES_PER_S": "0"},
            "nocap": {"NEXTCHAR_GENERATE_MAX_MESSAGES_PER_S": "0"},
            "flush60": {"NEXTCHAR_GENERATE_FLUSH_MS": "60", "NEXTCHAR_GENERATE_MAX_MESSAGES_PER_S": "0"},
            "flush200": {"NEXTCHAR_GENERATE_FLUSH_MS": "200", "NEXTCHAR_GENERATE_MAX_MESSAGES_PER_S": "0"},
            "nice5": {"NEXTCHAR_WORKER_NICE": "5"}, "nice0": {"NEXTCHAR_WORKER_NICE": "0"},
            "nice10": {"NEXTCHAR_WORKER_NICE": "10"}, "nice19": {"NEXTCHAR_WORKER_NICE": "19"},
            "workers1": {"NEXTCHAR_BACKEND_WORKERS": "1"}, "workers2": {"NEXTCHAR_BACKEND_WORKERS": "2"},
            "wait0": {"NEXTCHAR_GENERATE_PREFILL_WAIT_MS": "0"},
            "wait100": {"NEXTCHAR_GENERATE_PREFILL_WAIT_MS": "100"},
            "delay1": {"NEXTCHAR_MAX_BATCH_DELAY_MS": "1"},
            "delay3": {"NEXTCHAR_MAX_BATCH_DELAY_MS": "3"},
            "par256": {"NEXTCHAR_PARALLEL_BATCH_CHARS": "256"}}


def main(names: list[str]) -> None:
    variants = {k: v for k, v in VARIANTS.items() if not names or k in names}
    artifact = peer_artifact()
    work = Path(tempfile.mkdtemp(prefix="nextchar-genvar-"))
    results: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    for rep in range(int(os.environ.get("REPEATS", "3"))):
        for name, extra in variants.items():
            port = free_port()
            env = {**os.environ, "NEXTCHAR_HTTP_PORT": "0", **extra}
            server = Server(name, [sys.executable, "-m", "nextchar", "serve", "--model",
                                   str(artifact), "--host", "127.0.0.1", "--port", str(port),
                                   "--log-level", "WARNING"], port, work, work / f"{name}.log", env)
            server.wait_ready("peer-rnn")
            try:
                for _ in range(2):
                    g = asyncio.run(generate_load(server.address))
                    results[name].append(g)
                    print(f"rep {rep + 1} {name:<8} {g['rps']:7.0f} chars/s first char p50 "
                          f"{g['p50_ms']:6.1f} p99 {g['p99_ms']:6.1f} ms", flush=True)
            finally:
                server.stop()
    for name, gs in results.items():
        print(f"{name:<8} median {statistics.median(g['rps'] for g in gs):7.0f} chars/s, first "
              f"char p50 {statistics.median(g['p50_ms'] for g in gs):6.1f} ms, p99 "
              f"{statistics.median(g['p99_ms'] for g in gs):6.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
