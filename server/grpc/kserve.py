"""KServe V2 / Open Inference Protocol (`inference.GRPCInferenceService`) on the nextchar port.

A thin layer: V2 tensors in -> the same Predictor, validation and batcher as nextchar.v1 ->
V2 tensors out. Tensor names, shapes and datatypes are documented in docs/kserve.md:

    inputs   text BYTES [N] or [N, 1]  |  ids INT64 [N, T] (+ lengths INT64 [N], optional)
    params   top_k (int64_param; 0 or absent = the server default)
    outputs  probs FP32 [N, V], top_ids INT64 [N, k], top_chars BYTES [N, k], top_probs FP32 [N, k]

Typed `contents` and `raw_input_contents` are both accepted; a request that sent raw inputs gets
`raw_output_contents` back (as Triton answers, and what tritonclient reads). Readiness is the
nextchar.v1 servicer's own flag, so both protocols turn ready and unready together. The model
name is the artifact's manifest name, the version its manifest version.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from nextchar import __version__
from nextchar.kserve import grpc_predict_v2_pb2 as pb
from nextchar.kserve import grpc_predict_v2_pb2_grpc as pb_grpc

from .artifact import Artifact
from .batcher import TextResult
from .errors import InvalidInput, NotFound, NotReady, ServingError
from .servicer import NextCharServicer, deadline_of

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "nextchar"
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}  # Triton's names
OUTPUTS = ("probs", "top_ids", "top_chars", "top_probs")
STREAM_WINDOW = 256  # requests of one ModelStreamInfer stream in flight at once

# V2 raw contents are little-endian.
_DTYPES: dict[str, np.dtype[Any]] = {"INT64": np.dtype("<i8"), "FP32": np.dtype("<f4")}


@dataclass
class Tensor:
    """One output tensor: numbers as an ndarray, BYTES as a flat list of bytes."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]


# -- request decoding ------------------------------------------------------------------------


def _unpack_bytes(raw: bytes, name: str) -> list[bytes]:
    """V2 raw BYTES: each element is a 4-byte little-endian length, then that many bytes."""
    out: list[bytes] = []
    pos, end = 0, len(raw)
    while pos < end:
        if pos + 4 > end:
            raise InvalidInput(f"input '{name}': raw BYTES content is truncated at byte {pos} "
                               f"(each element is a 4-byte little-endian length, then the bytes)")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > end:
            raise InvalidInput(f"input '{name}': raw BYTES element {len(out)} claims {size} "
                               f"bytes but only {end - pos} remain")
        out.append(raw[pos : pos + size])
        pos += size
    return out


def _pack_bytes(items: Iterable[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _decode_tensor(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, want: str
) -> np.ndarray | list[bytes]:
    """One input's elements (flat), checked against its declared datatype and shape."""
    name = tensor.name
    if tensor.datatype != want:
        raise InvalidInput(f"input '{name}' must have datatype {want}, got "
                           f"'{tensor.datatype}' (see docs/kserve.md)")
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input '{name}': shape {shape} has a negative dimension")
    count = math.prod(shape)
    values: np.ndarray | list[bytes]
    if want == "BYTES":
        values = _unpack_bytes(raw, name) if raw is not None else list(tensor.contents.bytes_contents)
        where = "raw_input_contents" if raw is not None else "contents.bytes_contents"
    else:
        dtype = _DTYPES[want]
        if raw is not None:
            if len(raw) % dtype.itemsize:
                raise InvalidInput(f"input '{name}': raw content of {len(raw)} bytes is not a "
                                   f"whole number of {want} elements ({dtype.itemsize} bytes each)")
            values = np.frombuffer(raw, dtype=dtype)
            where = "raw_input_contents"
        else:
            values = np.asarray(tensor.contents.int64_contents, dtype=np.int64)
            where = "contents.int64_contents"
    if len(values) != count:
        raise InvalidInput(f"input '{name}': shape {shape} needs {count} {want} elements, "
                           f"{where} holds {len(values)}")
    return values


def _decode_inputs(request: pb.ModelInferRequest) -> dict[str, Any]:
    """{'texts': [...]} or {'ids': (N, T) int64, 'lengths': (N,) int64}."""
    inputs = request.inputs
    raw = request.raw_input_contents
    if raw:
        if len(raw) != len(inputs):
            raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(inputs)} "
                               f"inputs: send one per input, in the order of 'inputs'")
        if any(t.HasField("contents") for t in inputs):
            raise InvalidInput("an input has 'contents' while raw_input_contents is used: "
                               "send every input one way or the other, not both")
    by_name: dict[str, int] = {}
    for i, t in enumerate(inputs):
        if t.name not in ("text", "ids", "lengths"):
            raise InvalidInput(f"unknown input '{t.name}': this model takes 'text' (BYTES [N]) "
                               f"or 'ids' (INT64 [N, T]) with 'lengths' (INT64 [N])")
        if t.name in by_name:
            raise InvalidInput(f"input '{t.name}' is given twice")
        by_name[t.name] = i

    def decode(name: str, want: str) -> tuple[np.ndarray | list[bytes], list[int]]:
        i = by_name[name]
        return _decode_tensor(inputs[i], raw[i] if raw else None, want), list(inputs[i].shape)

    if "text" in by_name:
        if len(by_name) > 1:
            raise InvalidInput("send either 'text' or 'ids' (+ 'lengths'), not both")
        values, shape = decode("text", "BYTES")
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            raise InvalidInput(f"input 'text' must have shape [N] or [N, 1] (one text per row), "
                               f"got {shape}")
        texts = []
        for i, b in enumerate(values):
            try:
                texts.append(bytes(b).decode("utf-8"))
            except UnicodeDecodeError as e:
                raise InvalidInput(f"text[{i}] is not valid UTF-8: {e.reason} at byte "
                                   f"{e.start}") from e
        return {"texts": texts}
    if "ids" not in by_name:
        if "lengths" in by_name:
            raise InvalidInput("'lengths' needs an 'ids' input (INT64 [N, T]) beside it")
        raise InvalidInput("no inputs: send 'text' (BYTES [N]) or 'ids' (INT64 [N, T]) with "
                           "'lengths' (INT64 [N]); see docs/kserve.md")
    flat, shape = decode("ids", "INT64")
    if len(shape) != 2 or shape[1] < 1:
        raise InvalidInput(f"input 'ids' must have shape [N, T] with T >= 1, got {shape}")
    ids = np.asarray(flat, dtype=np.int64).reshape(shape)
    if "lengths" in by_name:
        lengths_flat, lshape = decode("lengths", "INT64")
        lengths = np.asarray(lengths_flat, dtype=np.int64).reshape(lshape)
    else:  # every row is full width
        lengths = np.full(shape[0], shape[1], dtype=np.int64)
    return {"ids": ids, "lengths": lengths}


def _top_k(parameters: Any) -> int:
    if "top_k" not in parameters:
        return 0
    p = parameters["top_k"]
    kind = p.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidInput(f"parameter top_k must be an integer (int64_param), got {kind}")
    return int(getattr(p, kind))


def _requested_outputs(request: pb.ModelInferRequest) -> list[str]:
    if not request.outputs:
        return list(OUTPUTS)
    names: list[str] = []
    for out in request.outputs:
        if out.name not in OUTPUTS:
            raise InvalidInput(f"unknown output '{out.name}': this model has "
                               f"{', '.join(OUTPUTS)}")
        if out.name in names:
            raise InvalidInput(f"output '{out.name}' is requested twice")
        if "classification" in out.parameters:
            raise InvalidInput("the classification extension is not supported: request "
                               "top_chars / top_probs and set the top_k parameter")
        names.append(out.name)
    return names


# -- response encoding -----------------------------------------------------------------------


def _output_tensors(
    wanted: Sequence[str], results: list[TextResult], k: int, vocab: list[str]
) -> list[Tensor]:
    n = len(results)
    if n == 1:  # the common one-text call: views, no stacking
        r = results[0]
        ranked_ids, ranked_probs = r.top_ids[None, :k], r.top_probs[None, :k]
    else:
        ranked_ids = np.stack([r.top_ids[:k] for r in results])
        ranked_probs = np.stack([r.top_probs[:k] for r in results])
    tensors = []
    for name in wanted:
        if name == "probs":
            probs = (results[0].probs[None] if n == 1  # type: ignore[index]
                     else np.stack([r.probs for r in results]))  # type: ignore[misc]
            tensors.append(Tensor(name, "FP32", [n, len(vocab)], probs))
        elif name == "top_ids":
            tensors.append(Tensor(name, "INT64", [n, k], ranked_ids))
        elif name == "top_probs":
            tensors.append(Tensor(name, "FP32", [n, k], ranked_probs))
        else:
            chars = [vocab[i].encode("utf-8") for i in ranked_ids.ravel().tolist()]
            tensors.append(Tensor(name, "BYTES", [n, k], chars))
    return tensors


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# InferTensorContents.fp32_contents is a packed repeated float: on the wire, its tag, a length
# and the little-endian floats themselves. Merging those bytes fills the field without a Python
# float per element (tolist + extend cost ~3x as much for the 84-float `probs` row, measured).
_FP32_TAG = _varint(pb.InferTensorContents.DESCRIPTOR.fields_by_name["fp32_contents"].number
                    << 3 | 2)


def _encode_response(response: pb.ModelInferResponse, tensors: list[Tensor], raw: bool) -> None:
    for t in tensors:
        out = response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        if isinstance(t.data, list):  # BYTES
            if raw:
                response.raw_output_contents.append(_pack_bytes(t.data))
            else:
                out.contents.bytes_contents.extend(t.data)
        elif raw:
            response.raw_output_contents.append(
                np.ascontiguousarray(t.data, dtype=_DTYPES[t.datatype]).tobytes())
        elif t.datatype == "FP32":
            data = np.ascontiguousarray(t.data, dtype="<f4").tobytes()
            out.contents.MergeFromString(_FP32_TAG + _varint(len(data)) + data)
        else:
            out.contents.int64_contents.extend(t.data.ravel().tolist())


# -- the servicer ----------------------------------------------------------------------------


def _check_model(a: Artifact, name: str, version: str) -> None:
    if not name:
        raise InvalidInput(f"model name is required (this server serves '{a.name}')")
    if name != a.name:
        raise NotFound(f"model '{name}' is not served here; this server serves '{a.name}'")
    if version and version != a.version:
        raise NotFound(f"model '{name}' has no version '{version}'; this server serves "
                       f"version '{a.version}'")


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Reads the predictor and the ready flag from the nextchar.v1 servicer on every call, so a
    model reload or a drain there applies here at the same moment."""

    def __init__(self, v1: NextCharServicer) -> None:
        self.v1 = v1

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.v1.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        _check_model(self.v1.predictor.artifact, request.name, request.version)
        return pb.ModelReadyResponse(ready=self.v1.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        predictor = self.v1.predictor
        a = predictor.artifact
        _check_model(a, request.name, request.version)
        backend = predictor.backend.name
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=a.name,
            versions=[a.version],
            platform=PLATFORMS.get(backend, backend),
            inputs=[meta(name="text", datatype="BYTES", shape=[-1]),
                    meta(name="ids", datatype="INT64", shape=[-1, -1]),
                    meta(name="lengths", datatype="INT64", shape=[-1])],
            outputs=[meta(name="probs", datatype="FP32", shape=[-1, a.vocab_size]),
                     meta(name="top_ids", datatype="INT64", shape=[-1, -1]),
                     meta(name="top_chars", datatype="BYTES", shape=[-1, -1]),
                     meta(name="top_probs", datatype="FP32", shape=[-1, -1])],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return await self._infer(request, deadline_of(context))

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        if not self.v1.ready:
            raise NotReady("server is not ready (starting up or shutting down); retry shortly")
        predictor = self.v1.predictor  # one read: a reload mid-request cannot mix two models
        a = predictor.artifact
        _check_model(a, request.model_name, request.model_version)
        k = predictor.resolve_top_k(_top_k(request.parameters))
        wanted = _requested_outputs(request)
        inputs = _decode_inputs(request)
        if "texts" in inputs:
            rows = predictor.encode_texts(inputs["texts"])
        else:
            rows = predictor.check_ids(inputs["ids"], inputs["lengths"])
        results = await predictor.predict_ids(rows, k, deadline, want_probs="probs" in wanted)
        response = pb.ModelInferResponse(model_name=a.name, model_version=a.version, id=request.id)
        _encode_response(response, _output_tensors(wanted, results, k, a.vocab),
                         raw=bool(request.raw_input_contents))
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream run concurrently (so they batch together); responses come
        back in request order, one per request; a failed request is answered in-band with
        error_message '<STATUS_CODE>: <message>' and the stream goes on."""
        deadline = deadline_of(context)
        window: asyncio.Queue[asyncio.Task[pb.ModelStreamInferResponse] | None] = asyncio.Queue(
            STREAM_WINDOW)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.put(asyncio.ensure_future(self._stream_one(request, deadline)))
            finally:
                await window.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await window.get()) is not None:
                yield await task
            await reader  # surfaces a failed read
        finally:
            reader.cancel()
            while not window.empty():
                leftover = window.get_nowait()
                if leftover is not None:
                    leftover.cancel()

    async def _stream_one(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelStreamInferResponse:
        try:
            return pb.ModelStreamInferResponse(infer_response=await self._infer(request, deadline))
        except ServingError as e:
            message = f"{e.code.name}: {e.message}"
        except Exception:
            log.exception("unhandled error in ModelStreamInfer")
            message = "INTERNAL: internal server error (logged on the server)"
        echo = pb.ModelInferResponse(model_name=request.model_name,
                                     model_version=request.model_version, id=request.id)
        return pb.ModelStreamInferResponse(error_message=message, infer_response=echo)


def add_kserve_to_server(v1: NextCharServicer, server: grpc.aio.Server) -> KServeServicer:
    """Registers inference.GRPCInferenceService beside nextchar.v1 on the same server."""
    servicer = KServeServicer(v1)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return servicer
