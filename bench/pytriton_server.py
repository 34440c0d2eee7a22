"""The Triton peer of the benchmark: NVIDIA PyTriton 0.7.0 (Triton 2.51's C++ gRPC front end and
dynamic batcher, its Python backend) serving a nextchar artifact's ONNX graph on ONNX Runtime.

    make pytriton-venv     # .venv-pytriton: nvidia-pytriton==0.7.0, numpy<2, tritonclient, ORT
    .venv-pytriton/bin/python bench/pytriton_server.py --artifact runs/peer_bench/artifact \
        --grpc-port 8001 --http-port 8000 --model peer-rnn:loop:1:64:2000
    .venv-pytriton/bin/python bench/pytriton_server.py --install-sitecustomize

Each --model NAME:GRAPH:INSTANCES:MAX_BATCH:DELAY_US binds one Triton model: GRAPH "loop"
(model_loop.onnx, positions=False) or "standard" (model.onnx), INSTANCES model instances (each
its own ONNX Runtime session on its own thread), MAX_BATCH the dynamic batcher's
max_batch_size (1 = batching off) and DELAY_US its max_queue_delay_microseconds. The tensors are
those of nextchar's KServe endpoint with Triton's batch axis in front: input text BYTES [N, 1];
outputs probs FP32 [N, V], top_ids INT64 [N, 5], top_chars BYTES [N, 5], top_probs FP32 [N, 5].
Metrics are off (nextchar's are off in the benchmark too). The model is bench/peer_model.py;
this process never imports nextchar.

Why the sitecustomize: on this machine's CPython 3.11.7, Triton's Python-backend stub fails at
model load with `'_thread.RLock' object has no attribute '_recursion_count'` (multiprocessing's
resource tracker, which PyTriton's shared-memory transport uses). A `sitecustomize.py` in the
venv that gives the tracker a pure-Python RLock (`threading._PyRLock`, which has that method)
makes it load and serve. --install-sitecustomize writes it; the Makefile and peer_bench.py call it.
"""

from __future__ import annotations

import argparse
import logging
import site
import sys
from pathlib import Path

SITECUSTOMIZE = '''\
# Written by bench/pytriton_server.py --install-sitecustomize (make pytriton-venv): Triton's
# Python-backend stub fails on CPython 3.11.7 with "'_thread.RLock' object has no attribute
# '_recursion_count'" in multiprocessing's resource tracker; its pure-Python RLock has it.
import threading as _threading

try:
    from multiprocessing import resource_tracker as _resource_tracker

    _resource_tracker._resource_tracker._lock = _threading._PyRLock()
except Exception:  # never break the interpreter's start for this
    pass
'''


def install_sitecustomize() -> Path:
    """Writes sitecustomize.py into this interpreter's site-packages (the PyTriton venv)."""
    path = Path(site.getsitepackages()[0]) / "sitecustomize.py"
    if not path.is_file() or path.read_text() != SITECUSTOMIZE:
        path.write_text(SITECUSTOMIZE)
    return path


def parse_model(spec: str) -> tuple[str, str, int, int, int]:
    name, graph, instances, max_batch, delay_us = spec.split(":")
    return name, graph, int(instances), int(max_batch), int(delay_us)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--install-sitecustomize", action="store_true")
    ap.add_argument("--artifact", type=Path)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--model", action="append", default=[], metavar="NAME:GRAPH:INST:MAXB:DELAY_US")
    args = ap.parse_args()
    if args.install_sitecustomize:
        print(f"wrote {install_sitecustomize()}")
        return 0
    if args.artifact is None or not args.model:
        ap.error("--artifact and at least one --model are needed")

    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peer_model import PeerModel

    logging.basicConfig(level=logging.WARNING)
    top_k = 5  # nextchar's default; the benchmark's requests send no top_k

    def make_infer(model: PeerModel):  # one per instance: its own session
        @batch
        def infer(text: np.ndarray) -> dict[str, np.ndarray]:
            texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in text[:, 0]]
            probs = model.probs(texts)  # (N, V)
            ids, top_probs = model.top(probs, top_k)  # (N, k)
            return {"probs": probs, "top_ids": ids, "top_chars": model.vocab_bytes[ids],
                    "top_probs": top_probs}
        return infer

    config = TritonConfig(grpc_port=args.grpc_port, http_port=args.http_port,
                          grpc_address="127.0.0.1", http_address="127.0.0.1",
                          allow_metrics=False, allow_gpu_metrics=False, allow_cpu_metrics=False,
                          log_verbose=0, exit_on_error=True)
    with Triton(config=config) as triton:
        for spec in args.model:
            name, graph, instances, max_batch, delay_us = parse_model(spec)
            models = [PeerModel(args.artifact, graph=graph) for _ in range(instances)]
            vocab = len(models[0].vocab)
            triton.bind(
                model_name=name,
                infer_func=[make_infer(m) for m in models],
                inputs=[Tensor(name="text", dtype=bytes, shape=(1,))],
                outputs=[Tensor(name="probs", dtype=np.float32, shape=(vocab,)),
                         Tensor(name="top_ids", dtype=np.int64, shape=(top_k,)),
                         Tensor(name="top_chars", dtype=bytes, shape=(top_k,)),
                         Tensor(name="top_probs", dtype=np.float32, shape=(top_k,))],
                config=ModelConfig(max_batch_size=max_batch, batcher=DynamicBatcher(
                    max_queue_delay_microseconds=delay_us)),
                strict=False,
            )
        print("pytriton serving", flush=True)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
