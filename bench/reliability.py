"""Reliability figures for docs/reliability.md: overload, drain under load, reload under load.

    flock -x /tmp/nextchar-cpu.lock .venv/bin/python bench/reliability.py all --out docs/reliability.json
    .venv/bin/python bench/reliability.py overload --seconds 20     # one part; prints JSON

Each part starts real `nextchar serve` subprocesses on the benchmark model (V=96, E=64, H=256,
2-layer tanh RNN, random weights: speed does not depend on them) and drives them with an
asyncio gRPC load generator in this process.

- overload: capacity = closed-loop Predict throughput (32 callers); then an open-loop arrival
  rate of 2x capacity. Expect RESOURCE_EXHAUSTED for the excess, bounded latency for what was
  accepted (the queue bound over the service rate), bounded RSS.
- drain: N rounds of SIGTERM while callers run; every call sent before the signal must succeed;
  exit code and time from signal to exit.
- reload: Admin.ReloadModel every second while callers run, alternating two weight sets, then a
  broken version; 0 failed calls, the broken version counted and refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
from serve_process import ServeProcess

from nextchar.v1 import admin_pb2, admin_pb2_grpc
from nextchar.v1 import nextchar_pb2 as pb
from nextchar.v1 import nextchar_pb2_grpc as pb_grpc

VOCAB96 = "".join(chr(c) for c in range(32, 127)) + "\n"
MODEL = {"cell": "rnn", "embed_dim": 64, "hidden_size": 256, "num_layers": 2}
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind " * 2)[:64]
REQUEST = pb.PredictRequest(texts=[TEXT] * 8, top_k=5)  # one "call": 8 x 64 characters
WORKERS = 2  # the onnx backend's default on 2 cores: one model call per core
MAX_BATCH_TEXTS = 256  # the server's default max_batch_size


# -- servers -------------------------------------------------------------------------------------
class Server(ServeProcess):
    """With its log in a file and metrics on a free port (the line after the address)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("w")
        try:
            super().__init__(["--metrics-port", "0", *args], stderr=self._log)
        except SystemExit as e:
            raise RuntimeError(f"{e}\n{log.read_text()}") from None
        self.metrics_url = self.read_line().rsplit(" ", 1)[1].strip()

    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        body = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        for fam in text_string_to_metric_families(body):
            for s in fam.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        return 0.0

    def close(self) -> None:
        self.kill()
        self._log.close()


def build_model(root: Path, seed: int, version: str) -> Path:
    from nextchar.training.export import build_random_artifact

    return build_random_artifact(root / f"seed{seed}-v{version}", vocab=VOCAB96, seed=seed,
                                 version=version, name="bench-rnn-h256", **MODEL)


# -- load ----------------------------------------------------------------------------------------
@dataclass
class Calls:
    sent_at: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    code: list[str] = field(default_factory=list)

    def add(self, sent: float, code: str) -> None:
        self.sent_at.append(sent)
        self.latency_s.append(time.monotonic() - sent)
        self.code.append(code)

    def counts(self, since: float = 0.0, until: float = float("inf")) -> dict[str, int]:
        out: dict[str, int] = {}
        for t, c in zip(self.sent_at, self.code, strict=True):
            if since <= t < until:
                out[c] = out.get(c, 0) + 1
        return dict(sorted(out.items()))

    def ok_p99_ms_by_quarter(self) -> list[float]:
        """p99 of accepted calls in each quarter of the run (by send time): flat = bounded."""
        if not self.sent_at:
            return []
        t0, t1 = min(self.sent_at), max(self.sent_at)
        step = (t1 - t0) / 4 or 1.0
        out = []
        for i in range(4):
            lat = sorted(lat for t, lat, c in zip(self.sent_at, self.latency_s, self.code, strict=True)
                         if c == "OK" and t0 + i * step <= t < t0 + (i + 1) * step + (i == 3))
            out.append(round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3, 1) if lat else 0.0)
        return out

    def ok_latency_ms(self) -> dict[str, float]:
        ok = sorted(lat for lat, c in zip(self.latency_s, self.code, strict=True) if c == "OK")
        if not ok:
            return {}

        def q(p: float) -> float:
            return round(ok[min(len(ok) - 1, int(p * len(ok)))] * 1e3, 1)

        return {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "max": round(ok[-1] * 1e3, 1)}


async def _call(stub: pb_grpc.NextCharStub, calls: Calls, timeout_s: float,
                request: pb.PredictRequest = REQUEST) -> None:
    sent = time.monotonic()
    try:
        await stub.Predict(request, timeout=timeout_s)
        calls.add(sent, "OK")
    except grpc.aio.AioRpcError as e:
        calls.add(sent, e.code().name)


async def closed_loop(address: str, callers: int, seconds: float, stop: asyncio.Event | None = None,
                      timeout_s: float = 30.0, request: pb.PredictRequest = REQUEST) -> Calls:
    calls = Calls()
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.NextCharStub(ch)
        end = time.monotonic() + seconds

        async def caller() -> None:
            while time.monotonic() < end and not (stop and stop.is_set()):
                await _call(stub, calls, timeout_s, request)
                if calls.code and calls.code[-1] == "UNAVAILABLE":
                    await asyncio.sleep(0.01)  # the server is going away: do not spin

        await asyncio.gather(*(caller() for _ in range(callers)))
    return calls


async def open_loop(address: str, rate_per_s: float, seconds: float, timeout_s: float,
                    request: pb.PredictRequest = REQUEST) -> Calls:
    """Arrivals at a fixed rate whatever the answers do (what an overload really looks like)."""
    calls = Calls()
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.NextCharStub(ch)
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        n = 0
        while (now := time.monotonic()) < start + seconds:
            due = start + n / rate_per_s
            if due > now:
                await asyncio.sleep(due - now)
            task = asyncio.create_task(_call(stub, calls, timeout_s, request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        await asyncio.gather(*tasks)
    return calls


async def sample_rss(server: Server, stop: asyncio.Event, into: list[float]) -> None:
    while not stop.is_set():
        into.append(server.rss_mib())
        await asyncio.sleep(0.25)


# -- parts ---------------------------------------------------------------------------------------
async def overload(model: Path, work: Path, seconds: float, texts: int) -> dict[str, Any]:
    queue_texts = 256
    request = pb.PredictRequest(texts=[TEXT] * texts, top_k=5)
    server = Server(["--model", str(model), "--max-queue-texts", str(queue_texts),
                     "--backend-workers", str(WORKERS), "--max-batch-size", str(MAX_BATCH_TEXTS)],
                    work / f"overload-{texts}.log")
    try:
        await closed_loop(server.address, 8, 2.0, request=request)  # warm up
        rss_idle = server.rss_mib()
        callers = max(4, 256 // texts)  # enough to keep the batcher full
        cap = await closed_loop(server.address, callers, seconds, request=request)
        capacity = cap.code.count("OK") / seconds
        rss: list[float] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(server, stop, rss))
        offered = 2 * capacity
        over = await open_loop(server.address, offered, seconds, timeout_s=10.0, request=request)
        stop.set()
        await sampler
        ok = over.code.count("OK")
        quarter = max(1, len(rss) // 4)
        return {
            "request": f"Predict, {texts} texts x {len(TEXT)} chars",
            "max_queue_texts": queue_texts,
            "capacity_callers": callers,
            "capacity_calls_per_s": round(capacity, 1),
            "capacity_latency_ms": cap.ok_latency_ms(),
            "offered_calls_per_s": round(offered, 1),
            "seconds": seconds,
            "codes": over.counts(),
            "served_calls_per_s": round(ok / seconds, 1),
            "ok_latency_ms": over.ok_latency_ms(),
            "ok_p99_ms_by_quarter": over.ok_p99_ms_by_quarter(),
            # Worst wait: the full queue plus a batch on each worker, drained at the full rate R;
            # then its own batch on one worker, at R / workers: (Q + 2 W B) / R.
            "latency_bound_ms": round((queue_texts + 2 * WORKERS * MAX_BATCH_TEXTS)
                                      / (capacity * texts) * 1e3, 1),
            "rss_mib_idle": round(rss_idle, 1),
            "rss_mib_peak_by_quarter": [round(max(rss[i:i + quarter]), 1)
                                        for i in range(0, len(rss), quarter)][:4],
            "rss_mib_peak": round(max(rss), 1),
        }
    finally:
        server.close()


async def drain(model: Path, work: Path, rounds: int) -> dict[str, Any]:
    prestop_s, grace_s = 1.0, 10.0
    results = []
    for i in range(rounds):
        server = Server(["--model", str(model), "--prestop-s", str(prestop_s), "--grace-s",
                         str(grace_s)], work / f"drain-{i}.log")
        try:
            stop = asyncio.Event()
            load = asyncio.create_task(closed_loop(server.address, 16, 120, stop))
            await asyncio.sleep(3.0)
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(server.proc.wait, prestop_s + grace_s + 30)
            exited_s = time.monotonic() - signalled
            stop.set()
            calls = await load
        finally:
            server.close()
        before = calls.counts(until=signalled)
        after = calls.counts(since=signalled)
        results.append({"before_signal": before, "after_signal": after, "exit_code": rc,
                        "signal_to_exit_s": round(exited_s, 2),
                        "failed_before_signal": sum(n for c, n in before.items() if c != "OK")})
    return {
        "prestop_s": prestop_s, "grace_s": grace_s, "callers": 16, "rounds": results,
        "accepted_before_signal": sum(r["before_signal"].get("OK", 0) for r in results),
        "failed_before_signal": sum(r["failed_before_signal"] for r in results),
        "exit_codes": sorted({r["exit_code"] for r in results}),
        "max_signal_to_exit_s": max(r["signal_to_exit_s"] for r in results),
    }


async def reload(work: Path, seconds: float) -> dict[str, Any]:
    repo = work / "repo"
    repo.mkdir()
    weights = [build_model(work / "src", seed, "x") for seed in (0, 1)]

    def add(version: str, source: Path) -> None:
        tmp = repo / f".tmp-{version}"
        shutil.copytree(source, tmp)
        manifest = json.loads((tmp / "manifest.json").read_text())
        manifest["version"] = version
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        tmp.rename(repo / version)

    add("1", weights[0])
    server = Server(["--model", str(repo)], work / "reload.log")
    try:
        stop = asyncio.Event()
        load = asyncio.create_task(closed_loop(server.address, 16, seconds + 30, stop))
        reloads: list[dict[str, Any]] = []
        async with grpc.aio.insecure_channel(server.address) as ch:
            admin = admin_pb2_grpc.AdminStub(ch)
            await asyncio.sleep(1.0)
            version = 1
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                version += 1
                add(str(version), weights[version % 2])
                started = time.monotonic()
                r = await admin.ReloadModel(admin_pb2.ReloadModelRequest(), timeout=60)
                reloads.append({"version": r.version, "reloaded": r.reloaded,
                                "seconds": round(time.monotonic() - started, 2)})
                await asyncio.sleep(1.0)
            broken = str(version + 1)
            add(broken, weights[0])
            (repo / broken / "model_loop.onnx").write_bytes(b"corrupt")
            (repo / broken / "model.onnx").write_bytes(b"corrupt")
            broken_details = ""
            try:
                await admin.ReloadModel(admin_pb2.ReloadModelRequest(), timeout=60)
                broken_code = "OK"
            except grpc.aio.AioRpcError as e:
                broken_code, broken_details = e.code().name, e.details()
            info = await pb_grpc.NextCharStub(ch).GetModelInfo(pb.GetModelInfoRequest())
            await asyncio.sleep(1.0)
        stop.set()
        calls = await load
        return {
            "callers": 16, "reloads": len(reloads),
            "all_reloaded": all(r["reloaded"] for r in reloads),
            "reload_seconds_max": max(r["seconds"] for r in reloads),
            "calls": calls.counts(),
            "failed_calls": sum(n for c, n in calls.counts().items() if c != "OK"),
            "broken_version": {"code": broken_code, "details": broken_details,
                               "served_after": info.version,
                               "failure_metric": server.metric("nextchar_model_reloads_total",
                                                               result="failure")},
            "success_metric": server.metric("nextchar_model_reloads_total", result="success"),
        }
    finally:
        server.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["overload", "drain", "reload", "all"])
    p.add_argument("--seconds", type=float, default=20.0, help="overload and reload duration")
    p.add_argument("--rounds", type=int, default=5, help="drain rounds")
    p.add_argument("--texts", type=int, nargs="+", default=[64, 8],
                   help="overload: texts per call, one run each (64: model-bound; 8: RPC-bound)")
    p.add_argument("--out", type=Path, help="merge the results into this JSON file")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="nextchar-reliability-") as tmp:
        work = Path(tmp)
        results: dict[str, Any] = {}
        if args.part in ("overload", "drain", "all"):
            model = build_model(work / "src", 0, "1")
        if args.part in ("overload", "all"):
            results["overload"] = {
                f"{n}_texts": asyncio.run(overload(model, work, args.seconds, n))
                for n in args.texts}
        if args.part in ("drain", "all"):
            results["drain"] = asyncio.run(drain(model, work, args.rounds))
        if args.part in ("reload", "all"):
            results["reload"] = asyncio.run(reload(work, args.seconds))
    stamp = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
             "command": " ".join(sys.argv),
             # Processes outside the CPU lock (training runs...) show up here: 2.0 = both cores.
             "load_avg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    for part in results.values():
        part["measured"] = stamp  # type: ignore[index]
    if args.out:
        merged = json.loads(args.out.read_text()) if args.out.exists() else {}
        merged.update(results)
        args.out.write_text(json.dumps(merged, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
