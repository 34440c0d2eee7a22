"""Streaming generation benchmark: Generate with step batching vs the two ways to do without it.

    flock -x /tmp/nextchar-cpu.lock python bench/generate_bench.py --out /tmp/genbench
    python bench/generate_bench.py --quick --out /tmp/genbench   # a smoke run, ~30 s

One run, three variants, each driven by this process (grpc.aio) against a real `nextchar serve`
subprocess (ONNX backend, CPU) serving the realistic model (V=84, E=64, H=256, 2-layer tanh RNN):

  stream        64 concurrent Generate streams of 200 characters, step batching on (default)
  stream-flush0 the same with --generate-flush-ms 0 --generate-max-messages-per-s 0 (a message
                per character per stream)
  stream-solo   the same against a server started with --no-step-batching (one B=1 model call
                per stream per character)
  resend        64 concurrent clients that each generate 200 characters by re-sending the
                growing text to Predict every step and sampling from the answer (server batching
                on): what a client must do without continuation state
  floor         the same 64 streams against bench/grpc_floor.py: grpc.aio on uvloop sending the
                first character as soon as each call's handler runs, no model and no nextchar
                code. Its time to the first character is what accepting 64 calls costs these
                cores (server and this client) before any work; its chars/s mean nothing.

Repeats are interleaved (stream, solo, resend, stream, ...) so machine noise hits all alike.
Reports aggregate generated chars/s, time per generated character per stream (stream duration
/ characters) and time to the first character, p50/p99 over streams, and the chars per message.
The Generate variants send the same 64 requests (seed i, prompt i % 4), so their texts must be
equal; the report counts the texts that differ (float noise flipping a draw would show there;
the floor's texts are not a model's and are left out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from serve_process import ServeProcess

from nextchar.v1 import nextchar_pb2 as pb
from nextchar.v1 import nextchar_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]

VOCAB84 = "\n " + string.ascii_letters + string.digits + "!\"&'(),-.:;?$%*/[]_@"
MODEL = {"cell": "rnn", "embed_dim": 64, "hidden_size": 256, "num_layers": 2}
PROMPTS = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind",
           "The slings and arrows of outrageous fortune", "Or to take arms against a sea"]


def build_artifact(root: Path) -> Path:
    from nextchar.training.export import build_random_artifact

    assert len(VOCAB84) == 84 and len(set(VOCAB84)) == 84
    path = root / "rnn-h256-v84"
    if not (path / "manifest.json").exists():
        build_random_artifact(path, vocab=VOCAB84, seed=0, name="bench-rnn-h256", **MODEL)
    return path


def Server(artifact: Path, *flags: str) -> ServeProcess:  # noqa: N802 (reads as a class)
    return ServeProcess(["--model", str(artifact), "--backend", "onnx", "--device", "cpu",
                         "--log-level", "WARNING", *flags], what=f"server ({' '.join(flags)})")


def Floor() -> ServeProcess:  # noqa: N802 (reads as a class)
    return ServeProcess([], command=[sys.executable, str(Path(__file__).with_name("grpc_floor.py"))],
                        what="grpc floor server")


@dataclass
class StreamTrace:
    text: str = ""
    chars: int = 0
    messages: int = 0
    first_s: float = 0.0  # time to the first character
    total_s: float = 0.0  # time to the last character


async def one_stream(stub: pb_grpc.NextCharStub, i: int, chars: int) -> StreamTrace:
    req = pb.GenerateRequest(prompt=PROMPTS[i % len(PROMPTS)], max_chars=chars, seed=i,
                             temperature=1.0)
    trace = StreamTrace()
    t0 = time.perf_counter()
    async for r in stub.Generate(req):
        if r.text:
            if not trace.chars:
                trace.first_s = time.perf_counter() - t0
            trace.chars += len(r.text)
            trace.messages += 1
            trace.text += r.text
    trace.total_s = time.perf_counter() - t0
    return trace


async def one_resender(stub: pb_grpc.NextCharStub, i: int, chars: int, top_k: int,
                       vocab: list[str]) -> StreamTrace:
    """Generates by re-sending the whole growing text to Predict for every character."""
    rng = np.random.default_rng(i)
    text = PROMPTS[i % len(PROMPTS)]
    trace = StreamTrace()
    t0 = time.perf_counter()
    for _ in range(chars):
        resp = await stub.Predict(pb.PredictRequest(texts=[text], top_k=top_k))
        top = resp.predictions[0].top
        p = np.array([c.prob for c in top], dtype=np.float64)
        text += top[int(rng.choice(len(top), p=p / p.sum()))].char
        if not trace.chars:
            trace.first_s = time.perf_counter() - t0
        trace.chars += 1
        trace.messages += 1
    trace.total_s = time.perf_counter() - t0
    assert all(c in vocab for c in text)
    return trace


async def drive(address: str, variant: str, streams: int, chars: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.NextCharStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        vocab = list(info.vocab)
        top_k = info.limits.max_top_k

        def job(i: int) -> Any:
            if variant == "resend":
                return one_resender(stub, i, chars, top_k, vocab)
            return one_stream(stub, i, chars)

        await asyncio.gather(*(job(i) for i in range(min(8, streams))))  # warm-up
        t0 = time.perf_counter()
        traces = await asyncio.gather(*(job(i) for i in range(streams)))
        wall = time.perf_counter() - t0
    total = sum(t.chars for t in traces)
    per_char_ms = sorted(1000 * t.total_s / t.chars for t in traces)
    first_ms = sorted(1000 * t.first_s for t in traces)
    return {
        "variant": variant, "streams": streams, "chars": total, "wall_s": wall,
        "chars_per_s": total / wall,
        "per_char_ms_p50": statistics.median(per_char_ms),
        "per_char_ms_p99": float(np.percentile(per_char_ms, 99)),
        "first_char_ms_p50": statistics.median(first_ms),
        "first_char_ms_p99": float(np.percentile(first_ms, 99)),
        "chars_per_message": total / sum(t.messages for t in traces),
        "texts": [t.text for t in traces],
    }


def commit() -> str:
    """The commit the server code came from, marked when server/client/proto differ from it."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "server", "client", "proto")
    return git("rev-parse", "--short", "HEAD") + (" (+ uncommitted changes)" if dirty else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the artifact and results")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--chars", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="16 streams of 50 chars, 1 repeat")
    ap.add_argument("--json", type=Path, help="also write the report here (make bench-generate: "
                    "docs/generate_bench.json)")
    args = ap.parse_args()
    load_start = os.getloadavg()[0]
    if args.quick:
        args.streams, args.chars, args.repeats = 16, 50, 1
    args.out.mkdir(parents=True, exist_ok=True)
    artifact = build_artifact(args.out)
    servers = {"stream": Server(artifact),
               "stream-flush0": Server(artifact, "--generate-flush-ms", "0",
                                       "--generate-max-messages-per-s", "0"),
               "stream-solo": Server(artifact, "--no-step-batching")}
    servers["resend"] = servers["stream"]
    servers["floor"] = Floor()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in servers}
    try:
        for rep in range(args.repeats):
            for variant, server in servers.items():
                r = asyncio.run(drive(server.address, variant, args.streams, args.chars))
                runs[variant].append(r)
                print(f"[{rep + 1}/{args.repeats}] {variant:12s} {r['chars_per_s']:8.0f} chars/s  "
                      f"{r['per_char_ms_p50']:7.2f} ms/char p50  wall {r['wall_s']:.2f}s", flush=True)
    finally:
        for s in {id(s): s for s in servers.values()}.values():
            s.stop()
    reference = runs["stream"][0]["texts"]
    differ = {v: sum(a != b for r in rs for a, b in zip(r["texts"], reference, strict=True))
              for v, rs in runs.items() if v not in ("resend", "floor")}
    for rs in runs.values():
        for r in rs:
            del r["texts"]
    median = {v: statistics.median(r["chars_per_s"] for r in rs) for v, rs in runs.items()}
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores, "
                   f"{platform.python_implementation()} {platform.python_version()}",
        "commit": commit(), "command": " ".join(["bench/generate_bench.py", *sys.argv[1:]]),
        "loadavg_1m_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "model": {"vocab": 84, **MODEL}, "backend": "onnx (cpu)",
        "streams": args.streams, "chars": args.chars, "repeats": args.repeats,
        "median_chars_per_s": median,
        "speedup_vs_resend": median["stream"] / median["resend"],
        "speedup_vs_solo": median["stream"] / median["stream-solo"],
        "texts_differing_from_first_stream_run": differ,
        "runs": runs,
    }
    (args.out / "generate_bench.json").write_text(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: report[k] for k in ("date", "machine", "median_chars_per_s",
                                             "speedup_vs_resend", "speedup_vs_solo",
                                             "texts_differing_from_first_stream_run")}, indent=2))
    print("\n| variant | chars/s (median of runs) | runs | per char p50 / p99 ms | "
          "first char p50 / p99 ms | chars/message |\n|---|---|---|---|---|---|")
    for v, rs in runs.items():
        mid = sorted(rs, key=lambda r: r["chars_per_s"])[len(rs) // 2]
        each = ", ".join(f"{r['chars_per_s']:,.0f}" for r in rs)
        print(f"| {v} | {median[v]:,.0f} | {each} | "
              f"{mid['per_char_ms_p50']:.2f} / {mid['per_char_ms_p99']:.2f} | "
              f"{mid['first_char_ms_p50']:.1f} / {mid['first_char_ms_p99']:.1f} | "
              f"{mid['chars_per_message']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
