"""The model core alone: ONNX Runtime on an artifact's graphs, one CPU thread, no server.

    .venv/bin/python bench/graph_bench.py                      # builds the peer-bench model
    .venv/bin/python bench/graph_bench.py --artifact A --artifact B   # compare artifacts

For each artifact and graph (model.onnx, and model_loop.onnx when present) and each batch size:
the median wall time of one session.run over --runs runs of T-character texts (all outputs the
server fetches for a plain Predict: logits and state_out), as characters per second. The
session is set up as the server sets it up (server/backends/onnx.py): one intra-op thread,
spinning off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from peer_bench import peer_artifact


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def time_graph(sess: ort.InferenceSession, batch: int, chars: int, state_layers: int,
               hidden: int, vocab: int, runs: int) -> float:
    """Median seconds of one call."""
    rng = np.random.default_rng(0)
    feeds = {"ids": rng.integers(0, vocab, (batch, chars), dtype=np.int64),
             "lengths": np.full(batch, chars, dtype=np.int64),
             "state": np.zeros((state_layers, batch, hidden), dtype=np.float32)}
    if "positions" in {i.name for i in sess.get_inputs()}:
        feeds["positions"] = np.array(False)
    sess.run(["logits", "state_out"], feeds)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(["logits", "state_out"], feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, action="append",
                    help="artifact directory (repeatable); default: runs/peer_bench/artifact, "
                         "built like bench/peer_bench.py builds it")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--chars", type=int, default=64)
    ap.add_argument("--runs", type=int, default=40)
    args = ap.parse_args()
    artifacts = args.artifact or [peer_artifact()]

    print("| artifact | graph | " + " | ".join(f"B={b} char/s" for b in args.batch) + " |")
    print("|---|---|" + "---|" * len(args.batch))
    for art in artifacts:
        m = json.loads((art / "manifest.json").read_text(encoding="utf-8"))
        cfg = m["model"]
        for graph in ("model.onnx", "model_loop.onnx"):
            if not (art / graph).is_file():
                continue
            sess = session(art / graph)
            cells = []
            for b in args.batch:
                s = time_graph(sess, b, args.chars, m["state_layers"], cfg["hidden_size"],
                               len(m["vocab"]), args.runs)
                cells.append(f"{b * args.chars / s:,.0f}")
            print(f"| {art} | {graph} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
