"""Raw backend throughput on CUDA vs CPU for the benchmark model; part of scripts/gpu_check.sh.

    python bench/gpu_bench.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import serving_bench as sb  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    import torch

    art, _ = sb.build_artifacts(REPO / "runs" / "bench")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if len(devices) == 1:
        print("no CUDA device: GPU benchmark skipped")
    print(f"{'backend':28s} {'device':6s} {'batch':>6s} {'char/s':>12s}")
    for backend, graph in (("onnx", "standard"), ("onnx", "loop"), ("torchscript", "auto")):
        for device in devices:
            for batch in (1, 64, 1024):
                try:
                    r = bench_one(str(art), backend, graph, device, batch, args.seconds)
                except Exception as e:  # e.g. onnxruntime without the CUDA provider
                    print(f"{backend + ' ' + graph:28s} {device:6s} {batch:6d} unavailable: {e}")
                    break
                print(f"{backend + ' ' + graph:28s} {device:6s} {batch:6d} {r:12,.0f}", flush=True)
    return 0


def bench_one(artifact: str, backend: str, graph: str, device: str, batch: int, seconds: float) -> float:
    import numpy as np

    from nextchar.server.artifact import load_artifact
    from nextchar.server.backends import create_backend

    art = load_artifact(artifact, backends=(backend,))
    be = create_backend(art, backend, device, onnx_graph=graph)
    pool = be.make_executor()
    if hasattr(be, "prepare"):
        pool.submit(be.prepare).result()
    ids = np.random.default_rng(0).integers(0, art.vocab_size, (batch, sb.TEXT_CHARS), dtype=np.int64)
    lengths = np.full(batch, sb.TEXT_CHARS, dtype=np.int64)
    state = be.zero_state(batch)

    def loop() -> float:
        be.run(ids, lengths, state)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            be.run(ids, lengths, state)
            n += 1
        return n * batch * sb.TEXT_CHARS / (time.perf_counter() - t0)

    rate = pool.submit(loop).result()
    pool.shutdown()
    return rate


if __name__ == "__main__":
    sys.exit(main())
