"""KServe V2 / Open Inference Protocol tensors, transport-free: what both V2 front ends (gRPC,
grpc/kserve_codec.py; REST, http/v2_codec.py) share, so the two answer with the same tensor
names, datatypes, shapes and numbers (docs/kserve.md).

    inputs   text BYTES [N] or [N, 1]  |  ids INT64 [N, T] (+ lengths INT64 [N] or [N, 1], optional)
    params   top_k (0 or absent = the model default), priority (1 high, 2 low),
             timeout (microseconds; 0 or absent = the caller's deadline only)
    outputs  probs FP32 [N, V], top_ids INT64 [N, k], top_chars BYTES [N, k], top_probs FP32 [N, k]
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .batcher import HIGH, LOW
from .errors import InvalidInput
from .predictor import TextResult

INPUTS = ("text", "ids", "lengths")
OUTPUTS = ("probs", "top_ids", "top_chars", "top_probs")

def metadata_tensors(vocab_size: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """ModelMetadata's inputs and outputs (name, datatype, shape), for gRPC and REST alike. The
    shapes are what Triton derives from the model configuration (v2_config.py): the batch
    dimension -1, then each tensor's dims, so text and lengths read [-1, 1]; [N] is taken too."""
    def meta(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
        return {"name": name, "datatype": datatype, "shape": shape}

    return ([meta("text", "BYTES", [-1, 1]), meta("ids", "INT64", [-1, -1]),
             meta("lengths", "INT64", [-1, 1])],
            [meta("probs", "FP32", [-1, vocab_size]), meta("top_ids", "INT64", [-1, -1]),
             meta("top_chars", "BYTES", [-1, -1]), meta("top_probs", "FP32", [-1, -1])])


# V2 raw/binary contents are little-endian.
DTYPES: dict[str, np.dtype[Any]] = {"INT64": np.dtype("<i8"), "FP32": np.dtype("<f4")}


@dataclass
class Tensor:
    """One output tensor: numbers as an ndarray, BYTES as a flat list of bytes."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]


# Shapes the codec refuses itself; a bad `lengths` rank is the predictor's to name, as it knows
# N from `ids` ("lengths must have shape [2] or [2, 1]").
SHAPES = {"text": "[N] or [N, 1] (one text per row)", "ids": "[N, T] with T >= 1"}


SHARED_MEMORY_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size",
                            "shared_memory_offset")


def refuse_shared_memory(parameters: Iterable[str], what: str) -> None:
    """Triton's shared-memory extension is not served (no region can be registered): a tensor
    that names a region is refused, not answered inline, where a client would read its output
    from a region nothing wrote (or find its input's data missing, and chase a shape error)."""
    if any(p in SHARED_MEMORY_PARAMETERS for p in parameters):
        raise InvalidInput(f"{what}: shared memory is not supported by this server (Triton's "
                           f"shared-memory extension): send the data in the request and read "
                           f"the outputs from the response")


def check_shape(name: str, shape: list[int], max_texts: int) -> int:
    """An input's declared shape, checked before any element is decoded; its element count.
    A shape with a 0 dimension is refused here: [0, 2**62] declares no elements, so no data can
    disprove it, yet numpy cannot reshape to it ("array is too big")."""
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input '{name}': shape {shape} has a negative dimension")
    if shape and shape[0] > max_texts:
        raise InvalidInput(f"too many texts: {shape[0]} > max_texts_per_request {max_texts}; "
                           f"split the request")
    if name == "ids":
        ok = len(shape) == 2 and shape[1] >= 1
    else:
        ok = name != "text" or len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)
    if not ok:
        raise InvalidInput(f"input '{name}' must have shape {SHAPES[name]}, got {shape}")
    if shape and shape[0] == 0:
        raise InvalidInput(f"input '{name}': shape {shape} has no rows: send at least one text")
    if 0 in shape:  # [33, 2**62, 0]: as above, no elements, and no array numpy could build
        raise InvalidInput(f"input '{name}': shape {shape} has a 0 dimension, so no elements")
    return math.prod(shape)


def unpack_bytes(raw: bytes, name: str, count: int, shape: list[int]) -> list[bytes]:
    """V2 raw BYTES: each element is a 4-byte little-endian length, then that many bytes. Stops
    at the first element past the shape's `count`: 16 MB of empty elements would otherwise
    cost a second of the event loop before the count is compared."""
    out: list[bytes] = []
    pos, end = 0, len(raw)
    while pos < end:
        if len(out) == count:
            raise InvalidInput(f"input '{name}': shape {shape} needs {count} BYTES elements, "
                               f"the raw content holds more")
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


def pack_bytes(items: Iterable[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


# A timeout longer than gRPC's own deadlines (~292 years) could not be a deadline.
MAX_TIMEOUT_US = 2**63 // 1000


def deadline_with_timeout(deadline: float | None, timeout_us: int) -> float | None:
    """V2 parameter `timeout` (Triton's schedule-policy extension, tritonclient's `timeout=`):
    the microseconds from now within which the request must leave the queue, or it is refused
    (DEADLINE_EXCEEDED / 504). It can shorten the call's own deadline, never extend it; 0 is
    none. `deadline` and the answer are on the event loop's clock."""
    if not 0 <= timeout_us <= MAX_TIMEOUT_US:
        raise InvalidInput(f"parameter timeout must be microseconds between 0 (none) and "
                           f"{MAX_TIMEOUT_US}, got {timeout_us}")
    if timeout_us == 0:
        return deadline
    own = asyncio.get_running_loop().time() + timeout_us / 1e6
    return own if deadline is None else min(deadline, own)


def lane_of_priority(priority: int) -> int:
    """V2 parameter `priority`: absent or 0 (default) and 1 are the high lane, 2 the low one
    (Triton's convention that a lower number is more urgent)."""
    if priority not in (0, 1, 2):
        raise InvalidInput(f"parameter priority must be 1 (high) or 2 (low, batch jobs), got "
                           f"{priority}")
    return LOW if priority == 2 else HIGH


def output_tensors(
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
