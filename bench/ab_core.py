"""A/B of the serving core: this checkout's server against the code of an earlier commit, on the
same machine, model, requests and load generator, interleaved (issue 13's "no regression").

    python bench/ab_core.py --base 3d21864^ --repeats 3 --out docs/ab_core.json   # `make bench-ab`

The base commit's server runs from a package tree exported with `git archive` and put first on
PYTHONPATH (the editable install's finder comes after the path), so both servers use this
venv's libraries and differ only in nextchar's own code. Workloads, each at several
concurrencies: nextchar.v1 Predict of one 64-character text (`make bench`'s single-text
workload), the batch-job request (256 x 64 characters, concurrency 4), and KServe V2
ModelInfer of one text (`make bench-peer`'s load), and 64 Generate streams of 200 characters
started together (`make bench-generate`'s load: chars/s and time to the first character), all
on the peer benchmark's model and loop graph. Each repeat starts both servers afresh, in alternating order; the report gives medians
and the new/old ratio per row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path

import grpc
import numpy as np
from peer_bench import VOCAB, Server, free_port, make_payloads, peer_artifact

from nextchar.v1 import nextchar_pb2 as pb

# nextchar serve's HTTP front end defaults to port 8000: servers this script starts pick a free
# one, so they never collide with each other or with a server already on 8000.
os.environ.setdefault("NEXTCHAR_HTTP_PORT", "0")

REPO = Path(__file__).resolve().parents[1]
PREDICT = "/nextchar.v1.NextChar/Predict"
INFER = "/inference.GRPCInferenceService/ModelInfer"
# (name, method, texts per request, concurrencies)
WORKLOADS = [("v1 Predict, 1 text", PREDICT, 1, (1, 8, 64)),
             ("v1 Predict, batch job 256 texts", PREDICT, 256, (4,)),
             ("KServe ModelInfer, 1 text", INFER, 1, (1, 8, 64))]
# The old tree's folders -> where they sit in the `nextchar` package.
LAYOUT = {"proto/nextchar": "", "server": "server", "client": "client", "training": "training"}


def export_base(commit: str, dest: Path) -> Path:
    """nextchar's package as of `commit`, assembled like the wheel: dest/nextchar/..."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, *LAYOUT],
                             check=True, capture_output=True).stdout
    src = dest / "src"
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(src, filter="data")
    pkg = dest / "pkg" / "nextchar"
    for folder, sub in LAYOUT.items():
        shutil.copytree(src / folder, pkg / sub if sub else pkg, dirs_exist_ok=True)
    return dest / "pkg"


def predict_payloads(texts: int, n: int = 64, chars: int = 64) -> list[bytes]:
    rng = np.random.default_rng(0)
    alphabet = list(VOCAB[1:])
    return [pb.PredictRequest(texts=["".join(rng.choice(alphabet, size=chars))
                                     for _ in range(texts)]).SerializeToString()
            for _ in range(n)]


async def closed_loop(address: str, method: str, payloads: list[bytes], concurrency: int,
                      seconds: float) -> dict[str, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method)
        await call(payloads[0], timeout=30)
        latencies: list[float] = []
        errors = 0
        started = time.perf_counter()
        stop_at = started + seconds

        async def worker(i: int) -> None:
            nonlocal errors
            j = i
            while (t0 := time.perf_counter()) < stop_at:
                try:
                    await call(payloads[j % len(payloads)], timeout=30)
                    latencies.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError:
                    errors += 1
                j += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1e3
    return {"rps": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": errors}


async def generate_load(address: str, streams: int = 64, chars: int = 200) -> dict[str, float]:
    """`streams` Generate calls started together; chars/s over all, first-character p50/p99."""
    rng = np.random.default_rng(2)
    alphabet = list(VOCAB[1:])
    prompts = ["".join(rng.choice(alphabet, size=int(rng.integers(29, 44)))) for _ in range(streams)]
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_stream("/nextchar.v1.NextChar/Generate",
                                    request_serializer=pb.GenerateRequest.SerializeToString,
                                    response_deserializer=pb.GenerateResponse.FromString)
        firsts: list[float] = []

        async def one(i: int) -> int:
            t0 = time.perf_counter()
            n = 0
            async for r in call(pb.GenerateRequest(prompt=prompts[i], max_chars=chars, seed=i),
                                timeout=120):
                if r.text and n == 0:
                    firsts.append(time.perf_counter() - t0)
                n += len(r.text)
            return n

        await asyncio.gather(*(one(i) for i in range(8)))  # warm-up
        firsts.clear()
        started = time.perf_counter()
        total = sum(await asyncio.gather(*(one(i) for i in range(streams))))
        wall = time.perf_counter() - started
    first_ms = np.array(firsts) * 1e3
    return {"rps": total / wall, "p50_ms": float(np.percentile(first_ms, 50)),
            "p99_ms": float(np.percentile(first_ms, 99)), "errors": streams - len(firsts)}


def start(variant: str, artifact: Path, workdir: Path, base_path: Path) -> Server:
    port = free_port()
    env = dict(os.environ)
    if variant == "old":
        env["PYTHONPATH"] = str(base_path)
    argv = [sys.executable, "-m", "nextchar", "serve", "--model", str(artifact), "--host",
            "127.0.0.1", "--port", str(port), "--log-level", "WARNING"]
    server = Server(f"nextchar ({variant})", argv, port, workdir, workdir / f"{variant}.log", env)
    server.wait_ready("peer-rnn")
    return server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the commit to compare against (git rev)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--generate-only", action="store_true",
                   help="only the Generate workload (the first character's latency)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "ab_core.json")
    args = p.parse_args(argv)
    workloads = [] if args.generate_only else WORKLOADS
    base = subprocess.run(["git", "-C", str(REPO), "rev-parse", args.base], check=True,
                          capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "server"],
                                capture_output=True, text=True).stdout.strip())
    artifact = peer_artifact()
    samples: dict[str, dict[str, list[dict[str, float]]]] = {"old": {}, "new": {}}
    payloads = {PREDICT: {t: predict_payloads(t) for _, m, t, _ in WORKLOADS if m == PREDICT},
                INFER: {1: make_payloads("peer-rnn")}}
    with tempfile.TemporaryDirectory(prefix="nextchar-ab-") as tmp:
        workdir = Path(tmp)
        base_path = export_base(base, workdir / "base")
        for rep in range(args.repeats):
            for variant in (("old", "new") if rep % 2 == 0 else ("new", "old")):
                server = start(variant, artifact, workdir, base_path)
                try:
                    for _ in range(2):  # two rounds of 64 streams per start
                        g = asyncio.run(generate_load(server.address))
                        g["loadavg_1m"] = os.getloadavg()[0]
                        key = "Generate, 64 streams x 200 chars (rps = chars/s; p50/p99 = first char)"
                        samples[variant].setdefault(key, []).append(g)
                        print(f"rep {rep + 1} {variant:>3} generate {g['rps']:>8.0f} chars/s first "
                              f"char p50 {g['p50_ms']:6.1f} p99 {g['p99_ms']:6.1f} ms", flush=True)
                    for name, method, texts, concurrencies in workloads:
                        for c in concurrencies:
                            asyncio.run(closed_loop(server.address, method,
                                                    payloads[method][texts], c, 1.0))  # warm-up
                            s = asyncio.run(closed_loop(server.address, method,
                                                        payloads[method][texts], c, args.seconds))
                            s["loadavg_1m"] = os.getloadavg()[0]
                            key = f"{name} | c={c}"
                            samples[variant].setdefault(key, []).append(s)
                            print(f"rep {rep + 1} {variant:>3} {key:<40} {s['rps']:>8.1f} req/s "
                                  f"p50 {s['p50_ms']:6.2f} p99 {s['p99_ms']:7.2f} ms", flush=True)
                finally:
                    server.stop()
    rows = []
    for key in samples["new"]:
        med = {v: {m: statistics.median(s[m] for s in samples[v][key])
                   for m in ("rps", "p50_ms", "p99_ms")} for v in ("old", "new")}
        rows.append({"workload": key, "old": med["old"], "new": med["new"],
                     "rps_ratio": round(med["new"]["rps"] / med["old"]["rps"], 3),
                     "p99_ratio": round(med["new"]["p99_ms"] / med["old"]["p99_ms"], 3)})
    result = {"command": " ".join([sys.executable, *sys.argv]), "date": datetime.now(timezone.utc)
              .isoformat(timespec="seconds"), "machine": f"{platform.node()} {os.cpu_count()} cores",
              "base_commit": base, "head_commit": head, "head_dirty_server": dirty,
              "repeats": args.repeats, "seconds": args.seconds, "rows": rows, "samples": samples}
    args.out.write_text(json.dumps(result, indent=1))
    print("\n| workload | old req/s | new req/s | new/old | old p99 ms | new p99 ms | new/old |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['old']['rps']:.0f} | {r['new']['rps']:.0f} | "
              f"{r['rps_ratio']:.2f} | {r['old']['p99_ms']:.2f} | {r['new']['p99_ms']:.2f} | "
              f"{r['p99_ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
