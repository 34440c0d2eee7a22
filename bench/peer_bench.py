"""Peer benchmark: nextchar against Seldon MLServer 1.7.1 and Triton (NVIDIA PyTriton 0.7.0) on
the SAME ONNX graph, each peer tuned per concurrency, driven by ONE KServe V2 gRPC load generator.

    make bench-peer      # builds .venv-mlserver and .venv-pytriton, then runs this under flock -x
    .venv/bin/python bench/peer_bench.py --tune-out docs/peer_tuning.json \
        --out docs/peer_bench.json --md docs/peer_bench.md           # what make bench-peer runs
    .venv/bin/python bench/peer_bench.py --tuning docs/peer_tuning.json --out /tmp/p.json
                         # the comparison only, with the peers' settings of an earlier tuning run

1. Builds the artifact (84-character vocabulary, rnn, embed 64, hidden 256, 2 layers) with
   nextchar.training.export.build_random_artifact; it holds model.onnx (the standard export,
   ONNX Runtime's RNN kernel) and model_loop.onnx (nextchar's own graph, training/onnx_loop.py).
2. The graph: nextchar serves model_loop.onnx on CPU by default and skips its position logits
   when not asked; the peers load the same file and feed positions=False (bench/peer_model.py).
   That is the like-for-like comparison. The standard-graph rows (nextchar --onnx-graph
   standard, the peers on model.onnx with the same settings) are what a user gets without
   nextchar's exporter.
3. Tuning (unless --tuning FILE): every peer setting of TUNE_GRID is measured at each
   concurrency, --tune-samples interleaved samples of --tune-duration-s each, and the best
   median throughput per (peer, concurrency) is kept. MLServer: parallel_workers 0/1/2 x
   adaptive batching off (max_batch_size 1) or (max_batch_size, max_batch_time) from 1 to
   10 ms; Triton: 1 or 2 model instances x dynamic batching off (max_batch_size 1) or
   max_queue_delay_microseconds 0 to 5,000. Each setting is its own model, so one server process
   per MLServer worker count (and one Triton) serves them all and samples interleave without
   restarts. Metrics are off in every server (MLServer `metrics_endpoint: null`, Triton
   allow_metrics false; nextchar's are off unless --metrics-port).
4. Checks every server gives the same answer to the same requests (top ids equal, probabilities
   to 1e-5), on both graphs.
5. The comparison: fresh servers with the tuned settings; closed loop, each of C workers sends
   one request (one 64-character text, all outputs) and waits for the answer before the next;
   C = 1/8/64, --duration-s seconds each after --warmup-s, --repeats repeats, the servers in a
   rotated order each repeat; medians over repeats, and per-repeat ratios (same repeat).

The load generator pre-serializes its requests and sends raw bytes (the same texts to every
server; Triton's carry its batch axis: shape [1, 1]), so its own cost per call is the same for
all; it shares the machine's cores with the server under test. The 1-minute load average is
recorded at every sample (other jobs on a shared machine show there).
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

# nextchar serve's HTTP front end defaults to port 8000: servers this script starts pick a free
# one, so they never collide with each other or with a server already on 8000.
os.environ.setdefault("NEXTCHAR_HTTP_PORT", "0")

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
RUNTIME_DIR = BENCH / "mlserver_runtime"
# 84 characters: the printable ASCII a Shakespeare-like corpus uses, plus newline.
VOCAB = "\n !\"&'(),-.0123456789:;?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]_abcdefghijklmnopqrstuvwxyz|~$%*"
assert len(VOCAB) == 84 and len(set(VOCAB)) == 84
INFER = "/inference.GRPCInferenceService/ModelInfer"
CONCURRENCY = (1, 8, 64)
GRAPHS = ("loop", "standard")


@dataclass(frozen=True)
class PeerConfig:
    """One setting of a peer. workers: MLServer parallel_workers (0 = inference in the gRPC
    process) or Triton model instances; max_batch_size 1 = batching off; max_batch_time_us:
    MLServer max_batch_time or Triton max_queue_delay_microseconds."""

    peer: str  # "mlserver" | "triton"
    workers: int
    max_batch_size: int
    max_batch_time_us: int

    @property
    def label(self) -> str:
        what = "workers" if self.peer == "mlserver" else "instances"
        batching = ("batching off" if self.max_batch_size <= 1 else
                    f"max_batch_size {self.max_batch_size}, "
                    + ("max_batch_time" if self.peer == "mlserver" else "max_queue_delay")
                    + f" {self.max_batch_time_us / 1e3:g} ms")
        return f"{self.peer} {what} {self.workers}, {batching}"

    def model_name(self, graph: str) -> str:
        return f"{self.peer}-w{self.workers}-b{self.max_batch_size}-d{self.max_batch_time_us}-{graph}"


def _mlserver(w: int, b: int, ms: float) -> PeerConfig:
    return PeerConfig("mlserver", w, b, round(ms * 1000))


def _triton(n: int, b: int, us: int) -> PeerConfig:
    return PeerConfig("triton", n, b, us)


# What tuning tries, per concurrency. At c=1 no batch can form, so only the wait matters; at
# c=8 batches of up to 8 form; at c=64 the big batches and longer waits. MLServer's adaptive
# batching waits up to max_batch_time unless the batch fills; Triton's dynamic batcher takes what
# is queued when an instance is free and waits up to the delay for more.
_ML_BATCH = {1: [(1, 0), (8, 1), (16, 2)],
             8: [(1, 0), (8, 1), (16, 2), (32, 2), (64, 5)],
             64: [(1, 0), (32, 2), (64, 2), (64, 5), (64, 10), (128, 10)]}
_TRITON_DELAY_US = {1: [None, 0, 500], 8: [None, 0, 500, 2000], 64: [None, 0, 2000, 5000]}
TUNE_GRID: dict[int, list[PeerConfig]] = {
    c: [_mlserver(w, b, t) for w in (0, 1, 2) for b, t in _ML_BATCH[c]]
    + [_triton(n, 1 if d is None else 64, d or 0) for n in (1, 2) for d in _TRITON_DELAY_US[c]]
    for c in CONCURRENCY
}


@dataclass
class Sample:
    concurrency: int
    requests: int
    errors: dict[str, int]
    duration_s: float
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    loadavg_1m: float = 0.0  # at the start of the sample


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
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free ports: all bound at once, so two calls cannot hand out the same one."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


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

    def wait_ready(self, model: str, timeout_s: float = 300) -> None:
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
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log_file.close()


@dataclass
class Target:
    """One thing the load generator drives: a server and the model name (and shape) it asks for."""

    key: str
    label: str
    server: Server
    model: str
    batch_axis: bool = False  # Triton: the text tensor is [1, 1]
    payloads: list[bytes] = field(default_factory=list)


def start_nextchar(artifact: Path, workdir: Path, *flags: str) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "nextchar", "serve", "--model", str(artifact),
            "--host", "127.0.0.1", "--port", str(port), *flags]
    name = " ".join(["nextchar", *flags])
    return Server(name, argv, port, workdir, workdir / f"{name.replace(' ', '_')}.log")


def start_mlserver(venv: Path, artifact: Path, workers: int, configs: list[tuple[PeerConfig, str]],
                   workdir: Path) -> Server:
    """One MLServer process (parallel_workers `workers`) with one model per (config, graph)."""
    folder = Path(tempfile.mkdtemp(prefix=f"mlserver-w{workers}-", dir=workdir))
    port, http_port, metrics_port = free_ports(3)
    settings = json.loads((RUNTIME_DIR / "settings.json").read_text())
    settings.update(host="127.0.0.1", grpc_port=port, http_port=http_port,
                    metrics_port=metrics_port, parallel_workers=workers, metrics_endpoint=None,
                    model_repository_root=str(folder))
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    template = json.loads((RUNTIME_DIR / "model-settings.json").read_text())
    for cfg, graph in configs:
        model_dir = folder / cfg.model_name(graph)
        model_dir.mkdir()
        for f in (RUNTIME_DIR / "runtime.py", BENCH / "peer_model.py"):
            shutil.copy(f, model_dir / f.name)
        model = json.loads(json.dumps(template))
        model.update(name=cfg.model_name(graph), max_batch_size=cfg.max_batch_size,
                     max_batch_time=cfg.max_batch_time_us / 1e6)
        model["parameters"].update(uri=str(artifact))
        model["parameters"]["extra"].update(graph=graph)
        (model_dir / "model-settings.json").write_text(json.dumps(model, indent=2))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLSERVER_", "PROMETHEUS_"))}
    argv = [str(venv / "bin" / "mlserver"), "start", str(folder)]
    return Server(f"MLServer parallel_workers={workers}", argv, port, folder,
                  folder / "mlserver.log", env)


def start_triton(venv: Path, artifact: Path, configs: list[tuple[PeerConfig, str]],
                 workdir: Path) -> Server:
    """One PyTriton process with one Triton model per (config, graph)."""
    script = str(BENCH / "pytriton_server.py")
    subprocess.run([str(venv / "bin" / "python"), script, "--install-sitecustomize"], check=True,
                   stdout=subprocess.DEVNULL)
    port, http_port = free_ports(2)
    argv = [str(venv / "bin" / "python"), script, "--artifact", str(artifact),
            "--grpc-port", str(port), "--http-port", str(http_port)]
    for cfg, graph in configs:
        argv += ["--model", f"{cfg.model_name(graph)}:{graph}:{cfg.workers}:"
                            f"{cfg.max_batch_size}:{cfg.max_batch_time_us}"]
    folder = Path(tempfile.mkdtemp(prefix="pytriton-", dir=workdir))
    return Server("Triton (PyTriton)", argv, port, folder, folder / "triton.log")


def peer_artifact(path: Path = REPO / "runs" / "peer_bench" / "artifact") -> Path:
    """The benchmark model (84-character vocabulary, rnn, embed 64, hidden 256, 2 layers), built
    at `path` unless it is there already; bench/graph_bench.py and bench/server_cpu.py share it."""
    if not (path / "manifest.json").is_file():
        from nextchar.training.export import build_random_artifact

        build_random_artifact(path, vocab=VOCAB, cell="rnn", embed_dim=64, hidden_size=256,
                              num_layers=2, seed=0, name="peer-rnn")
    return path.resolve()


class Fleet:
    """The server processes of one phase; all stopped on exit, whatever happened."""

    def __init__(self) -> None:
        self.servers: list[Server] = []

    def add(self, server: Server) -> Server:
        self.servers.append(server)
        return server

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self.servers:
            try:
                s.stop()
            except Exception as e:  # keep stopping the others
                print(f"stopping {s.name}: {e}", flush=True)


def start_peers(fleet: Fleet, args: argparse.Namespace, artifact: Path,
                wanted: list[tuple[PeerConfig, str]]) -> dict[tuple[PeerConfig, str], Target]:
    """Servers for every (config, graph) wanted: one MLServer per worker count, one Triton."""
    targets: dict[tuple[PeerConfig, str], Target] = {}
    by_workers: dict[int, list[tuple[PeerConfig, str]]] = {}
    for cfg, graph in wanted:
        if cfg.peer == "mlserver":
            by_workers.setdefault(cfg.workers, []).append((cfg, graph))
    for workers, items in sorted(by_workers.items()):
        server = fleet.add(start_mlserver(args.mlserver_venv, artifact, workers, items, args.workdir))
        for cfg, graph in items:
            targets[(cfg, graph)] = Target(f"{cfg.model_name(graph)}", f"{cfg.label} ({graph} graph)",
                                           server, cfg.model_name(graph))
    tritons = [(cfg, graph) for cfg, graph in wanted if cfg.peer == "triton"]
    if tritons:
        # PyTriton's stub gives its handshake with the Python process 1 s; on a loaded 2-core
        # machine that sometimes runs out and the model fails to load: start it again then.
        for attempt in range(3):
            server = fleet.add(start_triton(args.pytriton_venv, artifact, tritons, args.workdir))
            try:
                for cfg, graph in tritons:
                    server.wait_ready(cfg.model_name(graph))
                break
            except RuntimeError as e:
                print(f"Triton did not start (attempt {attempt + 1}): {e}", flush=True)
                server.stop()
                fleet.servers.remove(server)
        else:
            raise RuntimeError("Triton did not start in 3 attempts")
        for cfg, graph in tritons:
            targets[(cfg, graph)] = Target(f"{cfg.model_name(graph)}", f"{cfg.label} ({graph} graph)",
                                           server, cfg.model_name(graph), batch_axis=True)
    return targets


# -- requests and answers --------------------------------------------------------------------


def make_payloads(model: str, n: int = 64, chars: int = 64, seed: int = 0,
                  batch_axis: bool = False) -> list[bytes]:
    """n distinct requests, each one text of `chars` characters, no parameters, all outputs;
    the same texts for every model name (seeded)."""
    rng = np.random.default_rng(seed)
    payloads = []
    for _ in range(n):
        text = "".join(rng.choice(list(VOCAB[1:]), size=chars))  # no newline: one line of text
        req = pb.ModelInferRequest(model_name=model, inputs=[pb.ModelInferRequest.InferInputTensor(
            name="text", datatype="BYTES", shape=[1, 1] if batch_axis else [1],
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


def answers(target: Target, n: int = 8) -> list[dict[str, np.ndarray]]:
    with grpc.insecure_channel(target.server.address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        return [decode(stub.ModelInfer(pb.ModelInferRequest.FromString(p), timeout=30))
                for p in target.payloads[:n]]


def check_same_answers(targets: list[Target]) -> None:
    """Every target's answers equal the first's: top ids exactly, probabilities to 1e-5."""
    ref = answers(targets[0])
    for target in targets[1:]:
        for a, b in zip(ref, answers(target), strict=True):
            if not np.array_equal(a["top_ids"].reshape(-1), b["top_ids"].reshape(-1)):
                raise RuntimeError(f"{target.label} ranks differently: {a['top_ids']} vs {b['top_ids']}")
            diff = np.abs(a["probs"].reshape(-1) - b["probs"].reshape(-1)).max()
            if diff > 1e-5:
                raise RuntimeError(f"{target.label} probabilities differ by {diff:.2e}")


# -- the load generator ----------------------------------------------------------------------


async def closed_loop(address: str, payloads: list[bytes], concurrency: int,
                      duration_s: float, warmup_s: float = 0.0) -> Sample:
    """C workers on one channel, each sending its next request when its answer arrives; the
    first warmup_s seconds (same channel, same workers' pattern) are not measured."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(INFER)  # bytes in, bytes out: no client-side (de)serializing
        if warmup_s > 0:
            await _drive(call, payloads, concurrency, warmup_s, [], {})
        latencies: list[float] = []
        errors: dict[str, int] = {}
        started = time.perf_counter()
        await _drive(call, payloads, concurrency, duration_s, latencies, errors)
        elapsed = time.perf_counter() - started
    lat_ms = np.array(latencies) * 1e3 if latencies else np.array([float("nan")])
    return Sample(concurrency, len(latencies), errors, round(elapsed, 3),
                  round(len(latencies) / elapsed, 1), round(float(np.percentile(lat_ms, 50)), 2),
                  round(float(np.percentile(lat_ms, 99)), 2))


async def _drive(call: Any, payloads: list[bytes], concurrency: int, duration_s: float,
                 latencies: list[float], errors: dict[str, int]) -> None:
    stop_at = time.perf_counter() + duration_s

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


def measure(target: Target, concurrency: int, duration_s: float, warmup_s: float) -> Sample:
    load = os.getloadavg()[0]
    sample = asyncio.run(closed_loop(target.server.address, target.payloads, concurrency,
                                     duration_s, warmup_s))
    sample.loadavg_1m = round(load, 2)
    print(f"  {target.label:<72} c={concurrency:<3} {sample.throughput_rps:>8.1f} req/s  "
          f"p50 {sample.p50_ms:>7.2f} ms  p99 {sample.p99_ms:>7.2f} ms  load {load:.2f}"
          + (f"  errors {sample.errors}" if sample.errors else ""), flush=True)
    return sample


def summarize(name: str, samples: list[Sample]) -> Summary:
    return Summary(name, samples[0].concurrency,
                   round(statistics.median(s.throughput_rps for s in samples), 1),
                   round(statistics.median(s.p50_ms for s in samples), 2),
                   round(statistics.median(s.p99_ms for s in samples), 2), samples)


def interleaved(plan: dict[int, list[Target]], repeats: int, duration_s: float,
                warmup_s: float) -> dict[tuple[str, int], list[Sample]]:
    """Each repeat visits every concurrency and, within it, every target in a rotated order, so
    drift on a shared machine favours none."""
    samples: dict[tuple[str, int], list[Sample]] = {}
    for rep in range(repeats):
        print(f"repeat {rep + 1}/{repeats}", flush=True)
        for c, targets in plan.items():
            shift = rep % len(targets)
            for t in targets[shift:] + targets[:shift]:
                samples.setdefault((t.key, c), []).append(measure(t, c, duration_s, warmup_s))
    return samples


# -- the run ---------------------------------------------------------------------------------


def git_commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "server", "client", "proto",
                "training", "bench")
    return git("rev-parse", "--short", "HEAD") + (" (+ uncommitted changes)" if dirty else "")


def run_info(argv: list[str] | None) -> dict[str, Any]:
    return {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "command": " ".join(["bench/peer_bench.py", *(sys.argv[1:] if argv is None else argv)]),
    }


def tune(args: argparse.Namespace, artifact: Path, argv: list[str] | None) -> dict[str, Any]:
    info = {**run_info(argv), "loadavg_1m_start": round(os.getloadavg()[0], 2)}
    started = time.monotonic()
    configs = sorted({cfg for c in args.concurrency for cfg in TUNE_GRID[c]},
                     key=lambda x: (x.peer, x.workers, x.max_batch_size, x.max_batch_time_us))
    with Fleet() as fleet:
        targets = start_peers(fleet, args, artifact, [(cfg, "loop") for cfg in configs])
        for t in targets.values():
            t.payloads = make_payloads(t.model, batch_axis=t.batch_axis)
        for t in targets.values():
            t.server.wait_ready(t.model)
        check_same_answers(list(targets.values()))
        plan = {c: [targets[(cfg, "loop")] for cfg in TUNE_GRID[c]] for c in args.concurrency}
        print(f"tuning: {sum(map(len, plan.values()))} (setting, concurrency) points x "
              f"{args.tune_samples} samples of {args.tune_duration_s:g} s", flush=True)
        samples = interleaved(plan, args.tune_samples, args.tune_duration_s, args.tune_warmup_s)
    points = []
    best: dict[str, dict[int, dict[str, Any]]] = {}
    for c in args.concurrency:
        for cfg in TUNE_GRID[c]:
            s = summarize(cfg.label, samples[(cfg.model_name("loop"), c)])
            ok = not any(x.errors for x in s.samples)
            point = {"config": asdict(cfg), "label": cfg.label, "concurrency": c, "ok": ok,
                     "throughput_rps": s.throughput_rps, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms,
                     "samples": [asdict(x) for x in s.samples]}
            points.append(point)
            cur = best.setdefault(cfg.peer, {}).get(c)
            if ok and (cur is None or (s.throughput_rps, -s.p99_ms)
                       > (cur["throughput_rps"], -cur["p99_ms"])):
                best[cfg.peer][c] = point
    for peer, per_c in best.items():
        for c, p in per_c.items():
            print(f"best {peer} at c={c}: {p['label']}: {p['throughput_rps']:.0f} req/s, "
                  f"p99 {p['p99_ms']:.1f} ms", flush=True)
    return {**info, "loadavg_1m_end": round(os.getloadavg()[0], 2),
            "wall_s": round(time.monotonic() - started), "graph": "loop",
            "samples_per_point": args.tune_samples, "duration_s": args.tune_duration_s,
            "warmup_s": args.tune_warmup_s,
            "best": {peer: {str(c): p["config"] for c, p in per_c.items()}
                     for peer, per_c in best.items()},
            "points": points}


def compare(args: argparse.Namespace, artifact: Path, tuning: dict[str, Any],
            argv: list[str] | None) -> dict[str, Any]:
    info = {**run_info(argv), "loadavg_1m_start": round(os.getloadavg()[0], 2)}
    started = time.monotonic()
    best = {peer: {int(c): PeerConfig(**cfg) for c, cfg in per_c.items()}
            for peer, per_c in tuning["best"].items()}
    graphs = GRAPHS if args.standard_graph else GRAPHS[:1]
    wanted = sorted({(best[p][c], g) for p in best for c in args.concurrency for g in graphs},
                    key=lambda x: (x[0].peer, x[0].workers, x[0].max_batch_size,
                                   x[0].max_batch_time_us, x[1]))
    manifest = json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))
    with Fleet() as fleet:
        ours = {"loop": Target("nextchar", "nextchar (defaults, loop graph)",
                               fleet.add(start_nextchar(artifact, args.workdir)), manifest["name"])}
        if args.standard_graph:
            ours["standard"] = Target(
                "nextchar_standard", "nextchar --onnx-graph standard",
                fleet.add(start_nextchar(artifact, args.workdir, "--onnx-graph", "standard")),
                manifest["name"])
        peers = start_peers(fleet, args, artifact, wanted)
        for t in [*ours.values(), *peers.values()]:
            t.payloads = make_payloads(t.model, batch_axis=t.batch_axis)
            t.server.wait_ready(t.model)
        for g in graphs:
            check_same_answers([ours[g], *(t for (cfg, graph), t in peers.items() if graph == g)])
        plan = {c: [*(t for g in graphs for t in
                      [ours[g], *(peers[(best[p][c], g)] for p in sorted(best))])]
                for c in args.concurrency}
        samples = interleaved(plan, args.repeats, args.duration_s, args.warmup_s)
    rows = []
    for c in args.concurrency:
        for t in plan[c]:
            key = {"nextchar": "nextchar", "nextchar_standard": "nextchar"}.get(t.key) or t.model.split("-")[0]
            graph = "standard" if t.key.endswith("standard") else "loop"
            s = summarize(t.label, samples[(t.key, c)])
            rows.append({"server": key, "graph": graph, "label": t.label, "key": t.key,
                         **{k: v for k, v in asdict(s).items() if k != "server"}})
    result = {**info, "loadavg_1m_end": round(os.getloadavg()[0], 2),
              "wall_s": round(time.monotonic() - started),
              "artifact": {k: manifest[k] for k in ("name", "version", "model")},
              "tuning": {"from": args.tuning_source, "date_utc": tuning.get("date_utc"),
                         "commit": tuning.get("commit"), "best": tuning["best"]},
              "duration_s": args.duration_s, "warmup_s": args.warmup_s, "repeats": args.repeats,
              "rows": rows}
    result["ratios"] = ratios(result)
    return result


def ratios(result: dict[str, Any]) -> list[dict[str, Any]]:
    """nextchar against each peer and against the better peer, same graph, same run: ratio of the
    medians, and the ratios repeat by repeat (the same repeat's samples)."""
    by = {(r["server"], r["graph"], r["concurrency"]): r for r in result["rows"]}
    out = []
    for (server, graph, c), ours in sorted(by.items()):
        if server != "nextchar":
            continue
        peers = {s: r for (s, g, cc), r in by.items() if s != "nextchar" and g == graph and cc == c}
        if not peers:
            continue
        better = max(peers, key=lambda s: peers[s]["throughput_rps"])
        for name, peer in [*peers.items(), ("better peer", peers[better])]:
            per_rep = [(a["throughput_rps"] / b["throughput_rps"], a["p99_ms"] / b["p99_ms"])
                       for a, b in zip(ours["samples"], peer["samples"], strict=True)]
            out.append({"graph": graph, "concurrency": c, "against": name,
                        "peer": peer["label"],
                        "throughput_ratio": round(ours["throughput_rps"] / peer["throughput_rps"], 2),
                        "p99_ratio": round(ours["p99_ms"] / peer["p99_ms"], 2),
                        "throughput_ratio_per_repeat": [round(t, 2) for t, _ in per_rep],
                        "p99_ratio_per_repeat": [round(p, 2) for _, p in per_rep]})
    return out


def markdown(result: dict[str, Any], tuning: dict[str, Any] | None) -> str:
    lines = [f"Peer benchmark, {result['date_utc']}, commit {result['commit']}, {result['machine']}; "
             f"`{result['command']}`; {result['repeats']} interleaved repeats of "
             f"{result['duration_s']:g} s (+ {result['warmup_s']:g} s warm-up) per point; "
             f"load average (1 min) {result['loadavg_1m_start']} at the start, "
             f"{result['loadavg_1m_end']} at the end; peer settings tuned "
             f"{result['tuning']['date_utc']} at commit {result['tuning']['commit']}.", "",
             "| graph | concurrency | server | req/s | p50 ms | p99 ms | req/s per repeat | "
             "load avg per repeat |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['graph']} | {r['concurrency']} | {r['label']} | {r['throughput_rps']:,.0f} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     + ", ".join(f"{s['throughput_rps']:,.0f}" for s in r["samples"]) + " | "
                     + ", ".join(f"{s['loadavg_1m']:.1f}" for s in r["samples"]) + " |")
    lines += ["", "| graph | concurrency | nextchar vs | req/s ratio | p99 ratio | req/s ratio per "
              "repeat | p99 ratio per repeat |", "|---|---|---|---|---|---|---|"]
    for q in result["ratios"]:
        who = q["against"] + (f" ({q['peer']})" if q["against"] == "better peer" else "")
        lines.append(f"| {q['graph']} | {q['concurrency']} | {who} | **{q['throughput_ratio']:.2f}x** | "
                     f"{q['p99_ratio']:.2f}x | "
                     + ", ".join(f"{x:.2f}" for x in q["throughput_ratio_per_repeat"]) + " | "
                     + ", ".join(f"{x:.2f}" for x in q["p99_ratio_per_repeat"]) + " |")
    if tuning is not None and tuning.get("points"):
        lines += ["", f"Tuning, {tuning['date_utc']}, commit {tuning['commit']}: "
                  f"{tuning['samples_per_point']} interleaved samples of {tuning['duration_s']:g} s "
                  f"per point, loop graph, medians; load average {tuning['loadavg_1m_start']} at "
                  f"the start, {tuning['loadavg_1m_end']} at the end; **bold** = kept.", "",
                  "| concurrency | setting | req/s | p50 ms | p99 ms | req/s per sample |",
                  "|---|---|---|---|---|---|"]
        for p in tuning["points"]:
            kept = tuning["best"].get(p["config"]["peer"], {}).get(str(p["concurrency"])) == p["config"]
            label = f"**{p['label']}**" if kept else p["label"]
            lines.append(f"| {p['concurrency']} | {label} | {p['throughput_rps']:,.0f} | "
                         f"{p['p50_ms']:.2f} | {p['p99_ms']:.2f} | "
                         + ", ".join(f"{s['throughput_rps']:,.0f}" for s in p["samples"])
                         + ("" if p["ok"] else " (errors)") + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mlserver-venv", type=Path, default=REPO / ".venv-mlserver")
    ap.add_argument("--pytriton-venv", type=Path, default=REPO / ".venv-pytriton")
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "peer_bench")
    ap.add_argument("--out", type=Path, help="write the comparison here as JSON")
    ap.add_argument("--md", type=Path, help="write the tables here as markdown")
    ap.add_argument("--duration-s", type=float, default=5.0, help="measured seconds per point")
    ap.add_argument("--warmup-s", type=float, default=1.0, help="unmeasured seconds before each")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY),
                    choices=list(CONCURRENCY))
    ap.add_argument("--tuning", type=Path,
                    help="take the peers' settings from this earlier --tune-out file (no tuning)")
    ap.add_argument("--tune-out", type=Path, help="write the tuning run here as JSON")
    ap.add_argument("--tune-only", action="store_true", help="tune, write --tune-out, stop")
    ap.add_argument("--tune-samples", type=int, default=3)
    ap.add_argument("--tune-duration-s", type=float, default=1.5)
    ap.add_argument("--tune-warmup-s", type=float, default=0.3)
    ap.add_argument("--peers", default="mlserver,triton", help="comma-separated: mlserver,triton")
    ap.add_argument("--standard-graph", action=argparse.BooleanOptionalAction, default=True,
                    help="also run every server on model.onnx (what a user gets without "
                         "nextchar's exporter)")
    args = ap.parse_args(argv)
    args.mlserver_venv, args.workdir = args.mlserver_venv.resolve(), args.workdir.resolve()
    args.pytriton_venv = args.pytriton_venv.resolve()
    peers = {p for p in args.peers.split(",") if p}
    for c in CONCURRENCY:
        TUNE_GRID[c] = [cfg for cfg in TUNE_GRID[c] if cfg.peer in peers]

    args.workdir.mkdir(parents=True, exist_ok=True)
    artifact = peer_artifact(args.workdir / "artifact")
    tuning: dict[str, Any] | None = None
    if args.tuning:
        tuning = json.loads(args.tuning.read_text(encoding="utf-8"))
        tuning["best"] = {p: v for p, v in tuning["best"].items() if p in peers}
        args.tuning_source = str(args.tuning)
    else:
        tuning = tune(args, artifact, argv)
        args.tuning_source = str(args.tune_out) if args.tune_out else "this run"
        if args.tune_out:
            args.tune_out.write_text(json.dumps(tuning, indent=1) + "\n", encoding="utf-8")
        if args.tune_only:
            return 0
    result = compare(args, artifact, tuning, argv)
    text = markdown(result, tuning)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if args.md:
        args.md.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
