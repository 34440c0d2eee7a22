"""Generate under a steady arrival of new streams: do the streams already running keep their
pace? (the other side of `--generate-prefill-wait-ms`, whose burst benchmark is
bench/generate_variants.py).

    flock -x /tmp/nextchar-cpu.lock .venv/bin/python bench/generate_churn.py --out docs/generate_churn.json

Per repeat and variant, a fresh `nextchar serve` on the peer benchmark's model (ONNX, CPU,
defaults otherwise; a variant adds NEXTCHAR_* settings): 32 long streams (4,096 characters
each) start; after 1.5 s, for --seconds, a new short stream (a 30-49 character prompt, 10
characters) opens every --gap-ms. Reported: the long streams' characters per second during
that window, and the short streams' time to their first character (p50). Variants run in turns,
--repeats times; medians at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from generate_bench import commit
from peer_bench import Server, free_port, peer_artifact

from nextchar.v1 import nextchar_pb2 as pb
from nextchar.v1 import nextchar_pb2_grpc as pb_grpc

PROMPT = "To be, or not to be, that is the question: whether"
VARIANTS = {"default": {}, "wait0": {"NEXTCHAR_GENERATE_PREFILL_WAIT_MS": "0"}}
LONG_STREAMS = 32


async def drive(address: str, gap_s: float, seconds: float) -> dict[str, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.NextCharStub(channel)
        long_chars = 0
        firsts: list[float] = []

        async def long(i: int) -> None:
            nonlocal long_chars
            async for r in stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_chars=4096,
                                                            seed=i)):
                long_chars += len(r.text)

        async def short(i: int) -> None:
            t0 = time.perf_counter()
            request = pb.GenerateRequest(prompt=PROMPT[: 30 + i % 20], max_chars=10, seed=1000 + i)
            async for r in stub.Generate(request):
                if r.text:
                    firsts.append(time.perf_counter() - t0)
                    break

        longs = [asyncio.create_task(long(i)) for i in range(LONG_STREAMS)]
        await asyncio.sleep(1.5)
        chars_at_start, t0 = long_chars, time.perf_counter()
        shorts = []
        while time.perf_counter() - t0 < seconds:
            shorts.append(asyncio.create_task(short(len(shorts))))
            await asyncio.sleep(gap_s)
        elapsed, chars = time.perf_counter() - t0, long_chars - chars_at_start
        await asyncio.gather(*shorts)
        for task in longs:
            task.cancel()
        await asyncio.gather(*longs, return_exceptions=True)
    return {"long_chars_per_s": chars / elapsed,
            "short_first_char_ms_p50": 1e3 * statistics.median(firsts),
            "short_streams": len(firsts)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gap-ms", type=float, default=3.0, help="between two new short streams")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--out", type=Path, help="write every sample and the medians here (JSON)")
    args = ap.parse_args()
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    artifact = peer_artifact()
    work = Path(tempfile.mkdtemp(prefix="nextchar-churn-"))
    for rep in range(args.repeats):
        for name, extra in VARIANTS.items():
            port = free_port()
            server = Server(name, [sys.executable, "-m", "nextchar", "serve", "--model",
                                   str(artifact), "--host", "127.0.0.1", "--port", str(port),
                                   "--log-level", "WARNING"], port, work, work / f"{name}.log",
                            {**os.environ, "NEXTCHAR_HTTP_PORT": "0", **extra})
            server.wait_ready("peer-rnn")
            try:
                sample = asyncio.run(drive(server.address, args.gap_ms / 1e3, args.seconds))
            finally:
                server.stop()
            samples[name].append(sample)
            print(f"rep {rep + 1} {name:<8} long streams {sample['long_chars_per_s']:7.0f} chars/s"
                  f"  short streams' first char p50 {sample['short_first_char_ms_p50']:5.1f} ms"
                  f" ({sample['short_streams']})", flush=True)
    medians = {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]}
               for name, runs in samples.items()}
    for name, m in medians.items():
        print(f"{name:<8} median: long streams {m['long_chars_per_s']:7.0f} chars/s, short "
              f"streams' first char p50 {m['short_first_char_ms_p50']:5.1f} ms")
    if args.out:
        report: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(),
            "command": " ".join(["bench/generate_churn.py", *sys.argv[1:]]),
            "long_streams": LONG_STREAMS, "gap_ms": args.gap_ms, "seconds": args.seconds,
            "variants": VARIANTS, "samples": samples, "medians": medians}
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
