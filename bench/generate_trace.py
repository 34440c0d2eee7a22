"""Where a Generate stream's time to the first character goes, stage by stage, in the burst of
bench/generate_bench.py (64 streams opened together, 200 characters each).

    flock -x /tmp/nextchar-cpu.lock .venv/bin/python bench/generate_trace.py --out docs/generate_trace.json
    .venv/bin/python bench/generate_trace.py --chars 1 --tiny      # accept cost alone: no steps, ~no model

Runs `nextchar serve` in a subprocess that records, per stream, time.monotonic() (one clock for
every process on Linux) at each stage, and dumps them when told (SIGUSR1):
  open          the Generate handler admitted the stream (Generator.open): the call was accepted,
                its request read and validated
  prefill_done  the prompt's model call returned (finish_prefill, on the worker)
  first_posted  its first character was sampled and posted to the event loop
  yield         the servicer took the first text (GenerationStream.chunks)
  client        the client received it
all from the moment the client started the burst. Also every model call of the burst (start,
end, rows, prompt length; T=-1 marks a step), with the CPU time its worker thread spent in the
call (time.thread_time: the model, and nextchar's Python around it: padding, sampling the
first characters, posting them) and the wall and CPU time of the backend's run alone (ONNX
Runtime): a call's wall time beyond its CPU time is time its thread waited for a core or the
GIL. The recording wraps a few functions of the server (below) and costs it a few
microseconds per stream.

--tiny serves a 1-layer, 8-unit model of the same vocabulary: model calls cost ~0.1 ms, so what
is left is the server's per-call cost. With --chars 1 no step runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from generate_bench import MODEL, PROMPTS, VOCAB84, build_artifact, commit

from nextchar.v1 import nextchar_pb2 as pb
from nextchar.v1 import nextchar_pb2_grpc as pb_grpc

STAGES = ["open", "prefill_done", "first_posted", "yield"]


def serve_traced(argv: list[str]) -> None:
    """The server side: nextchar serve with the stage clocks patched in."""
    import nextchar.server.backends.onnx as onnx_mod
    import nextchar.server.batcher as batcher_mod
    import nextchar.server.generator as gen_mod
    from nextchar.client.cli import main

    streams: dict[int, dict[str, Any]] = {}
    # (start, end, rows, T or -1, thread CPU ms, run wall ms, run CPU ms)
    calls: list[tuple[float, float, int, int, float, float, float]] = []
    runs = threading.local()  # the backend run of the call this thread is in

    def wrap(cls: Any, name: str, make: Any) -> None:
        setattr(cls, name, make(getattr(cls, name)))

    def on_open(orig: Any) -> Any:
        def open_(self: Any, params: Any, deadline: Any = None) -> Any:
            s = orig(self, params, deadline)
            streams[id(s)] = {"seed": params.seed, "open": time.monotonic()}
            return s
        return open_

    def on_first(orig: Any) -> Any:
        def first(self: Any, batch: list[Any]) -> None:
            now = time.monotonic()
            for s in batch:
                streams[id(s)]["prefill_done"] = now
            orig(self, batch)
            now = time.monotonic()
            for s in batch:
                streams[id(s)]["first_posted"] = now
        return first

    def on_chunks(orig: Any) -> Any:
        async def chunks(self: Any) -> Any:
            seen = False
            async for c in orig(self):
                if not seen:
                    streams[id(self)]["yield"] = time.monotonic()
                    seen = True
                yield c
        return chunks

    def timed(orig: Any, length: Any) -> Any:
        def call(self: Any, *args: Any) -> Any:
            t0, c0 = time.monotonic(), time.thread_time()
            out = orig(self, *args)
            run_wall, run_cpu = runs.last
            calls.append((t0, time.monotonic(), len(args[0]), length(args[0]),
                          1e3 * (time.thread_time() - c0), run_wall, run_cpu))
            return out
        return call

    def on_run(orig: Any) -> Any:
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            t0, c0 = time.monotonic(), time.thread_time()
            out = orig(self, *args, **kwargs)
            runs.last = (1e3 * (time.monotonic() - t0), 1e3 * (time.thread_time() - c0))
            return out
        return run

    wrap(gen_mod.Generator, "open", on_open)
    wrap(gen_mod.Generator, "_first_characters", on_first)
    wrap(gen_mod.GenerationStream, "chunks", on_chunks)
    wrap(onnx_mod.OnnxBackend, "run", on_run)
    wrap(batcher_mod.Batcher, "_compute",
         lambda orig: timed(orig, lambda items: max(len(i.ids) for i in items)))
    wrap(batcher_mod.Batcher, "run_model", lambda orig: timed(orig, lambda ids: -1))
    def dump(*_: Any) -> None:
        # On the main thread (the event loop's), between two of its bytecodes; model threads
        # may still append to `calls`, so it is copied first (list() holds the GIL throughout).
        Path(os.environ["NEXTCHAR_TRACE_OUT"]).write_text(
            json.dumps({"streams": list(streams.values()), "calls": list(calls)}))
        os._exit(0)

    signal.signal(signal.SIGUSR1, dump)
    sys.argv = ["nextchar", "serve", *argv]
    sys.exit(main())


async def one_stream(stub: pb_grpc.NextCharStub, i: int, chars: int) -> float:
    req = pb.GenerateRequest(prompt=PROMPTS[i % len(PROMPTS)], max_chars=chars, seed=i,
                             temperature=1.0)
    first = 0.0
    async for r in stub.Generate(req):
        if r.text and not first:
            first = time.monotonic()
    return first


async def burst(address: str, streams: int, chars: int) -> tuple[float, list[float]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.NextCharStub(channel)
        await asyncio.gather(*(one_stream(stub, 1000 + i, chars) for i in range(8)))  # warm-up
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        firsts = await asyncio.gather(*(one_stream(stub, i, chars) for i in range(streams)))
    return t0, list(firsts)


def summary(values: list[float]) -> dict[str, float]:
    return {"p0": round(min(values), 1), "p50": round(statistics.median(values), 1),
            "max": round(max(values), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--chars", type=int, default=200)
    ap.add_argument("--bursts", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="serve a 1-layer, 8-unit model")
    ap.add_argument("--workdir", type=Path, default=Path("runs/generate_trace"))
    ap.add_argument("--out", type=Path, help="write the report (JSON) here")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from nextchar.training.export import build_random_artifact

        artifact = args.workdir / "tiny"
        if not (artifact / "manifest.json").exists():
            build_random_artifact(artifact, vocab=VOCAB84, seed=0, name="tiny", cell="rnn",
                                  embed_dim=8, hidden_size=8, num_layers=1)
    else:
        artifact = build_artifact(args.workdir)
    trace_file = args.workdir / "server_trace.json"
    env = {**os.environ, "NEXTCHAR_TRACE_OUT": str(trace_file), "NEXTCHAR_HTTP_PORT": "0"}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-traced", "--port", "0", "--model", str(artifact),
         "--backend", "onnx", "--device", "cpu", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("nextchar serving on "):
        proc.kill()
        raise SystemExit(f"traced server did not start: {line!r}")
    address = line.rsplit(" ", 1)[1].strip()
    bursts = []
    try:
        for _ in range(args.bursts):
            bursts.append(asyncio.run(burst(address, args.streams, args.chars)))
    finally:
        proc.send_signal(signal.SIGUSR1)
        proc.wait(30)
    trace = json.loads(trace_file.read_text())
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(),
        "command": " ".join(["bench/generate_trace.py", *sys.argv[1:]]),
        "model": "tiny (rnn, embed 8, hidden 8, 1 layer)" if args.tiny else MODEL,
        "streams": args.streams, "chars": args.chars, "bursts": []}
    for t0, firsts in bursts:
        # This burst's streams: opened between its start and its last first character (the
        # warm-ups, seeds 1000+, open before the start; the next burst after this one ends).
        end = max(firsts)
        mine = [s for s in trace["streams"]
                if s["seed"] < args.streams and t0 <= s["open"] <= end]
        row: dict[str, Any] = {k: summary([1e3 * (s[k] - t0) for s in mine if k in s])
                               for k in STAGES}
        row["client"] = summary([1e3 * (f - t0) for f in firsts])
        mine_calls = [c for c in trace["calls"] if t0 <= c[0] <= end]
        prompts = [c for c in mine_calls if c[3] > 0]
        row["prompt_calls"] = {"calls": len(prompts), "rows": sum(c[2] for c in prompts),
                               "wall_ms": round(sum(1e3 * (c[1] - c[0]) for c in prompts), 1),
                               "thread_cpu_ms": round(sum(c[4] for c in prompts), 1),
                               "model_cpu_ms": round(sum(c[6] for c in prompts), 1)}
        row["model_calls_until_last_first_char"] = [
            [round(1e3 * (a - t0), 1), round(1e3 * (b - t0), 1), rows, length, round(cpu, 2),
             round(run_wall, 2), round(run_cpu, 2)]
            for a, b, rows, length, cpu, run_wall, run_cpu in mine_calls]
        report["bursts"].append(row)
    stage_p50 = {k: statistics.median(b[k]["p50"] for b in report["bursts"])
                 for k in [*STAGES, "client"]}
    report["median_of_burst_p50_ms"] = stage_p50
    print(f"{args.streams} streams x {args.chars} chars, {args.bursts} bursts; ms from the "
          "burst's start, p50 over streams (median over bursts):")
    for k, v in stage_p50.items():
        print(f"  {k:<13} {v:7.1f}   per burst: "
              + ", ".join(f"{b[k]['p50']:.1f}" for b in report["bursts"]))
    print("prompts' model calls per burst (until the last first character): calls, rows, "
          "wall ms, worker CPU ms, of it ONNX Runtime's CPU ms:")
    for b in report["bursts"]:
        p = b["prompt_calls"]
        print(f"  {p['calls']:3d} calls {p['rows']:3d} rows  wall {p['wall_ms']:6.1f}  "
              f"cpu {p['thread_cpu_ms']:6.1f}  model cpu {p['model_cpu_ms']:6.1f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-traced"]:
        serve_traced(sys.argv[2:])
    else:
        sys.exit(main())
