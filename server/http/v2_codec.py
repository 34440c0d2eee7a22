"""KServe V2 REST JSON (and Triton's binary-tensor extension) <-> domain values; the routes are
v2.py, the tensor names and shapes ../v2_tensors.py (the same as the gRPC endpoint's).

    {"id": "1", "parameters": {"top_k": 3, "priority": 2},
     "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["hello", "To b"]}],
     "outputs": [{"name": "top_chars"}, {"name": "top_probs"}]}

`data` is row-major, flat or nested; BYTES elements are JSON strings (UTF-8). Binary extension:
with an `Inference-Header-Content-Length: L` header the first L body bytes are the JSON and
each input with `parameters.binary_data_size` takes its bytes from what follows, in input
order (little-endian; BYTES as 4-byte length + bytes); an output asked for with
`parameters.binary_data: true` (or the request parameter `binary_data_output: true`) comes back
the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from ..errors import InvalidInput
from ..v2_tensors import (
    DTYPES,
    INPUTS,
    OUTPUTS,
    Tensor,
    check_shape,
    lane_of_priority,
    refuse_shared_memory,
    unpack_bytes,
)
from .errors import body_error

HEADER_LENGTH = "inference-header-content-length"


@dataclass
class InferRequest:
    id: str | None
    texts: list[str] | None = None
    ids: np.ndarray | None = None
    lengths: np.ndarray | None = None
    top_k: int = 0
    lane: int = 0
    timeout_us: int = 0  # parameter timeout: see v2_tensors.deadline_with_timeout
    wanted: list[str] = field(default_factory=list)
    binary: set[str] = field(default_factory=set)  # outputs to send as binary data


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be an integer, got {json.dumps(value)[:40]}")
    return value


def _flatten(data: Any, name: str) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(x, list) for x in data):
        return data
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                if len(stack) > 32:
                    raise InvalidInput(f"input '{name}': data is nested too deeply")
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _shape(t: dict[str, Any], name: str, max_texts: int) -> tuple[list[int], int]:
    """The declared shape and its element count (v2_tensors.check_shape)."""
    shape = t.get("shape")
    if not isinstance(shape, list) or not shape:
        raise InvalidInput(f"input '{name}': shape must be a non-empty list of integers")
    dims = [_int(d, f"input '{name}': shape element") for d in shape]
    return dims, check_shape(name, dims, max_texts)


def decode_request(body: bytes, header_length: str | None, max_texts: int) -> InferRequest:
    binary = b""
    if header_length is not None:
        # Digits only, as HTTP's Content-Length: int() would also take "1_3", " 13" and "+13".
        n = int(header_length) if header_length.isascii() and header_length.isdigit() else -1
        if not 0 <= n <= len(body):
            raise InvalidInput(f"Inference-Header-Content-Length {header_length!r} is not a "
                               f"length within the body ({len(body)} bytes)")
        body, binary = body[:n], body[n:]
    try:
        doc = orjson.loads(body)
    except ValueError as e:
        try:  # orjson's message for bad UTF-8 names neither the byte nor its place
            bytes(body).decode("utf-8")
        except UnicodeDecodeError as bad:
            raise InvalidInput(body_error(bad)) from None
        raise InvalidInput(f"the request body is not valid JSON: {e}") from None
    doc = _obj(doc, "the request body")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("id must be a string")
    params = _obj(doc.get("parameters") or {}, "parameters")
    req = InferRequest(request_id)
    if "top_k" in params:
        req.top_k = _int(params["top_k"], "parameter top_k")
    req.lane = lane_of_priority(_int(params.get("priority", 0), "parameter priority"))
    req.timeout_us = _int(params.get("timeout", 0), "parameter timeout")
    binary_out = params.get("binary_data_output", False)
    if not isinstance(binary_out, bool):
        raise InvalidInput("parameter binary_data_output must be true or false")
    req.wanted, req.binary = _outputs(doc.get("outputs"), binary_out)
    _inputs(doc.get("inputs"), binary, max_texts, req)
    return req


def _outputs(outputs: Any, binary_default: bool) -> tuple[list[str], set[str]]:
    if outputs is None or outputs == []:  # as gRPC's empty repeated field: every output
        return list(OUTPUTS), set(OUTPUTS) if binary_default else set()
    if not isinstance(outputs, list):
        raise InvalidInput("outputs must be a list of {\"name\": ...} objects")
    names: list[str] = []
    binary: set[str] = set()
    for o in outputs:
        o = _obj(o, "each output")
        name = o.get("name")
        if name not in OUTPUTS:
            raise InvalidInput(f"unknown output {json.dumps(name)[:40]}: this model has "
                               f"{', '.join(OUTPUTS)}")
        if name in names:
            raise InvalidInput(f"output '{name}' is requested twice")
        p = _obj(o.get("parameters") or {}, f"output '{name}' parameters")
        refuse_shared_memory(p, f"output '{name}'")
        if "classification" in p:
            raise InvalidInput("the classification extension is not supported: request "
                               "top_chars / top_probs and set the top_k parameter")
        b = p.get("binary_data", binary_default)
        if not isinstance(b, bool):
            raise InvalidInput(f"output '{name}': binary_data must be true or false")
        if b:
            binary.add(name)
        names.append(name)
    return names, binary


def _inputs(inputs: Any, binary: bytes, max_texts: int, req: InferRequest) -> None:
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("no inputs: send 'text' (BYTES [N]) or 'ids' (INT64 [N, T]) with "
                           "'lengths' (INT64 [N]); see docs/kserve.md")
    by_name: dict[str, tuple[list[Any] | np.ndarray, list[int]]] = {}
    pos = 0
    for t in inputs:
        t = _obj(t, "each input")
        name = t.get("name")
        if name not in INPUTS:
            raise InvalidInput(f"unknown input {json.dumps(name)[:40]}: this model takes "
                               f"'text' (BYTES [N]) or 'ids' (INT64 [N, T]) with 'lengths' "
                               f"(INT64 [N])")
        if name in by_name:
            raise InvalidInput(f"input '{name}' is given twice")
        want = "BYTES" if name == "text" else "INT64"
        if t.get("datatype") != want:
            raise InvalidInput(f"input '{name}' must have datatype {want}, got "
                               f"{json.dumps(t.get('datatype'))[:40]} (see docs/kserve.md)")
        shape, count = _shape(t, name, max_texts)
        p = _obj(t.get("parameters") or {}, f"input '{name}' parameters")
        refuse_shared_memory(p, f"input '{name}'")
        values: list[Any] | np.ndarray
        if "binary_data_size" in p:
            size = _int(p["binary_data_size"], f"input '{name}': binary_data_size")
            if size < 0 or pos + size > len(binary):
                raise InvalidInput(f"input '{name}': binary_data_size {size} runs past the "
                                   f"binary data ({len(binary) - pos} bytes left)")
            chunk = binary[pos : pos + size]
            pos += size
            if want == "BYTES":
                values = unpack_bytes(chunk, name, count, shape)
            else:
                if size % 8:
                    raise InvalidInput(f"input '{name}': {size} bytes are not a whole number "
                                       f"of INT64 elements")
                values = np.frombuffer(chunk, dtype=DTYPES["INT64"])
        else:
            if "data" not in t:
                raise InvalidInput(f"input '{name}' has no data")
            values = _flatten(t["data"], name)
        if len(values) != count:
            raise InvalidInput(f"input '{name}': shape {shape} needs {count} {want} elements, "
                               f"data holds {len(values)}")
        by_name[name] = (values, shape)
    if pos != len(binary):
        raise InvalidInput(f"{len(binary) - pos} bytes of binary data after the last input")
    if "text" in by_name:
        if len(by_name) > 1:
            raise InvalidInput("send either 'text' or 'ids' (+ 'lengths'), not both")
        values, shape = by_name["text"]
        texts = []
        for i, v in enumerate(values):
            if isinstance(v, bytes):
                try:
                    v = v.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InvalidInput(f"text[{i}] is not valid UTF-8: {e.reason} at byte "
                                       f"{e.start}") from e
            if not isinstance(v, str):
                raise InvalidInput(f"text[{i}] must be a string")
            texts.append(v)
        req.texts = texts
        return
    if "ids" not in by_name:
        raise InvalidInput("'lengths' needs an 'ids' input (INT64 [N, T]) beside it")
    flat, shape = by_name["ids"]
    req.ids = _int64(flat, "ids").reshape(shape)
    if "lengths" in by_name:
        lflat, lshape = by_name["lengths"]
        req.lengths = _int64(lflat, "lengths").reshape(lshape)
    else:
        req.lengths = np.full(shape[0], shape[1], dtype=np.int64)


def _int64(values: Sequence[Any] | np.ndarray, name: str) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values.astype(np.int64)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidInput(f"input '{name}': every element must be an integer, got "
                               f"{json.dumps(v)[:40]}")
        if not -(1 << 63) <= v < (1 << 63):
            raise InvalidInput(f"input '{name}': {v} does not fit INT64")
    return np.asarray(values, dtype=np.int64)


def encode_response(model: str, version: str, request_id: str | None, tensors: list[Tensor],
                    binary: set[str]) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when every output is JSON)."""
    outputs = []
    chunks: list[bytes] = []
    for t in tensors:
        out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if t.name in binary:
            if isinstance(t.data, list):
                raw = b"".join(len(b).to_bytes(4, "little") + b for b in t.data)
            else:
                raw = np.ascontiguousarray(t.data, dtype=DTYPES[t.datatype]).tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif isinstance(t.data, list):
            out["data"] = [b.decode("utf-8") for b in t.data]
        else:  # orjson writes float32 as its shortest round-trip form: exact, and ~15x faster
            out["data"] = np.ascontiguousarray(t.data).ravel()
        outputs.append(out)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if request_id is not None:
        doc["id"] = request_id
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)
