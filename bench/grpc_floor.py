"""The floor: what grpc.aio itself costs on this machine, with no model and no nextchar code.

    python bench/grpc_floor.py --port 0 --infer-response resp.bin [--handoff]
        # prints "nextchar serving on 127.0.0.1:PORT" as `nextchar serve` does, then serves

A grpc.aio server on uvloop with nextchar serve's gRPC options, answering the two methods the
benchmarks drive:
  KServe ModelInfer   every request gets the bytes of --infer-response, a response nextchar
                      gave to the benchmark's request (bench/server_cpu.py --floor saves one),
                      so the answer on the wire is the same size; ModelReady says ready.
  nextchar.v1 Generate the first character (the prompt's last) in a message as soon as the
                      handler runs, then the other max_chars - 1 in one last message.
Nothing else runs: no batcher, no model, no validation, metrics, request ids or tracing.

With --handoff, ModelInfer also does what any batching server on asyncio must: the call waits
on a future; once per loop pass the waiting calls go to a worker thread as one batch; the
thread (doing no compute) hands the batch back with one call_soon_threadsafe, and the loop
resolves the futures. Two worker threads, as nextchar has on 2 cores. Its CPU per call less
the plain floor's is what that hand-off costs, whatever the server does besides.
bench/server_cpu.py --floor measures its CPU per call under the peer benchmark's load and
bench/generate_bench.py's `floor` variant its time to the first character of 64 streams: what
any server built on grpc.aio pays on these cores before doing any work.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from nextchar.kserve import grpc_predict_v2_pb2 as kpb
from nextchar.v1 import nextchar_pb2 as pb


def _identity(b: bytes) -> bytes:
    return b


class Floor:
    def __init__(self, infer_response: bytes) -> None:
        self.infer_response = infer_response

    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self.infer_response  # the request is not even parsed

    async def model_ready(self, request: kpb.ModelReadyRequest,
                          context: grpc.aio.ServicerContext) -> kpb.ModelReadyResponse:
        return kpb.ModelReadyResponse(ready=True)

    async def generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        first = request.prompt[-1:] or " "
        yield pb.GenerateResponse(text=first)
        if request.max_chars > 1:
            yield pb.GenerateResponse(text=first * (request.max_chars - 1),
                                      stop_reason=pb.STOP_REASON_MAX_CHARS)

    async def get_model_info(self, request: pb.GetModelInfoRequest,
                             context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(name="floor")


class HandoffFloor(Floor):
    """ModelInfer through a batch hand-off to a worker thread and back (--handoff)."""

    def __init__(self, infer_response: bytes) -> None:
        super().__init__(infer_response)
        self.pending: list[asyncio.Future[bytes]] = []
        self.workers = ThreadPoolExecutor(2, thread_name_prefix="floor-worker")

    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.pending:  # the first call of this loop pass schedules the batch
            loop.call_soon(self._flush, loop)
        self.pending.append(fut)
        return await fut

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self.pending = self.pending, []
        self.workers.submit(loop.call_soon_threadsafe, self._resolve, batch)

    def _resolve(self, batch: list[asyncio.Future[bytes]]) -> None:
        for fut in batch:
            if not fut.done():
                fut.set_result(self.infer_response)


def handlers(floor: Floor) -> list[grpc.GenericRpcHandler]:
    kserve = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            floor.model_infer, request_deserializer=_identity, response_serializer=_identity),
        "ModelReady": grpc.unary_unary_rpc_method_handler(
            floor.model_ready, request_deserializer=kpb.ModelReadyRequest.FromString,
            response_serializer=kpb.ModelReadyResponse.SerializeToString),
    })
    v1 = grpc.method_handlers_generic_handler("nextchar.v1.NextChar", {
        "Generate": grpc.unary_stream_rpc_method_handler(
            floor.generate, request_deserializer=pb.GenerateRequest.FromString,
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            floor.get_model_info, request_deserializer=pb.GetModelInfoRequest.FromString,
            response_serializer=pb.GetModelInfoResponse.SerializeToString),
    })
    return [kserve, v1]


async def serve(host: str, port: int, floor: Floor) -> None:
    # nextchar serve's options (server/app.py), so the transport is configured alike.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.http2.bdp_probe", 0),
                                      ("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20)])
    server.add_generic_rpc_handlers(handlers(floor))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"nextchar serving on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    import uvloop  # nextchar serve's default loop (server/cli.py); in the [serve] extra

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--infer-response", type=Path,
                    help="serialized ModelInferResponse to answer ModelInfer with (default: empty)")
    ap.add_argument("--handoff", action="store_true",
                    help="ModelInfer waits for a worker thread, in batches (see the docstring)")
    args = ap.parse_args()
    response = args.infer_response.read_bytes() if args.infer_response else b""
    uvloop.run(serve(args.host, args.port,
                     (HandoffFloor if args.handoff else Floor)(response)))


if __name__ == "__main__":
    main()
