"""KServe V2 / Open Inference Protocol tensors, transport-free: what both V2 front ends (gRPC,
grpc/kserve_codec.py; REST, http/v2_codec.py) share, so the two answer with the same tensor
names, datatypes, shapes and numbers (docs/kserve.md).

    inputs   text BYTES [N] or [N, 1]  |  ids INT64 [N, T] (+ lengths INT64 [N] or [N, 1], optional)
    params   top_k (0 or absent = the model default), priority (1 high, 2 low)
    outputs  probs FP32 [N, V], top_ids INT64 [N, k], top_chars BYTES [N, k], top_probs FP32 [N, k]
"""

from __future__ import annotations

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

# V2 raw/binary contents are little-endian.
DTYPES: dict[str, np.dtype[Any]] = {"INT64": np.dtype("<i8"), "FP32": np.dtype("<f4")}


@dataclass
class Tensor:
    """One output tensor: numbers as an ndarray, BYTES as a flat list of bytes."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]


def unpack_bytes(raw: bytes, name: str) -> list[bytes]:
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


def pack_bytes(items: Iterable[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


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
