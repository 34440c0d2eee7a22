"""Peer benchmark: nextchar against Seldon MLServer 1.7.1 on the same model.onnx, driven by ONE
KServe V2 gRPC load generator with byte-identical requests.

    make bench-peer      # builds .venv-mlserver, then runs this under flock -x (alone on the CPUs)
    .venv/bin/python bench/peer_bench.py --tune --out docs/peer_bench.json

1. Builds the artifact (84-character vocabulary, rnn, embed 64, hidden 256, 2 layers) with
   nextchar.training.export.build_random_artifact.
2. Starts nextchar (`nextchar serve`, its defaults) and MLServer (bench/mlserver_runtime: a
   custom runtime on onnxruntime, adaptive batching on) as subprocesses on 127.0.0.1.
3. Checks both give the same answer to the same request (top ids equal, probabilities to 1e-5).
4. With --tune: sweeps MLServer's settings (parallel workers, max_batch_size, max_batch_time)
   at concurrency 64 and keeps the best throughput (ties to the lower p99).
5. Closed loop: each of C workers sends one request (one 64-character text, all outputs) and
   waits for the answer before the next; C = 1/8/32/64, D seconds each after a warm-up, R
   repeats interleaving the two servers; reports medians over repeats of throughput, p50, p99.

The load generator pre-serializes its requests and sends raw bytes, so its own cost per call is
the same for both servers; it shares the machine's cores with the server under test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from nextchar.kserve import grpc_predict_v2_pb2 as pb
from nextchar.kserve import grpc_predict_v2_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
RUNTIME_DIR = Path(__file__).resolve().parent / "mlserver_runtime"
# 84 characters: the printable ASCII a Shakespeare-like corpus uses, plus newline.
VOCAB = "\n !\"&'(),-.0123456789:;?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]_abcdefghijklmnopqrstuvwxyz|~$%*"
assert len(VOCAB) == 84 and len(set(VOCAB)) == 84
INFER = "/inference.GRPCInferenceService/ModelInfer"
CONCURRENCY = (1, 8, 32, 64)


@dataclass(frozen=True)
class MLServerConfig:
    parallel_workers: int
    max_batch_size: int
    max_batch_time_s: float
    intra_op_threads: int = 1

    @property
    def label(self) -> str:
        return (f"workers={self.parallel_workers} max_batch_size={self.max_batch_size} "
                f"max_batch_time={self.max_batch_time_s * 1e3:g}ms intra_op={self.intra_op_threads}")


# What --tune tries: MLServer's knobs for 2 cores. parallel_workers=0 runs inference in the
# gRPC process itself; 1 and 2 run it in worker processes fed by the adaptive batcher.
# A first sweep (docs/benchmarks.md) found intra_op=2 and batches of 16 worse everywhere and the
# best at the largest batch tried, so this grid reaches further out on batch size and time.
TUNE_GRID = [
    *(MLServerConfig(w, b, t) for w in (0, 1, 2)
      for b, t in ((32, 0.005), (64, 0.010), (128, 0.010), (128, 0.020))),
    MLServerConfig(1, 64, 0.010, intra_op_threads=2),
    MLServerConfig(1, 128, 0.020, intra_op_threads=2),
]
DEFAULT_MLSERVER = MLServerConfig(parallel_workers=2, max_batch_size=32, max_batch_time_s=0.005)


@dataclass
class Sample:
    concurrency: int
    requests: int
    errors: dict[str, int]
    duration_s: float
    throughput_rps: float
    p50_ms: float
    p99_ms: float


@dataclass
class Summary:
    server: str
    concurrency: int
    throughput_rps: float  # medians over repeats
    p50_ms: float
    p99_ms: float
    samples: list[Sample] = field(default_factory=list)


# -- servers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, name: str, argv: list[str], port: int, cwd: Path, log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.port, self.log = name, port, log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, model: str, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log}")
                try:
                    if stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=2).ready:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f}s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log_file.close()


def start_nextchar(artifact: Path, workdir: Path, *flags: str) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "nextchar", "serve", "--model", str(artifact),
            "--host", "127.0.0.1", "--port", str(port), *flags]
    name = " ".join(["nextchar", *flags])
    return Server(name, argv, port, workdir, workdir / f"{name.replace(' ', '_')}.log")


def start_mlserver(venv: Path, artifact: Path, manifest: dict[str, Any], cfg: MLServerConfig,
                   workdir: Path) -> Server:
    folder = Path(tempfile.mkdtemp(prefix="mlserver-", dir=workdir))
    shutil.copy(RUNTIME_DIR / "runtime.py", folder / "runtime.py")
    port = free_port()
    settings = json.loads((RUNTIME_DIR / "settings.json").read_text())
    settings.update(host="127.0.0.1", grpc_port=port, http_port=free_port(),
                    metrics_port=free_port(), parallel_workers=cfg.parallel_workers)
    model = json.loads((RUNTIME_DIR / "model-settings.json").read_text())
    model.update(name=manifest["name"], max_batch_size=cfg.max_batch_size,
                 max_batch_time=cfg.max_batch_time_s)
    model["parameters"].update(uri=str(artifact), version=manifest["version"])
    model["parameters"]["extra"]["intra_op_threads"] = cfg.intra_op_threads
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    (folder / "model-settings.json").write_text(json.dumps(model, indent=2))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLSERVER_", "PROMETHEUS_"))}
    argv = [str(venv / "bin" / "mlserver"), "start", str(folder)]
    return Server(f"MLServer ({cfg.label})", argv, port, folder, folder / "mlserver.log", env)


def peer_artifact(path: Path = REPO / "runs" / "peer_bench" / "artifact") -> Path:
    """The benchmark model (84-character vocabulary, rnn, embed 64, hidden 256, 2 layers), built
    at `path` unless it is there already; bench/graph_bench.py and bench/server_cpu.py share it."""
    if not (path / "manifest.json").is_file():
        from nextchar.training.export import build_random_artifact

        build_random_artifact(path, vocab=VOCAB, cell="rnn", embed_dim=64, hidden_size=256,
                              num_layers=2, seed=0, name="peer-rnn")
    return path.resolve()


# -- requests and answers --------------------------------------------------------------------


def make_payloads(model: str, n: int = 64, chars: int = 64, seed: int = 0) -> list[bytes]:
    """n distinct requests, each one text of `chars` characters, no parameters, all outputs."""
    rng = np.random.default_rng(seed)
    payloads = []
    for _ in range(n):
        text = "".join(rng.choice(list(VOCAB[1:]), size=chars))  # no newline: one line of text
        req = pb.ModelInferRequest(model_name=model, inputs=[pb.ModelInferRequest.InferInputTensor(
            name="text", datatype="BYTES", shape=[1],
            contents=pb.InferTensorContents(bytes_contents=[text.encode()]))])
        payloads.append(req.SerializeToString())
    return payloads


def decode(resp: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    out = {}
    for i, t in enumerate(resp.outputs):
        if resp.raw_output_contents:
            dtype = {"FP32": "<f4", "INT64": "<i8"}.get(t.datatype)
            arr = np.frombuffer(resp.raw_output_contents[i], dtype=dtype) if dtype else None
        elif t.datatype == "FP32":
            arr = np.array(t.contents.fp32_contents, dtype=np.float32)
        elif t.datatype == "INT64":
            arr = np.array(t.contents.int64_contents, dtype=np.int64)
        else:
            arr = np.array(list(t.contents.bytes_contents), dtype=object)
        if arr is not None:
            out[t.name] = arr.reshape(list(t.shape))
    return out


def check_same_answers(servers: list[Server], payloads: list[bytes]) -> None:
    answers = []
    for server in servers:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            answers.append([decode(stub.ModelInfer(pb.ModelInferRequest.FromString(p), timeout=30))
                            for p in payloads[:8]])
    ref = answers[0]
    for server, got in zip(servers[1:], answers[1:], strict=True):
        for a, b in zip(ref, got, strict=True):
            if not np.array_equal(a["top_ids"], b["top_ids"]):
                raise RuntimeError(f"{server.name} ranks differently: {a['top_ids']} vs {b['top_ids']}")
            if not np.allclose(a["probs"], b["probs"], atol=1e-5):
                raise RuntimeError(f"{server.name} probabilities differ by "
                                   f"{np.abs(a['probs'] - b['probs']).max():.2e}")


# -- the load generator ----------------------------------------------------------------------


async def closed_loop(address: str, payloads: list[bytes], concurrency: int,
                      duration_s: float) -> Sample:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(INFER)  # bytes in, bytes out: no client-side (de)serializing
        latencies: list[float] = []
        errors: dict[str, int] = {}
        started = time.perf_counter()
        stop_at = started + duration_s

        async def worker(i: int) -> None:
            j = i
            while (t0 := time.perf_counter()) < stop_at:
                try:
                    await call(payloads[j % len(payloads)], timeout=30)
                    latencies.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError as e:
                    errors[e.code().name] = errors.get(e.code().name, 0) + 1
                j += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    lat_ms = np.array(latencies) * 1e3 if latencies else np.array([float("nan")])
    return Sample(concurrency, len(latencies), errors, round(elapsed, 3),
                  round(len(latencies) / elapsed, 1), round(float(np.percentile(lat_ms, 50)), 2),
                  round(float(np.percentile(lat_ms, 99)), 2))


def measure(server: Server, payloads: list[bytes], concurrency: int, duration_s: float,
            warmup_s: float) -> Sample:
    asyncio.run(closed_loop(server.address, payloads, concurrency, warmup_s))
    sample = asyncio.run(closed_loop(server.address, payloads, concurrency, duration_s))
    print(f"  {server.name:<70} c={concurrency:<3} {sample.throughput_rps:>8.1f} req/s  "
          f"p50 {sample.p50_ms:>7.2f} ms  p99 {sample.p99_ms:>7.2f} ms"
          + (f"  errors {sample.errors}" if sample.errors else ""), flush=True)
    return sample


def summarize(name: str, samples: list[Sample]) -> Summary:
    return Summary(name, samples[0].concurrency,
                   round(statistics.median(s.throughput_rps for s in samples), 1),
                   round(statistics.median(s.p50_ms for s in samples), 2),
                   round(statistics.median(s.p99_ms for s in samples), 2), samples)


# -- the run ---------------------------------------------------------------------------------


def tune(venv: Path, artifact: Path, manifest: dict[str, Any], payloads: list[bytes],
         workdir: Path, duration_s: float, warmup_s: float) -> tuple[MLServerConfig, list[dict[str, Any]]]:
    print("tuning MLServer at concurrency 64:", flush=True)
    tried = []
    for cfg in TUNE_GRID:
        server = start_mlserver(venv, artifact, manifest, cfg, workdir)
        try:
            server.wait_ready(manifest["name"])
            sample = measure(server, payloads, 64, duration_s, warmup_s)
        except RuntimeError as e:  # a setting MLServer cannot start with: recorded, skipped
            print(f"  {cfg.label}: {e}", flush=True)
            tried.append({"config": asdict(cfg), "label": cfg.label, "failed": str(e)})
            continue
        finally:
            server.stop()
        tried.append({"config": asdict(cfg), "label": cfg.label, "sample": asdict(sample)})
    ok = [t for t in tried if "sample" in t and not t["sample"]["errors"]]
    best = max(ok, key=lambda t: (t["sample"]["throughput_rps"], -t["sample"]["p99_ms"]))
    return MLServerConfig(**best["config"]), tried


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mlserver-venv", type=Path, default=REPO / ".venv-mlserver")
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "peer_bench")
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    ap.add_argument("--duration-s", type=float, default=6.0, help="measured seconds per point")
    ap.add_argument("--warmup-s", type=float, default=1.0, help="unmeasured seconds before each")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    ap.add_argument("--tune", action="store_true", help="sweep MLServer settings first (~4 min)")
    ap.add_argument("--tune-duration-s", type=float, default=4.0)
    ap.add_argument("--standard-graph", action=argparse.BooleanOptionalAction, default=True,
                    help="also run nextchar on model.onnx (--onnx-graph standard), the graph "
                         "MLServer serves, beside its default (the Loop graph when present)")
    ap.add_argument("--mlserver", default=None, metavar="W,B,T_MS[,INTRA]",
                    help="MLServer parallel_workers, max_batch_size, max_batch_time in ms "
                         "(default: bench/mlserver_runtime/*.json, or the --tune winner)")
    args = ap.parse_args(argv)
    args.mlserver_venv, args.workdir = args.mlserver_venv.resolve(), args.workdir.resolve()

    args.workdir.mkdir(parents=True, exist_ok=True)
    artifact = peer_artifact(args.workdir / "artifact")
    manifest = json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))
    payloads = make_payloads(manifest["name"])

    tried: list[dict[str, Any]] = []
    if args.mlserver:
        w, b, t, *intra = args.mlserver.split(",")
        cfg = MLServerConfig(int(w), int(b), float(t) / 1e3, int(intra[0]) if intra else 1)
    elif args.tune:
        cfg, tried = tune(args.mlserver_venv, artifact, manifest, payloads, args.workdir,
                          args.tune_duration_s, args.warmup_s)
    else:
        ms = json.loads((RUNTIME_DIR / "model-settings.json").read_text())
        st = json.loads((RUNTIME_DIR / "settings.json").read_text())
        cfg = MLServerConfig(st["parallel_workers"], ms["max_batch_size"], ms["max_batch_time"],
                             ms["parameters"]["extra"]["intra_op_threads"])
    print(f"MLServer settings for the comparison: {cfg.label}", flush=True)

    servers = {"nextchar": start_nextchar(artifact, args.workdir),
               "mlserver": start_mlserver(args.mlserver_venv, artifact, manifest, cfg, args.workdir)}
    if args.standard_graph:
        servers["nextchar_standard"] = start_nextchar(artifact, args.workdir, "--onnx-graph",
                                                      "standard")
    samples: dict[tuple[str, int], list[Sample]] = {}
    load_start = os.getloadavg()
    try:
        for s in servers.values():
            s.wait_ready(manifest["name"])
        check_same_answers(list(servers.values()), payloads)
        order = list(servers)
        for rep in range(args.repeats):
            print(f"repeat {rep + 1}/{args.repeats}", flush=True)
            for c in args.concurrency:
                # Each repeat visits the servers in another order, so drift favours none.
                for key in order[rep % len(order):] + order[: rep % len(order)]:
                    sample = measure(servers[key], payloads, c, args.duration_s, args.warmup_s)
                    samples.setdefault((key, c), []).append(sample)
    finally:
        for s in servers.values():
            s.stop()

    rows = [summarize(key, samples[(key, c)]) for c in args.concurrency for key in servers]
    result = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "command": "make bench-peer  # " + " ".join(["bench/peer_bench.py", *(argv or sys.argv[1:])]),
        "artifact": {k: manifest[k] for k in ("name", "version", "model")},
        "mlserver": {"config": asdict(cfg), "label": cfg.label, "tuning": tried},
        "loadavg_1m_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        "duration_s": args.duration_s, "warmup_s": args.warmup_s, "repeats": args.repeats,
        "rows": [asdict(r) for r in rows],
    }
    print(markdown(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


def markdown(result: dict[str, Any]) -> str:
    by = {(r["server"], r["concurrency"]): r for r in result["rows"]}
    names = {"nextchar": "nextchar (defaults)", "mlserver": "MLServer",
             "nextchar_standard": "nextchar --onnx-graph standard"}
    lines = ["| concurrency | server | req/s | p50 ms | p99 ms | req/s vs MLServer | "
             "p99 vs MLServer |", "|---|---|---|---|---|---|---|"]
    for c in sorted({r["concurrency"] for r in result["rows"]}):
        m = by[("mlserver", c)]
        for key, label in names.items():
            r = by.get((key, c))
            if r is None:
                continue
            lines.append(f"| {c} | {label} | {r['throughput_rps']:.0f} | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['throughput_rps'] / m['throughput_rps']:.2f}x | "
                         f"{r['p99_ms'] / m['p99_ms']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
