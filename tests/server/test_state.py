"""Continuation state: the codec, and Predict(state + new characters) == Predict(whole text)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest

from nextchar.client import NextCharClient, NextCharError
from nextchar.server.errors import FailedPrecondition, InvalidInput
from nextchar.server.state import HEADER_BYTES, OVERHEAD_BYTES, StateCodec, state_bytes

TOL = 1e-5
CASES = [("tiny_artifact", "onnx"), ("tiny_artifact", "torchscript"),
         ("tiny_lstm_artifact", "onnx"), ("tiny_lstm_artifact", "torchscript")]


def _codec(s: int = 2, h: int = 3, artifact_byte: int = 7) -> StateCodec:
    return StateCodec(bytes([artifact_byte]) * 16, s, h)


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


# -- the codec ---------------------------------------------------------------------------------
def test_codec_round_trip_and_documented_size() -> None:
    codec = _codec()
    state = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    blob = codec.encode(state)
    assert len(blob) == codec.size_bytes == state_bytes(2, 3) == 36 + 2 * 3 * 4
    assert blob[:4] == b"NCST" and blob[4] == 1 and blob[5] == 1
    assert blob[8:24] == bytes([7]) * 16
    np.testing.assert_array_equal(codec.decode(blob), state)


def test_realistic_model_state_size() -> None:
    # The benchmark model (rnn, 2 layers, H=256): S=2 -> 2,084 bytes; an LSTM doubles S.
    assert state_bytes(2, 256) == 2084
    assert state_bytes(4, 512) == OVERHEAD_BYTES + 4 * 512 * 4 == 8228


@pytest.mark.parametrize("mangle, message", [
    (lambda b: b"", "is not a nextchar state"),
    (lambda b: b[:20], "is not a nextchar state"),
    (lambda b: b"XXXX" + b[4:], "is not a nextchar state"),
    (lambda b: b[:-1], "is truncated or padded"),
    (lambda b: b[:-5] + b[-4:], "is truncated or padded"),
    (lambda b: b + b"\0", "is truncated or padded"),
    (lambda b: b[:HEADER_BYTES] + bytes([b[HEADER_BYTES] ^ 1]) + b[HEADER_BYTES + 1 :],
     "is corrupted"),
    (lambda b: b[:4] + b"\x02" + b[5:], "state format version 2"),
    (lambda b: _with_crc(b[:5] + b"\x02" + b[6:-4]), "dtype code 2"),
    (lambda b: _with_crc(b[:6] + b"\x01\x00" + b[8:-4]), "sets header bytes 6-7 (0x0001)"),
    (lambda b: _with_crc(b[:24] + struct.pack("<II", 3, 2) + b[32:-4]), "has shape (3, 2)"),
])
def test_malformed_states_are_invalid_input(mangle, message: str) -> None:
    codec = _codec()
    blob = codec.encode(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(InvalidInput, match=r"^states\[4\] ") as e:
        codec.decode(mangle(blob), "states[4]")
    assert message in e.value.message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_state_is_invalid_input(bad: float) -> None:
    codec = _codec()
    state = np.ones((2, 3), dtype=np.float32)
    state[1, 2] = bad
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        codec.decode(codec.encode(state))


def test_state_of_another_artifact_is_failed_precondition() -> None:
    blob = _codec(artifact_byte=1).encode(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(FailedPrecondition, match="produced by another model") as e:
        _codec(artifact_byte=2).decode(blob)
    assert "010101010101" in e.value.message and "020202020202" in e.value.message


# -- over gRPC ---------------------------------------------------------------------------------
def _all_k(client: NextCharClient) -> int:
    """The largest top_k: every probability for the tiny models (59 characters)."""
    return int(client.model_info().limits.max_top_k)


def _probs(pred) -> np.ndarray:
    out = np.zeros(256, dtype=np.float64)
    for c in pred.top:
        out[c.id] = c.prob
    return out


def _random_texts(rng: np.random.Generator, vocab: list[str], n: int) -> list[str]:
    return ["".join(rng.choice(vocab, size=int(rng.integers(2, 60)))) for _ in range(n)]


@pytest.mark.parametrize("artifact_name, backend", CASES)
def test_continuation_equals_whole_text_over_random_splits(
    start_server, request: pytest.FixtureRequest, artifact_name: str, backend: str
) -> None:
    artifact: Path = request.getfixturevalue(artifact_name)
    st = start_server(model=artifact, backend=backend)
    rng = np.random.default_rng(42)
    with NextCharClient(st.address) as c:
        info = c.model_info()
    k = int(info.limits.max_top_k)
    texts = _random_texts(rng, list(info.vocab), 24)
    # Up to three pieces per text, cut at random places: state chains across requests.
    pieces = []
    for t in texts:
        cuts = sorted(set(rng.integers(1, len(t), size=int(rng.integers(1, 3))).tolist()))
        pieces.append([t[a:b] for a, b in zip([0, *cuts], [*cuts, len(t)], strict=True)])
    with NextCharClient(st.address) as c:
        whole = c.predict(texts, top_k=k, per_position=True)
        states = [b""] * len(texts)
        last = [None] * len(texts)
        argmax = [""] * len(texts)
        positions: list[list[float]] = [[] for _ in texts]
        for hop in range(max(len(p) for p in pieces)):
            rows = [i for i, p in enumerate(pieces) if hop < len(p)]
            preds = c.predict([pieces[i][hop] for i in rows], top_k=k, per_position=True,
                              states=[states[i] for i in rows], return_state=True)
            for i, pred in zip(rows, preds, strict=True):
                states[i], last[i] = pred.state, pred
                argmax[i] += pred.argmax_text
                positions[i].extend(p.prob for p in pred.positions)
    for i in range(len(texts)):
        assert len(pieces[i]) >= 2
        np.testing.assert_allclose(_probs(last[i]), _probs(whole[i]), atol=TOL, rtol=0)
        assert argmax[i] == whole[i].argmax_text
        np.testing.assert_allclose(positions[i], [p.prob for p in whole[i].positions],
                                   atol=TOL, rtol=0)


def test_any_replica_continues_any_state(start_server, tiny_artifact: Path) -> None:
    """The server keeps nothing per client: a state from one server (ONNX) continues on another
    server of the same artifact (here even another runtime)."""
    a = start_server(model=tiny_artifact, backend="onnx")
    b = start_server(model=tiny_artifact, backend="torchscript")
    with NextCharClient(a.address) as ca, NextCharClient(b.address) as cb:
        (head,) = ca.predict(["To be, or no"], return_state=True)
        k = _all_k(ca)
        (cont,) = cb.predict(["t to b"], top_k=k, states=[head.state])
        (whole,) = ca.predict(["To be, or not to b"], top_k=k)
    np.testing.assert_allclose(_probs(cont), _probs(whole), atol=TOL, rtol=0)


def test_empty_state_entries_start_fresh_and_state_is_not_returned_unasked(client) -> None:
    k = _all_k(client)
    (with_state,) = client.predict(["hello"], return_state=True)
    fresh, cont = client.predict(["hello", " you"], top_k=k, states=[b"", with_state.state])
    (plain,) = client.predict(["hello"], top_k=k)
    (whole,) = client.predict(["hello you"], top_k=k)
    assert plain.state == b"" and len(with_state.state) == state_bytes(2, 16)
    np.testing.assert_allclose(_probs(fresh), _probs(plain), atol=TOL, rtol=0)
    np.testing.assert_allclose(_probs(cont), _probs(whole), atol=TOL, rtol=0)


def _state_bytes_of(client, text: str) -> bytes:
    (pred,) = client.predict([text], return_state=True)
    return pred.state


def test_foreign_state_is_failed_precondition(
    start_server, client, tiny_lstm_artifact: Path
) -> None:
    other = start_server(model=tiny_lstm_artifact, backend="onnx")
    with NextCharClient(other.address) as oc:
        foreign = _state_bytes_of(oc, "hello")
    info = client.model_info()
    with pytest.raises(NextCharError) as e:
        client.predict(["abc", "def"], states=[b"", foreign])
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.details.startswith("states[1] was produced by another model")
    assert info.artifact_sha256[:12] in e.value.details


def _nan_state(valid: bytes) -> bytes:
    body = bytearray(valid[:-4])
    body[HEADER_BYTES : HEADER_BYTES + 4] = struct.pack("<f", float("nan"))
    return _with_crc(bytes(body))


def _huge_state(valid: bytes) -> bytes:
    """Finite, with a valid header and checksum: every value -3e38 (a forged state that made
    the model answer NaN probabilities and return a state the server then refused)."""
    n = (len(valid) - 4 - HEADER_BYTES) // 4
    body = valid[:HEADER_BYTES] + struct.pack(f"<{n}f", *([-3e38] * n))
    return _with_crc(body)


@pytest.mark.parametrize("mangle, message", [
    (lambda b: b[: len(b) // 2], "states[0] is truncated or padded"),
    (lambda b: b[:40] + bytes([b[40] ^ 0x10]) + b[41:], "states[0] is corrupted"),
    (_nan_state, "states[0] holds NaN or infinite values"),
    (_huge_state, "states[0] holds values beyond +-1e+06, which no model's state reaches"),
    (lambda b: b"not a state", "states[0] is not a nextchar state"),
])
def test_corrupted_truncated_nan_state_is_invalid_argument(client, mangle, message: str) -> None:
    valid = _state_bytes_of(client, "hello")
    with pytest.raises(NextCharError) as e:
        client.predict(["abc"], states=[mangle(valid)])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details.startswith(message)


def test_states_count_must_match_texts(client) -> None:
    valid = _state_bytes_of(client, "hello")
    with pytest.raises(NextCharError) as e:
        client.predict(["abc", "def"], states=[valid])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details == ("states has 1 entries for 2 texts: send none or one per text "
                               "(empty bytes for a fresh text)")
