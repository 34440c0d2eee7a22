"""KServe V2 gRPC tensors <-> domain values (docs/kserve.md); the servicer is kserve.py, the
parts shared with the REST front end ../v2_tensors.py.

    inputs   text BYTES [N] or [N, 1]  |  ids INT64 [N, T] (+ lengths INT64 [N] or [N, 1], optional)
    params   top_k (int64_param; 0 or absent = the model default), priority (int64: 1 high,
             2 low; Triton's convention that a lower number is more urgent)
    outputs  probs FP32 [N, V], top_ids INT64 [N, k], top_chars BYTES [N, k], top_probs FP32 [N, k]

Typed `contents` and `raw_input_contents` are both accepted; a request that sent raw inputs gets
`raw_output_contents` back (as Triton answers, and what tritonclient reads).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nextchar.kserve import grpc_predict_v2_pb2 as pb

from ..errors import InvalidInput
from ..v2_tensors import DTYPES as _DTYPES
from ..v2_tensors import (
    OUTPUTS,
    Tensor,
    check_shape,
    lane_of_priority,
    output_tensors,
    refuse_shared_memory,
)
from ..v2_tensors import pack_bytes as _pack_bytes
from ..v2_tensors import unpack_bytes as _unpack_bytes

__all__ = ["OUTPUTS", "Tensor", "decode_inputs", "encode_response", "lane_of", "output_tensors",
           "requested_outputs", "timeout_of", "top_k_of"]


# -- request decoding ------------------------------------------------------------------------


def _decode_tensor(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, want: str, max_texts: int
) -> np.ndarray | list[bytes]:
    """One input's elements (flat), checked against its declared datatype and shape."""
    name = tensor.name
    refuse_shared_memory(tensor.parameters, f"input '{name}'")
    if tensor.datatype != want:
        raise InvalidInput(f"input '{name}' must have datatype {want}, got "
                           f"'{tensor.datatype}' (see docs/kserve.md)")
    shape = list(tensor.shape)
    count = check_shape(name, shape, max_texts)
    values: np.ndarray | list[bytes]
    if want == "BYTES":
        values = (_unpack_bytes(raw, name, count, shape) if raw is not None
                  else list(tensor.contents.bytes_contents))
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


def decode_inputs(request: pb.ModelInferRequest, max_texts: int) -> dict[str, Any]:
    """{'texts': [...]} or {'ids': (N, T) int64, 'lengths': (N,) int64}.

    The row count is checked against max_texts from the declared shape, before any element is
    decoded: an oversized request costs no decoding."""
    inputs = request.inputs
    for t in inputs:
        if t.shape and t.shape[0] > max_texts:
            raise InvalidInput(f"too many texts: {t.shape[0]} > max_texts_per_request "
                               f"{max_texts}; split the request")
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
        return (_decode_tensor(inputs[i], raw[i] if raw else None, want, max_texts),
                list(inputs[i].shape))

    if "text" in by_name:
        if len(by_name) > 1:
            raise InvalidInput("send either 'text' or 'ids' (+ 'lengths'), not both")
        values, shape = decode("text", "BYTES")
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
    ids = np.asarray(flat, dtype=np.int64).reshape(shape)
    if "lengths" in by_name:
        lengths_flat, lshape = decode("lengths", "INT64")
        lengths = np.asarray(lengths_flat, dtype=np.int64).reshape(lshape)
    else:  # every row is full width
        lengths = np.full(shape[0], shape[1], dtype=np.int64)
    return {"ids": ids, "lengths": lengths}


def _int_param(parameters: Any, name: str) -> int:
    if name not in parameters:
        return 0
    p = parameters[name]
    kind = p.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidInput(f"parameter {name} must be an integer (int64_param), got {kind}")
    return int(getattr(p, kind))


def top_k_of(parameters: Any) -> int:
    return _int_param(parameters, "top_k")


def timeout_of(parameters: Any) -> int:
    """V2 parameter `timeout`, microseconds (0: none); see v2_tensors.deadline_with_timeout."""
    return _int_param(parameters, "timeout")


def lane_of(parameters: Any) -> int:
    """V2 parameter `priority`: absent or 0 (default) and 1 are the high lane, 2 the low one."""
    return lane_of_priority(_int_param(parameters, "priority"))


# tritonclient's `async_stream_infer(..., enable_empty_final_response=True)` sends this and then
# reads `triton_final_response` on each response to know a request's responses are complete.
FINAL_RESPONSE_PARAM = "triton_enable_empty_final_response"


def final_response_wanted(parameters: Any, strict: bool = True) -> bool:
    """Whether the stream request asks for `triton_final_response` on its responses. Each
    request here gets exactly one response, so that response is the final one (Triton sends
    no extra empty response for a model that is not decoupled)."""
    if FINAL_RESPONSE_PARAM not in parameters:
        return False
    p = parameters[FINAL_RESPONSE_PARAM]
    if p.WhichOneof("parameter_choice") != "bool_param":
        if strict:
            raise InvalidInput(f"parameter {FINAL_RESPONSE_PARAM} must be a bool_param, got "
                               f"{p.WhichOneof('parameter_choice')}")
        return False
    return p.bool_param


def mark_final(response: pb.ModelInferResponse) -> None:
    response.parameters["triton_final_response"].bool_param = True


def requested_outputs(request: pb.ModelInferRequest) -> list[str]:
    if not request.outputs:
        return list(OUTPUTS)
    names: list[str] = []
    for out in request.outputs:
        if out.name not in OUTPUTS:
            raise InvalidInput(f"unknown output '{out.name}': this model has "
                               f"{', '.join(OUTPUTS)}")
        if out.name in names:
            raise InvalidInput(f"output '{out.name}' is requested twice")
        refuse_shared_memory(out.parameters, f"output '{out.name}'")
        if "classification" in out.parameters:
            raise InvalidInput("the classification extension is not supported: request "
                               "top_chars / top_probs and set the top_k parameter")
        names.append(out.name)
    return names


# -- response encoding -----------------------------------------------------------------------


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


def encode_response(response: pb.ModelInferResponse, tensors: list[Tensor], raw: bool) -> None:
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
