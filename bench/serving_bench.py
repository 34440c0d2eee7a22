"""Serving benchmark: one run, side by side, ratios you can trust on a noisy machine.

    python bench/serving_bench.py --out docs            # `make bench`; about 8 minutes
    python bench/serving_bench.py --quick --out /tmp/b  # a 1-minute smoke run

What it measures, in one run (repeats interleaved so machine noise hits every variant alike):
1. the machine's float32 GEMM peak (torch matmul, 2 threads) and FLOP per character;
2. the raw in-process backends on equal batches (the limit a server can approach);
3. an "empty" Predict: a 1-unit model and 1-char texts (the gRPC + framework ceiling);
4. real `nextchar serve` subprocesses, batching off and on, for each backend, driven by a
   closed-loop gRPC load generator (this process): single 64-char texts at several
   concurrencies, and 256 x 64-char batch-job requests.

Reports requests/s, texts/s, chars/s, p50/p90/p99 latency, mean batch size (from the server's
Prometheus metrics) and the load generator's own CPU use, as a markdown table and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
from serve_process import ServeProcess

from nextchar.v1 import nextchar_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
VOCAB96 = "".join(chr(c) for c in range(32, 127)) + "\n"  # 96 characters
MODEL = {"cell": "rnn", "embed_dim": 64, "hidden_size": 256, "num_layers": 2}
TEXT_CHARS = 64
JOB_TEXTS = 256
JOB_CONCURRENCY = 4  # a batch job keeps a few big requests in flight (every worker busy)
PREDICT = "/nextchar.v1.NextChar/Predict"


# --- artifacts ------------------------------------------------------------------------------
def build_artifacts(root: Path) -> tuple[Path, Path]:
    """The benchmark model (V=96, E=64, H=256, 2-layer tanh) and a 1-unit 'empty' model."""
    from nextchar.training.export import build_random_artifact

    main = root / "rnn-h256"
    if not (main / "manifest.json").exists():
        build_random_artifact(main, vocab=VOCAB96, seed=0, name="bench-rnn-h256", **MODEL)
    empty = root / "empty"
    if not (empty / "manifest.json").exists():
        build_random_artifact(empty, vocab="ab", cell="rnn", embed_dim=1, hidden_size=1,
                              num_layers=1, seed=0, name="bench-empty")
    return main, empty


def flop_per_char(v: int, e: int, h: int, layers: int, graph: str = "model") -> int:
    """FLOP (2 x multiply-adds) per character that a graph executes; the embedding lookup is
    free and the head runs at the last step only (amortised to ~0).

    "model" (the model as defined, what model.onnx and TorchScript run): layer 0's input
    projection E*H + its recurrence H*H, later layers 2*H*H. "loop" (model_loop.onnx,
    training/onnx_loop.py): layer 0's input projection is folded into a V x H table, a lookup,
    so layer 0 executes its recurrence H*H only."""
    first = h * h if graph == "loop" else e * h + h * h
    return 2 * first + (layers - 1) * 2 * (2 * h * h)


def raw_graph(name: str) -> str:
    """Which FLOP count a raw-backend row executes ("onnx (loop graph) B=64" -> "loop")."""
    return "loop" if "loop graph" in name else "model"


def model_core(raw: dict[str, dict[str, float]], gemm: dict[str, float], v: int, e: int, h: int,
               layers: int) -> tuple[list[str], float]:
    """The raw-backend table against the best GEMM rate measured (every shape, squares and the
    RNN-step shapes alike), each row with the FLOP its graph executes."""
    peak = max(gemm.values()) if gemm else float("nan")
    best = max(gemm, key=gemm.__getitem__) if gemm else "-"
    lines = ["GEMM rates (torch.matmul float32, 2 threads), GFLOP/s: "
             + ", ".join(f"{k} {v_:.0f}" for k, v_ in gemm.items())
             + f". Peak used: {peak:.0f} ({best}, the best measured).", "",
             "| raw backend, equal batches of 64-char texts | char/s | FLOP/char executed | "
             "GFLOP/s | of GEMM peak | workers |", "|---|---|---|---|---|---|"]
    for name, r in raw.items():
        fpc = flop_per_char(v, e, h, layers, raw_graph(name))
        gf = r["chars_per_s"] * fpc / 1e9
        lines.append(f"| {name} | {r['chars_per_s']:,.0f} | {fpc:,} | {gf:.1f} | "
                     f"{100 * gf / peak:.0f}% | {r['workers']:g} |")
    return lines, peak


# --- in-process measurements (run in child processes: clean thread state per runtime) -------
def child_gemm_peak(repeats: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(2)
    out: dict[str, float] = {}
    shapes = {"512^3": (512, 512, 512), "1024^3": (1024, 1024, 1024), "2048^3": (2048, 2048, 2048),
              "128x256x256 (RNN step)": (128, 256, 256), "256x256x256": (256, 256, 256)}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        iters = max(3, int(2e10 / (2 * m * k * n)))
        rates = []
        for _ in range(repeats):
            a @ b
            t = time.perf_counter()
            for _ in range(iters):
                a @ b
            rates.append(2 * m * k * n * iters / (time.perf_counter() - t) / 1e9)
        out[name] = statistics.median(rates)
    return out


def child_raw_backend(artifact: str, backend: str, graph: str, batch: int, seconds: float,
                      repeats: int) -> dict[str, float]:
    """chars/s of the backend alone on equal batches, with the server's own concurrency."""
    from concurrent.futures import wait

    import numpy as np

    from nextchar.server.artifact import load_artifact
    from nextchar.server.backends import create_backend

    art = load_artifact(artifact, backends=(backend,))
    be = create_backend(art, backend, "cpu", onnx_graph=graph)
    pool = be.make_executor()
    prepare = getattr(be, "prepare", None)
    if prepare:
        pool.submit(prepare).result()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, art.vocab_size, size=(batch, TEXT_CHARS), dtype=np.int64)
    lengths = np.full(batch, TEXT_CHARS, dtype=np.int64)
    state = be.zero_state(batch)
    pool.submit(be.run, ids, lengths, state).result()  # warm-up on the worker thread

    def loop(deadline: float) -> int:
        n = 0
        while time.perf_counter() < deadline:
            be.run(ids, lengths, state)
            n += 1
        return n

    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        futs = [pool.submit(loop, t0 + seconds) for _ in range(be.workers)]
        wait(futs)
        calls = sum(f.result() for f in futs)
        rates.append(calls * batch * TEXT_CHARS / (time.perf_counter() - t0))
    pool.shutdown()
    return {"chars_per_s": statistics.median(rates), "workers": be.workers,
            "graph": getattr(be, "graph", "-")}


def run_child(fn: str, **kwargs: Any) -> Any:
    code = (f"import json, sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import serving_bench as b; "
            f"print(json.dumps(b.{fn}(**json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- servers --------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    args: list[str]
    process: ServeProcess | None = None
    address: str = ""
    metrics_port: int = 0

    @property
    def empty(self) -> bool:
        """The empty-Predict server: one-character texts of a trivial model (the gRPC ceiling)."""
        return self.name.startswith("empty Predict")

    def start(self, metrics_port: int) -> None:
        self.metrics_port = metrics_port
        self.process = ServeProcess(["--log-level", "WARNING", "--metrics-port", str(metrics_port),
                                     *self.args], what=self.name)
        self.address = self.process.address

    def batch_stats(self) -> tuple[float, float]:
        """(sum, count) of the server's batch-size histogram."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        def grab(name: str) -> float:  # summed over label sets (e.g. one per model)
            return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$",
                                                     text, re.M))
        return grab("nextchar_batch_size_texts_sum"), grab("nextchar_batch_size_texts_count")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


# --- the load generator ---------------------------------------------------------------------
@dataclass
class Result:
    variant: str
    workload: str
    concurrency: int
    requests_per_s: float
    texts_per_s: float
    chars_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch: float
    loadgen_cpu: float  # cores used by this process during the run
    errors: int
    repeats: list[float] = field(default_factory=list)


async def closed_loop(address: str, payload: bytes, concurrency: int, seconds: float) -> tuple[int, int, list[float], float]:
    """Each of `concurrency` callers sends the next request as soon as the last one returns."""
    lat: list[float] = []
    errors = 0
    ok = 0
    async with grpc.aio.insecure_channel(address) as ch:
        call = ch.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
        await call(payload, timeout=30)  # connect before the clock starts
        start = time.perf_counter()
        deadline = start + seconds

        async def caller() -> None:
            nonlocal errors, ok
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                try:
                    await call(payload, timeout=30)
                    ok += 1
                    lat.append(time.perf_counter() - t)
                except grpc.aio.AioRpcError:
                    errors += 1

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start  # includes the last responses past the deadline
    return ok, errors, lat, elapsed


def measure(server: Server, workload: str, texts: int, chars: int, concurrency: int, seconds: float,
            alphabet: str = VOCAB96[:-1]) -> dict[str, Any]:
    rng_text = alphabet * (chars // len(alphabet) + 52)
    payload = pb.PredictRequest(texts=[rng_text[i % 50: i % 50 + chars] for i in range(texts)],
                                top_k=0).SerializeToString()  # server default (5)
    s0, c0 = server.batch_stats()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    ok, errors, lat, elapsed = asyncio.run(closed_loop(server.address, payload, concurrency, seconds))
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    s1, c1 = server.batch_stats()
    lat.sort()
    q = lambda p: 1000 * lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")  # noqa: E731
    rps = ok / elapsed
    return {"rps": rps, "texts": rps * texts, "chars": rps * texts * chars, "p50": q(0.50),
            "p90": q(0.90), "p99": q(0.99), "mean_batch": (s1 - s0) / max(1.0, c1 - c0),
            "cpu": (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / wall, "errors": errors}


def summarise(variant: str, workload: str, conc: int, runs: list[dict[str, Any]], texts: int) -> Result:
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    return Result(variant, workload, conc, med("rps"), med("texts"), med("chars"), med("p50"),
                  med("p90"), med("p99"), med("mean_batch"), med("cpu"), sum(r["errors"] for r in runs),
                  [round(r["rps"], 1) for r in runs])


# --- report ---------------------------------------------------------------------------------
def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in sorted({r.variant for r in results if r.workload == "single"}):
        rs = sorted((r for r in results if r.variant == variant and r.workload == "single"),
                    key=lambda r: r.concurrency)
        xs = [r.concurrency for r in rs]
        ax1.plot(xs, [r.requests_per_s for r in rs], marker="o", label=variant)
        ax2.plot(xs, [r.p99_ms for r in rs], marker="o", label=variant)
    for ax, title in ((ax1, "throughput (requests/s, 1 x 64 chars)"), (ax2, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench")
    ap.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--quick", action="store_true", help="1 repeat, 2 s, concurrency 1,64")
    ap.add_argument("--servers", default="",
                    help="comma-separated substrings: only the server variants whose name contains "
                         "one (e.g. 'onnx,'); default all")
    ap.add_argument("--no-raw", action="store_true", help="skip the GEMM peak and raw-backend runs")
    ap.add_argument("--model-core", type=Path, metavar="JSON",
                    help="print the model-core table from a run's serving_bench.json, run nothing")
    args = ap.parse_args()
    if args.model_core:
        run = json.loads(args.model_core.read_text())
        lines, _ = model_core(run["raw"], run["gemm"], len(VOCAB96), MODEL["embed_dim"],
                              MODEL["hidden_size"], MODEL["num_layers"])
        print("\n".join(lines))
        return 0
    if args.quick:
        args.repeats, args.seconds, args.concurrency = 1, 2.0, "1,64"
    concs = [int(c) for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    main_art, empty_art = build_artifacts(args.work)
    manifest = json.loads((main_art / "manifest.json").read_text())
    m = manifest["model"]
    fpc = flop_per_char(len(manifest["vocab"]), m["embed_dim"], m["hidden_size"], m["num_layers"])
    started = datetime.now(timezone.utc)
    print(f"model {m}, {fpc} FLOP/char", flush=True)

    gemm: dict[str, float] = {}
    peak = float("nan")
    if not args.no_raw:
        print("GEMM peak ...", flush=True)
        gemm = run_child("child_gemm_peak", repeats=args.repeats)
        peak = max(gemm.values())  # the best rate measured, whatever its shape

    print("raw backends ...", flush=True)
    raw: dict[str, dict[str, float]] = {}
    raw_variants = {"onnx (loop graph)": ("onnx", "loop"), "onnx (standard graph)": ("onnx", "standard"),
                    "torchscript": ("torchscript", "auto")}
    for name, (backend, graph) in ({} if args.no_raw else raw_variants).items():
        for batch in (1, 64, JOB_TEXTS):
            raw[f"{name} B={batch}"] = run_child("child_raw_backend", artifact=str(main_art), backend=backend,
                                                 graph=graph, batch=batch, seconds=args.seconds / 2,
                                                 repeats=args.repeats)
            print(f"  {name} B={batch}: {raw[f'{name} B={batch}']['chars_per_s']:.0f} char/s", flush=True)

    servers = [
        Server("empty Predict (gRPC ceiling)", ["--model", str(empty_art)]),
        Server("onnx, batching off", ["--model", str(main_art), "--backend", "onnx", "--no-batching"]),
        Server("onnx, batching on", ["--model", str(main_art), "--backend", "onnx"]),
        Server("torchscript, batching off", ["--model", str(main_art), "--backend", "torchscript", "--no-batching"]),
        Server("torchscript, batching on", ["--model", str(main_art), "--backend", "torchscript"]),
    ]
    if args.servers:
        wanted = [w for w in args.servers.split(",") if w]
        servers = [s for s in servers if any(w in s.name for w in wanted)]
    results: list[Result] = []
    try:
        for i, s in enumerate(servers):
            s.start(metrics_port=19100 + i + (os.getpid() % 500) * 10)
        plan: list[tuple[Server, str, int, int, int]] = []
        for s in servers:
            chars = 1 if s.empty else TEXT_CHARS
            for c in concs:
                plan.append((s, "single", 1, chars, c))
            if not s.empty:
                plan.append((s, "job", JOB_TEXTS, TEXT_CHARS, JOB_CONCURRENCY))
        runs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(plan))}
        for rep in range(args.repeats):  # interleaved: noise hits every variant alike
            for i, (s, wl, texts, chars, c) in enumerate(plan):
                alphabet = "ab" if s.empty else VOCAB96[:-1]
                seconds = args.seconds * (3 if wl == "job" else 1)  # few, long requests
                runs[i].append(measure(s, wl, texts, chars, c, seconds, alphabet))
                r = runs[i][-1]
                print(f"  [{rep + 1}/{args.repeats}] {s.name:30s} {wl:6s} c={c:<3d} {r['rps']:8.1f} req/s "
                      f"p99 {r['p99']:7.1f} ms batch {r['mean_batch']:5.1f} cpu {r['cpu']:.2f}", flush=True)
        for i, (s, wl, texts, _chars, c) in enumerate(plan):
            results.append(summarise(s.name, wl, c, runs[i], texts))
    finally:
        for s in servers:
            s.stop()

    report = write_report(args, results, raw, gemm, peak, fpc, started, concs)
    print(report)
    return 0


def _row(r: Result) -> str:
    return (f"| {r.variant} | {r.workload} | {r.concurrency} | {r.requests_per_s:,.0f} | {r.texts_per_s:,.0f} | "
            f"{r.chars_per_s:,.0f} | {r.p50_ms:.1f} | {r.p90_ms:.1f} | {r.p99_ms:.1f} | {r.mean_batch:.1f} | "
            f"{r.loadgen_cpu:.2f} | {r.errors} |")


def write_report(args: argparse.Namespace, results: list[Result], raw: dict[str, dict[str, float]],
                 gemm: dict[str, float], peak: float, fpc: int, started: datetime, concs: list[int]) -> str:
    get = {(r.variant, r.workload, r.concurrency): r for r in results}
    lines = [
        f"Run {started:%Y-%m-%d %H:%M} UTC on {platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}; command: "
        f"`python bench/serving_bench.py {'--quick ' if args.quick else ''}--seconds {args.seconds} "
        f"--repeats {args.repeats} --concurrency {','.join(map(str, concs))}`. "
        f"Medians of {args.repeats} interleaved repeats of {args.seconds:g} s.",
        "",
        f"Model: V=96, E=64, H=256, 2-layer tanh RNN; {fpc:,} FLOP per character as defined "
        "(2 x multiply-adds of the input and recurrent projections; head amortised); the loop "
        f"graph executes {flop_per_char(96, 64, 256, 2, 'loop'):,} (layer 0's input projection "
        "is a table lookup there).",
        "",
    ]
    if raw or gemm:
        lines += model_core(raw, gemm, 96, MODEL["embed_dim"], MODEL["hidden_size"],
                            MODEL["num_layers"])[0]
    lines += ["", "| server | workload | conc. | req/s | texts/s | chars/s | p50 ms | p90 ms | p99 ms | "
              "mean batch | loadgen CPU (cores) | errors |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(r) for r in results]
    lines += ["", "Ratios (same run):", ""]
    for be in ("onnx", "torchscript"):
        on, off = get.get((f"{be}, batching on", "single", max(concs))), get.get((f"{be}, batching off", "single", max(concs)))
        job = get.get((f"{be}, batching on", "job", JOB_CONCURRENCY))
        raw_key = f"{'onnx (loop graph)' if be == 'onnx' else 'torchscript'} B={JOB_TEXTS}"
        if on and off:
            lines.append(f"- {be}, single texts at concurrency {max(concs)}: batching on / off throughput "
                         f"**{on.requests_per_s / off.requests_per_s:.2f}x**, p99 on / off "
                         f"**{on.p99_ms / off.p99_ms:.2f}x**")
        if job and raw_key in raw:
            lines.append(f"- {be}, batch-job requests ({JOB_TEXTS} x {TEXT_CHARS} chars): server / raw backend "
                         f"**{job.chars_per_s / raw[raw_key]['chars_per_s']:.2f}x**")
    (args.out / "serving_bench.json").write_text(json.dumps(
        {"results": [asdict(r) for r in results], "raw": raw, "gemm": gemm, "flop_per_char": fpc}, indent=1))
    plot(results, args.out / "serving_bench.png")
    text = "\n".join(lines) + "\n"
    (args.out / "serving_bench.md").write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
