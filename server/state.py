"""The opaque continuation state: a model's recurrent state after a text, as bytes a client keeps.

    codec = StateCodec.for_artifact(artifact)
    blob = codec.encode(state)            # (S, H) float32 -> bytes
    state = codec.decode(blob, "states[0]")  # bytes -> (S, H) float32, validated

The server keeps nothing per client: any replica serving the same artifact continues any state.
Format version 1, all integers little-endian (docs/streaming.md):

    offset  size   field
    0       4      magic b"NCST"
    4       1      format version (1)
    5       1      dtype (1 = float32)
    6       2      reserved, zero
    8       16     artifact id: the first 16 bytes of the artifact's sha256 (GetModelInfo)
    24      4      S, state layers (uint32)
    28      4      H, hidden size (uint32)
    32      S*H*4  the state, float32, row-major (S, H)
    32+S*H*4  4    CRC-32 of every byte before it

Decoding refuses, in this order: a blob too short or not starting with the magic, an unknown
version, a length that does not match S and H, a wrong checksum, a dtype other than float32,
reserved bytes that are not zero (all INVALID_ARGUMENT); a state from another artifact (FAILED_PRECONDITION, naming both); S or H
unlike this model's, and NaN or infinite values (INVALID_ARGUMENT). The checksum catches
corruption and truncation, not forgery: a forged state can only hold finite numbers, which
cannot harm the server.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from .artifact import Artifact
from .errors import FailedPrecondition, InvalidInput

MAGIC = b"NCST"
FORMAT_VERSION = 1
DTYPE_FLOAT32 = 1
ARTIFACT_ID_BYTES = 16
_HEADER = struct.Struct("<4sBBH16sII")  # magic, version, dtype, reserved, artifact id, S, H
_CRC = struct.Struct("<I")
HEADER_BYTES = _HEADER.size  # 32
OVERHEAD_BYTES = HEADER_BYTES + _CRC.size  # 36


def state_bytes(state_layers: int, hidden_size: int) -> int:
    """Size of one encoded state: 36 + S * H * 4 bytes."""
    return OVERHEAD_BYTES + state_layers * hidden_size * 4


# The largest magnitude a decoded state may hold. Hidden states are tanh outputs (or mixes of
# them) within [-1, 1]; an LSTM cell grows by at most 1 a character. A forged finite value near
# float32's limit (-3e38) overflowed inside the model and answered NaN probabilities.
MAX_STATE_ABS = 1e6


@dataclass(frozen=True)
class StateCodec:
    artifact_id: bytes  # 16 bytes
    state_layers: int  # S
    hidden_size: int  # H

    @classmethod
    def for_artifact(cls, artifact: Artifact) -> StateCodec:
        return cls(bytes.fromhex(artifact.sha256)[:ARTIFACT_ID_BYTES], artifact.state_layers,
                   artifact.hidden_size)

    @property
    def size_bytes(self) -> int:
        return state_bytes(self.state_layers, self.hidden_size)

    def encode(self, state: np.ndarray) -> bytes:
        """(S, H) float32 -> bytes."""
        s, h = self.state_layers, self.hidden_size
        if state.shape != (s, h):
            raise ValueError(f"state shape {state.shape} != ({s}, {h})")
        head = _HEADER.pack(MAGIC, FORMAT_VERSION, DTYPE_FLOAT32, 0, self.artifact_id, s, h)
        body = head + np.ascontiguousarray(state, dtype="<f4").tobytes()
        return body + _CRC.pack(zlib.crc32(body))

    def decode(self, blob: bytes, what: str = "state") -> np.ndarray:
        """bytes -> (S, H) float32; InvalidInput or FailedPrecondition naming `what`."""
        if len(blob) < OVERHEAD_BYTES or blob[:4] != MAGIC:
            raise InvalidInput(f"{what} is not a nextchar state ({len(blob)} bytes; pass back "
                               f"the bytes a Prediction.state or GenerateResponse.state held)")
        magic, version, dtype, reserved, artifact_id, s, h = _HEADER.unpack_from(blob)
        if version != FORMAT_VERSION:
            raise InvalidInput(f"{what} has state format version {version}; this server reads "
                               f"version {FORMAT_VERSION}")
        expected = state_bytes(s, h)
        if len(blob) != expected:
            raise InvalidInput(f"{what} is truncated or padded: {len(blob)} bytes, its header "
                               f"(S={s}, H={h}) says {expected}")
        (crc,) = _CRC.unpack_from(blob, expected - _CRC.size)
        if zlib.crc32(blob[: expected - _CRC.size]) != crc:
            raise InvalidInput(f"{what} is corrupted: its checksum does not match")
        if dtype != DTYPE_FLOAT32:
            raise InvalidInput(f"{what} has dtype code {dtype}; only float32 (1) is supported")
        if reserved:  # a later format that used them would be misread: refuse, do not guess
            raise InvalidInput(f"{what} sets header bytes 6-7 ({reserved:#06x}), which format "
                               f"version {FORMAT_VERSION} reserves as zero")
        if artifact_id != self.artifact_id:
            raise FailedPrecondition(
                f"{what} was produced by another model (artifact {artifact_id.hex()[:12]}…); "
                f"this server runs artifact {self.artifact_id.hex()[:12]}… (see GetModelInfo "
                f"artifact_sha256). A state only continues on the artifact that made it: "
                f"send the whole text instead"
            )
        if (s, h) != (self.state_layers, self.hidden_size):
            raise InvalidInput(f"{what} has shape ({s}, {h}); this model's state is "
                               f"({self.state_layers}, {self.hidden_size})")
        state = np.frombuffer(blob, dtype="<f4", count=s * h, offset=HEADER_BYTES)
        if not np.isfinite(state).all():
            raise InvalidInput(f"{what} holds NaN or infinite values")
        if np.abs(state).max(initial=0.0) > MAX_STATE_ABS:
            raise InvalidInput(f"{what} holds values beyond +-{MAX_STATE_ABS:g}, which no "
                               f"model's state reaches: it was not made by this server")
        return state.astype(np.float32).reshape(s, h)
