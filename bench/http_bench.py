"""HTTP front end benchmark (issue 14), one run, alone on the CPUs (`make bench-http`, ~6 min):

1. KServe V2 REST vs KServe V2 gRPC on the same nextchar server, on the peer benchmark's load
   (bench/peer_bench.py: its artifact and model_loop.onnx graph, one 64-character text per
   request, all outputs, closed loop, c = 1, 8, 64);
2. nextchar's V2 REST vs Seldon MLServer 1.7.1's V2 REST on the same load and the same graph
   (bench/mlserver_runtime/), MLServer tuned per concurrency over REST first: every MLServer
   setting of the peer benchmark's grid for that concurrency (parallel_workers 0/1/2, adaptive
   batching off or max_batch_size/max_batch_time pairs, bench/peer_bench.py TUNE_GRID),
   --tune-samples interleaved samples each, the best throughput (then p99) kept;
3. 64 concurrent OpenAI `stream: true` completions vs 64 gRPC Generate streams (200 characters
   each, temperature 0.8, seeds 0..63): characters/s over the whole burst, first-character
   latency per stream (p50, p99).

    .venv/bin/python bench/http_bench.py --mlserver-venv .venv-mlserver --out docs/http_bench.json
    (~10 min: ~4 of them MLServer's tuning)

Both load generators pre-serialize their requests: gRPC sends raw bytes through
grpc.aio (peer_bench.closed_loop); HTTP is a minimal asyncio HTTP/1.1 client, one keep-alive
connection per worker, so neither pays a client library's per-call cost. Every server is
checked to give the same answer first (top ids equal, probabilities to 1e-5). The 1-minute load
average is recorded at each sample.
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from peer_bench import (
    TUNE_GRID,
    Fleet,
    PeerConfig,
    Sample,
    Target,
    closed_loop,
    free_port,
    make_payloads,
    peer_artifact,
    run_info,
    start_nextchar,
    start_peers,
)

from nextchar.kserve import grpc_predict_v2_pb2 as kpb
from nextchar.v1 import nextchar_pb2 as pb
from nextchar.v1 import nextchar_pb2_grpc as pb_grpc

CONCURRENCY = (1, 8, 64)
STREAMS = 64
STREAM_CHARS = 200
# MLServer's settings tried per concurrency: the peer benchmark's grid, over REST here.
ML_GRID = {c: [cfg for cfg in TUNE_GRID[c] if cfg.peer == "mlserver"] for c in CONCURRENCY}


# -- a minimal HTTP/1.1 client -----------------------------------------------------------------
class Http:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    async def head(self) -> tuple[int, dict[bytes, bytes]]:
        assert self.reader is not None
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if b":" in line:
                k, v = line.split(b":", 1)
                headers[k.strip().lower()] = v.strip()
        return status, headers

    async def body(self, headers: dict[bytes, bytes]) -> bytes:
        assert self.reader is not None
        if b"content-length" in headers:
            return await self.reader.readexactly(int(headers[b"content-length"]))
        out = b""
        async for chunk in self.chunks():
            out += chunk
        return out

    async def chunks(self):  # type: ignore[no-untyped-def]
        assert self.reader is not None
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return
            data = await self.reader.readexactly(size)
            await self.reader.readexactly(2)
            yield data

    async def post(self, request: bytes) -> tuple[int, bytes]:
        assert self.writer is not None
        self.writer.write(request)
        status, headers = await self.head()
        return status, await self.body(headers)


def http_request(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def rest_payloads(model: str) -> list[bytes]:
    """The peer benchmark's texts (make_payloads' seed), as V2 REST JSON requests."""
    out = []
    for p in make_payloads(model):
        text = kpb.ModelInferRequest.FromString(p).inputs[0].contents.bytes_contents[0].decode()
        body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                       "data": [text]}]}).encode()
        out.append(http_request(f"/v2/models/{model}/infer", body))
    return out


async def http_closed_loop(port: int, payloads: list[bytes], concurrency: int,
                           duration_s: float) -> Sample:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    started = time.perf_counter()
    stop_at = started + duration_s

    async def worker(i: int) -> None:
        conn = Http("127.0.0.1", port)
        await conn.open()
        j = i
        try:
            while (t0 := time.perf_counter()) < stop_at:
                status, _ = await conn.post(payloads[j % len(payloads)])
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1
                j += concurrency
        finally:
            conn.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    lat_ms = np.array(latencies) * 1e3 if latencies else np.array([float("nan")])
    return Sample(concurrency, len(latencies), errors, round(elapsed, 3),
                  round(len(latencies) / elapsed, 1), round(float(np.percentile(lat_ms, 50)), 2),
                  round(float(np.percentile(lat_ms, 99)), 2))


def measure(label: str, run: Any, concurrency: int, duration_s: float, warmup_s: float) -> Sample:
    load = os.getloadavg()[0]
    asyncio.run(run(concurrency, warmup_s))
    sample: Sample = asyncio.run(run(concurrency, duration_s))
    sample.loadavg_1m = round(load, 2)
    print(f"  {label:<40} c={concurrency:<3} {sample.throughput_rps:>8.1f} req/s  "
          f"p50 {sample.p50_ms:>7.2f} ms  p99 {sample.p99_ms:>7.2f} ms  load {load:.2f}"
          + (f"  errors {sample.errors}" if sample.errors else ""), flush=True)
    return sample


def same_answers(grpc_address: str, http_ports: dict[str, tuple[int, str]]) -> None:
    """Every REST server answers the first 8 texts as nextchar's gRPC endpoint does."""
    from peer_bench import answers

    ref = answers(Target("ref", "ref", _Addr(grpc_address), "peer-rnn",  # type: ignore[arg-type]
                         payloads=make_payloads("peer-rnn")))

    async def rest(port: int, model: str) -> list[dict[str, Any]]:
        conn = Http("127.0.0.1", port)
        await conn.open()
        try:
            out = []
            for req in rest_payloads(model)[:8]:
                status, body = await conn.post(req)
                assert status == 200, body[:300]
                out.append({o["name"]: np.array(o["data"]) for o in json.loads(body)["outputs"]})
            return out
        finally:
            conn.close()

    for name, (port, model) in http_ports.items():
        for a, b in zip(ref, asyncio.run(rest(port, model)), strict=True):
            if not np.array_equal(a["top_ids"].reshape(-1), b["top_ids"].reshape(-1)):
                raise RuntimeError(f"{name} ranks differently")
            diff = np.abs(a["probs"].reshape(-1) - b["probs"].reshape(-1).astype(np.float32)).max()
            if diff > 1e-5:
                raise RuntimeError(f"{name} probabilities differ by {diff:.2e}")


class _Addr:
    def __init__(self, address: str) -> None:
        self.address = address


# -- streams -----------------------------------------------------------------------------------
async def openai_streams(port: int, model: str, n: int, chars: int) -> dict[str, Any]:
    async def one(i: int) -> tuple[int, float]:
        conn = Http("127.0.0.1", port)
        await conn.open()
        body = json.dumps({"model": model, "prompt": "To be, or not to be", "max_tokens": chars,
                           "temperature": 0.8, "seed": i, "stream": True}).encode()
        t0 = time.perf_counter()
        first = None
        got = 0
        try:
            assert conn.writer is not None
            conn.writer.write(http_request("/v1/completions", body))
            status, headers = await conn.head()
            assert status == 200 and headers.get(b"transfer-encoding") == b"chunked", status
            buf = b""
            async for chunk in conn.chunks():
                buf += chunk
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    data = event[len(b"data: "):]
                    if data == b"[DONE]":
                        continue
                    text = json.loads(data)["choices"][0]["text"]
                    if text and first is None:
                        first = time.perf_counter() - t0
                    got += len(text)
        finally:
            conn.close()
        return got, first if first is not None else float("nan")

    return await _burst(one, n)


async def grpc_streams(address: str, n: int, chars: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.NextCharStub(ch)

        async def one(i: int) -> tuple[int, float]:
            t0 = time.perf_counter()
            first = None
            got = 0
            async for r in stub.Generate(pb.GenerateRequest(
                    prompt="To be, or not to be", max_chars=chars, temperature=0.8, seed=i)):
                if r.text and first is None:
                    first = time.perf_counter() - t0
                got += len(r.text)
            return got, first if first is not None else float("nan")

        return await _burst(one, n)


async def _burst(one: Any, n: int) -> dict[str, Any]:
    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - started
    chars = sum(r[0] for r in results)
    firsts = np.array([r[1] for r in results]) * 1e3
    return {"streams": n, "chars": chars, "seconds": round(elapsed, 3),
            "chars_per_s": round(chars / elapsed, 1),
            "first_char_p50_ms": round(float(np.percentile(firsts, 50)), 2),
            "first_char_p99_ms": round(float(np.percentile(firsts, 99)), 2)}


# -- MLServer's REST, tuned ---------------------------------------------------------------------
def mlserver_ports(fleet: Fleet, args: argparse.Namespace, artifact: Path,
                   configs: list[PeerConfig]) -> dict[PeerConfig, int]:
    """MLServer models for `configs` (peer_bench.start_peers: one process per parallel_workers
    count), every one ready: config -> the HTTP port of its process."""
    targets = start_peers(fleet, args, artifact, [(cfg, "loop") for cfg in configs])
    ports = {}
    for (cfg, _), target in targets.items():
        target.server.wait_ready(target.model)
        settings = json.loads((target.server.log.parent / "settings.json").read_text())
        ports[cfg] = int(settings["http_port"])
    return ports


def rest_run(port: int, model: str) -> Any:
    payloads = rest_payloads(model)
    return lambda c, d: http_closed_loop(port, payloads, c, d)


def tune_mlserver_rest(args: argparse.Namespace, artifact: Path) -> dict[str, Any]:
    """Every ML_GRID setting at its concurrency over REST, interleaved; the best per concurrency
    (throughput, then p99; a setting with any error is out)."""
    started = time.monotonic()
    configs = sorted({cfg for cs in ML_GRID.values() for cfg in cs},
                     key=lambda x: (x.workers, x.max_batch_size, x.max_batch_time_us))
    samples: dict[tuple[PeerConfig, int], list[Sample]] = {}
    with Fleet() as fleet:
        ports = mlserver_ports(fleet, args, artifact, configs)
        print(f"tuning MLServer REST: {sum(map(len, ML_GRID.values()))} points x "
              f"{args.tune_samples} samples of {args.tune_duration_s:g} s", flush=True)
        for rep in range(args.tune_samples):
            for c, cfgs in ML_GRID.items():
                shift = rep % len(cfgs)
                for cfg in cfgs[shift:] + cfgs[:shift]:
                    run = rest_run(ports[cfg], cfg.model_name("loop"))
                    samples.setdefault((cfg, c), []).append(
                        measure(f"tune {cfg.label}", run, c, args.tune_duration_s,
                                args.tune_warmup_s))
    points: list[dict[str, Any]] = []
    best: dict[int, dict[str, Any]] = {}
    for c, cfgs in ML_GRID.items():
        for cfg in cfgs:
            ss = samples[(cfg, c)]
            point = {"config": asdict(cfg), "label": cfg.label, "concurrency": c,
                     "ok": not any(x.errors for x in ss),
                     "throughput_rps": round(statistics.median(x.throughput_rps for x in ss), 1),
                     "p99_ms": round(statistics.median(x.p99_ms for x in ss), 2),
                     "samples": [asdict(x) for x in ss]}
            points.append(point)
            cur = best.get(c)
            if point["ok"] and (cur is None or (point["throughput_rps"], -point["p99_ms"])
                                > (cur["throughput_rps"], -cur["p99_ms"])):
                best[c] = point
    for c, p in best.items():
        print(f"best MLServer REST at c={c}: {p['label']}: {p['throughput_rps']:.0f} req/s, "
              f"p99 {p['p99_ms']:.1f} ms", flush=True)
    return {"samples_per_point": args.tune_samples, "duration_s": args.tune_duration_s,
            "warmup_s": args.tune_warmup_s, "wall_s": round(time.monotonic() - started),
            "best": {str(c): p["config"] for c, p in best.items()}, "points": points}


# -- the run -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mlserver-venv", type=Path, default=Path(".venv-mlserver"))
    ap.add_argument("--duration-s", type=float, default=5.0)
    ap.add_argument("--warmup-s", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tune-samples", type=int, default=3)
    ap.add_argument("--tune-duration-s", type=float, default=1.5)
    ap.add_argument("--tune-warmup-s", type=float, default=0.3)
    ap.add_argument("--stream-repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="http-bench-"))
    args.mlserver_venv = args.mlserver_venv.resolve()
    info = {**run_info(argv), "command": "make bench-http  # bench/http_bench.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "loadavg_1m_start": round(os.getloadavg()[0], 2), "duration_s": args.duration_s,
            "warmup_s": args.warmup_s, "repeats": args.repeats}
    artifact = peer_artifact()
    tuning = tune_mlserver_rest(args, artifact)
    tuned = {int(c): PeerConfig(**cfg) for c, cfg in tuning["best"].items()}
    info["mlserver"] = {str(c): cfg.label for c, cfg in tuned.items()}
    http_port = free_port()
    samples: dict[str, list[Sample]] = {}
    with Fleet() as fleet:
        nc = fleet.add(start_nextchar(artifact, args.workdir, "--http-port", str(http_port)))
        ml = mlserver_ports(fleet, args, artifact, sorted(
            set(tuned.values()), key=lambda x: (x.workers, x.max_batch_size, x.max_batch_time_us)))
        nc.wait_ready("peer-rnn")
        same_answers(nc.address, {"nextchar REST": (http_port, "peer-rnn"),
                                  **{f"MLServer REST {c.label}": (port, c.model_name("loop"))
                                     for c, port in ml.items()}})
        grpc_payloads = make_payloads("peer-rnn")
        ours: dict[str, Any] = {
            "nextchar V2 REST": rest_run(http_port, "peer-rnn"),
            "nextchar V2 gRPC": lambda c, d: closed_loop(nc.address, grpc_payloads, c, d),
        }
        for rep in range(args.repeats):
            print(f"repeat {rep + 1}/{args.repeats}", flush=True)
            for c in CONCURRENCY:
                runs = {**ours, "MLServer V2 REST (tuned)": rest_run(
                    ml[tuned[c]], tuned[c].model_name("loop"))}
                names = list(runs)
                order = names[rep % len(names):] + names[: rep % len(names)]
                for name in order:
                    samples.setdefault(f"{name} c={c}", []).append(
                        measure(name, runs[name], c, args.duration_s, args.warmup_s))
        for server in fleet.servers:  # the streams run with nextchar alone on the machine
            if server is not nc:
                server.stop()
        streams: dict[str, list[dict[str, Any]]] = {"openai": [], "grpc": []}
        for rep in range(args.stream_repeats):
            for kind in (("openai", "grpc") if rep % 2 == 0 else ("grpc", "openai")):
                r = asyncio.run(openai_streams(http_port, "peer-rnn", STREAMS, STREAM_CHARS)
                                if kind == "openai"
                                else grpc_streams(nc.address, STREAMS, STREAM_CHARS))
                assert r["chars"] == STREAMS * STREAM_CHARS, r
                r["loadavg_1m"] = round(os.getloadavg()[0], 2)
                streams[kind].append(r)
                print(f"  {kind:<8} {STREAMS} streams: {r['chars_per_s']:>9.1f} chars/s  first "
                      f"char p50 {r['first_char_p50_ms']:.1f} ms p99 "
                      f"{r['first_char_p99_ms']:.1f} ms", flush=True)
    rows = []
    for key, ss in samples.items():
        name, c = key.rsplit(" c=", 1)
        rows.append({"server": name, "concurrency": int(c),
                     "throughput_rps": round(statistics.median(s.throughput_rps for s in ss), 1),
                     "p50_ms": round(statistics.median(s.p50_ms for s in ss), 2),
                     "p99_ms": round(statistics.median(s.p99_ms for s in ss), 2),
                     "samples": [asdict(s) for s in ss]})
    stream_rows = {kind: {k: round(statistics.median(r[k] for r in rs), 2) for k in
                          ("chars_per_s", "first_char_p50_ms", "first_char_p99_ms")}
                   | {"runs": rs} for kind, rs in streams.items()}
    out = {**info, "loadavg_1m_end": round(os.getloadavg()[0], 2), "mlserver_tuning": tuning,
           "rows": rows,
           "streams": {"streams": STREAMS, "chars_each": STREAM_CHARS, **stream_rows}}
    print(json.dumps({k: v for k, v in out.items() if k not in ("rows", "streams")}, indent=1))
    for r in rows:
        print(f"{r['server']:<60} c={r['concurrency']:<3} {r['throughput_rps']:>8.1f} req/s  "
              f"p50 {r['p50_ms']:>7.2f}  p99 {r['p99_ms']:>7.2f}")
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
