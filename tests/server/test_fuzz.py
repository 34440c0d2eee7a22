"""Property-based fuzzing of every request field of both gRPC services (nextchar.v1 and KServe V2
`inference.GRPCInferenceService`, streaming included) against a real `nextchar serve` subprocess.

Each request must end in a documented status code (never UNKNOWN or INTERNAL), an OK answer
must be well-formed, and afterwards the server must be alive, SERVING and within a memory bound.

    make test                       # a few dozen examples per property
    make fuzz                       # NEXTCHAR_FUZZ_EXAMPLES=2000: >= 10k calls, report JSON

Structured requests go through the generated classes (random unicode, control characters,
huge/negative numbers, NaN/inf, garbage and forged state blobs). Protobuf refuses to serialize
lone surrogates, so invalid UTF-8 and arbitrary wire bytes go through a generic
`channel.unary_unary` with no serializer (the bytes as they are).
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import TINY_VOCAB, ServerProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nextchar.kserve import grpc_predict_v2_pb2 as kpb
from nextchar.kserve import grpc_predict_v2_pb2_grpc as kpb_grpc
from nextchar.v1 import admin_pb2
from nextchar.v1 import nextchar_pb2 as pb
from nextchar.v1 import nextchar_pb2_grpc as pb_grpc

EXAMPLES = int(os.environ.get("NEXTCHAR_FUZZ_EXAMPLES", "40"))
REPORT = os.environ.get("NEXTCHAR_FUZZ_REPORT")
FUZZING = "NEXTCHAR_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not FUZZING,
                suppress_health_check=list(HealthCheck))

MAX_MESSAGE_BYTES = 65536  # small, so oversized messages are cheap to send
MAX_CHARS = 256
MAX_TEXTS = 64
RSS_GROWTH_BOUND_KIB = 200 * 1024

# The documented codes (nextchar.proto, docs/kserve.md); oversized messages add
# RESOURCE_EXHAUSTED everywhere, a `model` name the server does not know NOT_FOUND.
_CALL = {"OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "NOT_FOUND"}
ALLOWED = {
    "Predict": _CALL,
    "Generate": _CALL,
    "GetModelInfo": {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "NOT_FOUND"},
    "ListModels": {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"},
    "ReloadModel": {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "NOT_FOUND"},
    **{f"kserve.{m}": _CALL for m in (
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelConfig", "ModelInfer", "ModelStreamInfer", "ModelStatistics", "RepositoryIndex")},
    "kserve.ModelInfer well-formed": _CALL,
    "kserve.ModelInfer declared shapes": _CALL,
}
METHODS = {
    "Predict": "/nextchar.v1.NextChar/Predict",
    "GetModelInfo": "/nextchar.v1.NextChar/GetModelInfo",
    "ListModels": "/nextchar.v1.NextChar/ListModels",
    "ReloadModel": "/nextchar.v1.Admin/ReloadModel",
    # KServe V2 (load/unload are left out: a random body naming the model would unload it).
    **{f"kserve.{m}": f"/inference.GRPCInferenceService/{m}" for m in (
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelConfig", "ModelInfer", "ModelStatistics", "RepositoryIndex")},
}
# In-band errors of ModelStreamInfer: "<CODE>: <message>", with the same documented codes.
STREAM_CODES = _CALL - {"OK"}
MODEL = "random-rnn"  # the tiny artifact's name
codes: Counter[str] = Counter()


# -- the server --------------------------------------------------------------------------------
class Target:
    def __init__(self, sp: ServerProcess, channel: grpc.Channel) -> None:
        self.sp = sp
        self.channel = channel
        self.stub = pb_grpc.NextCharStub(channel)
        info = self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        self.vocab = set(info.vocab)
        self.vocab_list = list(info.vocab)
        self.artifact_id = bytes.fromhex(info.artifact_sha256)[:16]
        self.state_shape = (info.config.num_layers * (2 if info.config.cell == "lstm" else 1),
                            info.config.hidden_size)
        self.raw = {name: channel.unary_unary(path) for name, path in METHODS.items()}
        self.raw_generate = channel.unary_stream("/nextchar.v1.NextChar/Generate")
        self.kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        self.raw_stream_infer = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer")
        answer = self.stub.Predict(pb.PredictRequest(texts=["warm up"] * 8, return_state=True),
                                   timeout=30)
        self.real_state = answer.predictions[0].state
        self.rss_start_kib = sp.rss_kib()
        self.rss_peak_kib = self.rss_start_kib
        self.started = time.monotonic()

    def sample_rss(self) -> None:
        self.rss_peak_kib = max(self.rss_peak_kib, self.sp.rss_kib())

    def outcome(self, kind: str, call: Callable[[], Any]) -> tuple[str, Any]:
        """Runs call() -> (status code name, result or None); the code must be documented."""
        try:
            result, code = call(), "OK"
        except grpc.RpcError as e:
            result, code = None, e.code().name
            assert code in ALLOWED[kind], f"{kind}: {code} {e.details()!r}"
            assert e.details(), f"{kind}: {code} without a message"
        codes[f"{kind} {code}"] += 1
        if sum(codes.values()) % 500 == 0:
            self.sample_rss()
        return code, result


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, tiny_artifact: Path) -> Iterator[Target]:
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    sp = ServerProcess(["--model", str(tiny_artifact), "--max-message-bytes", str(MAX_MESSAGE_BYTES),
                        "--max-chars-per-text", str(MAX_CHARS),
                        "--max-texts-per-request", str(MAX_TEXTS)], log)
    # The client may send more than the server takes: oversized requests must reach it.
    channel = grpc.insecure_channel(sp.address, options=[
        ("grpc.max_send_message_length", 8 * MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", 8 * MAX_MESSAGE_BYTES)])
    try:
        t = Target(sp, channel)
        yield t
        _check_alive_and_bounded(t)
    finally:
        channel.close()
        sp.close()


def _commit() -> str:
    """HEAD's short hash, '+dirty' when the tree has changes: what the report measured."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True,
                              text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _check_alive_and_bounded(t: Target) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    status = health_pb2_grpc.HealthStub(t.channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert t.sp.proc.poll() is None, "the server died"
    t.sample_rss()
    rss_end = t.sp.rss_kib()
    in_band = sum(n for key, n in codes.items() if " in-band " in key)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _commit(),
        "command": f"NEXTCHAR_FUZZ_EXAMPLES={EXAMPLES} pytest tests/server/test_fuzz.py",
        "requests": sum(codes.values()) - in_band,  # calls; a stream's frames count once
        "stream_frames_answered": in_band,  # ModelStreamInfer frames, each answered in-band
        "codes": dict(sorted(codes.items())),
        "seconds": round(time.monotonic() - t.started, 1),
        "rss_kib_start": t.rss_start_kib,
        "rss_kib_peak": t.rss_peak_kib,
        "rss_kib_end": rss_end,
        "examples_per_property": EXAMPLES,
        "internal_errors_in_log": t.sp.log().count("unhandled error"),
    }
    if REPORT:
        Path(REPORT).write_text(json.dumps(report, indent=2) + "\n")
    assert report["internal_errors_in_log"] == 0, t.sp.log()[-5000:]
    assert rss_end - t.rss_start_kib < RSS_GROWTH_BOUND_KIB, report


# -- strategies --------------------------------------------------------------------------------
CONTROL = st.characters(min_codepoint=0, max_codepoint=0x1F) | st.sampled_from(
    "\x7f\u0085\u00a0\u200b\u200e\u202e\u2028\ufeff\ufffd\uffff\U0010ffff")
VOCAB_TEXT = st.text(alphabet=st.sampled_from(TINY_VOCAB), min_size=1, max_size=60)
HOSTILE_TEXT = st.one_of(
    st.text(alphabet=st.sampled_from(TINY_VOCAB), min_size=MAX_CHARS - 4, max_size=MAX_CHARS + 4),
    st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40),  # no surrogates
    st.text(alphabet=st.sampled_from(TINY_VOCAB) | CONTROL, max_size=40),
    st.just(""),
)
UINT32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([2**31 - 1, 2**31, 2**32 - 1]))
UINT64 = st.one_of(st.integers(0, 100), st.integers(0, 2**64 - 1))
FLOAT32 = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-45, 1e-30, 0.5, 1.0, 1.0000001, 2.0, 3.4e38, -1.0]),
)


def mostly(valid: st.SearchStrategy, hostile: st.SearchStrategy) -> st.SearchStrategy:
    """About 9 in 10 draws valid, so most requests get past validation into the model."""
    return st.integers(0, 99).flatmap(lambda n: valid if n < 90 else hostile)


TEXT = mostly(VOCAB_TEXT, HOSTILE_TEXT)
TOP_K = mostly(st.integers(0, len(TINY_VOCAB)), UINT32)


@st.composite
def state_blob(draw: st.DrawFn, t: Target) -> bytes:
    """A real state, or one that passes fewer and fewer of the decoder's checks."""
    kind = draw(st.sampled_from(["real", "real", "flipped", "forged", "garbage", "empty"]))
    if kind == "real":
        return t.real_state
    if kind == "empty":
        return b""
    if kind == "garbage":
        return draw(st.binary(max_size=200))
    if kind == "flipped":
        i = draw(st.integers(0, len(t.real_state) - 1))
        flipped = bytearray(t.real_state)
        flipped[i] ^= draw(st.integers(1, 255))
        return bytes(flipped)
    s, h = t.state_shape
    if draw(st.booleans()):
        s, h = draw(st.integers(0, 8)), draw(st.integers(0, 40))
    version = draw(st.sampled_from([1, 1, 1, 0, 2, 255]))
    dtype = draw(st.sampled_from([1, 1, 1, 0, 2]))
    artifact_id = t.artifact_id if draw(st.booleans()) else draw(st.binary(min_size=16, max_size=16))
    values = draw(st.lists(FLOAT32, min_size=s * h, max_size=s * h))
    body = struct.pack("<4sBBH16sII", b"NCST", version, dtype, 0, artifact_id, s, h)
    body += struct.pack(f"<{s * h}f", *values)
    crc = zlib.crc32(body) if draw(st.integers(0, 9)) else draw(st.integers(0, 2**32 - 1))
    blob = body + struct.pack("<I", crc)
    cut = draw(st.sampled_from([None, None, None, 0, len(blob) - 1, 10]))
    return blob if cut is None else blob[:cut]


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative numbers: ten-byte two's complement, as protobuf writes them
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@st.composite
def wire_message(draw: st.DrawFn) -> bytes:
    """Fields with any number and wire type: invalid UTF-8 in strings, negative varints, ..."""
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        number = draw(st.integers(1, 12))
        kind = draw(st.sampled_from(["varint", "bytes", "utf8-bad", "fixed32", "fixed64", "junk"]))
        if kind == "varint":
            value = draw(st.integers(-(2**63), 2**64 - 1))
            parts.append(_varint(number << 3) + _varint(value))
        elif kind in ("bytes", "utf8-bad"):
            payload = draw(st.binary(max_size=64)) if kind == "bytes" else draw(st.sampled_from(
                [b"\xff", b"\xed\xa0\x80", b"abc\xc3", b"\xc0\xaf", b"h\xe9llo", b"\x00"]))
            parts.append(_varint(number << 3 | 2) + _varint(len(payload)) + payload)
        elif kind == "fixed32":
            parts.append(_varint(number << 3 | 5) + draw(st.binary(min_size=4, max_size=4)))
        elif kind == "fixed64":
            parts.append(_varint(number << 3 | 1) + draw(st.binary(min_size=8, max_size=8)))
        else:
            parts.append(draw(st.binary(max_size=16)))
    return b"".join(parts)


OVERSIZED = st.integers(MAX_MESSAGE_BYTES + 1, 3 * MAX_MESSAGE_BYTES).map(
    lambda n: b"\x0a" + _varint(n) + b"a" * n)


# -- checks of OK answers ------------------------------------------------------------------------
def _check_predictions(t: Target, request: pb.PredictRequest, response: pb.PredictResponse) -> None:
    assert len(response.predictions) == len(request.texts)
    k = request.top_k or 5
    for text, pred in zip(request.texts, response.predictions, strict=True):
        assert len(pred.top) == k
        probs = [c.prob for c in pred.top]
        assert all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in probs), probs
        assert probs == sorted(probs, reverse=True)
        assert all(c.char in t.vocab for c in pred.top)
        if request.per_position:
            assert len(pred.argmax_text) == len(text) == len(pred.positions)
        assert bool(pred.state) == request.return_state


# -- properties ----------------------------------------------------------------------------------
@st.composite
def predict_request(draw: st.DrawFn, t: Target) -> pb.PredictRequest:
    texts = draw(mostly(st.lists(TEXT, min_size=1, max_size=4),
                        st.lists(TEXT, max_size=MAX_TEXTS + 2)))
    states: list[bytes] = []
    if draw(st.integers(0, 2)) == 0:
        n = draw(mostly(st.just(len(texts)), st.integers(0, len(texts) + 1)))
        states = draw(st.lists(state_blob(t), min_size=n, max_size=n))
    return pb.PredictRequest(texts=texts, top_k=draw(TOP_K), per_position=draw(st.booleans()),
                             return_state=draw(st.booleans()), states=states)


@st.composite
def generate_request(draw: st.DrawFn, t: Target) -> pb.GenerateRequest:
    r = pb.GenerateRequest(
        prompt=draw(TEXT),
        max_chars=draw(mostly(st.integers(1, 40), st.one_of(st.just(0), UINT32))),
        top_k=draw(TOP_K),
        top_p=draw(mostly(st.floats(0, 1, width=32), FLOAT32)),
        stop=draw(mostly(st.lists(st.text(st.sampled_from(TINY_VOCAB), min_size=1, max_size=3),
                                  max_size=3),
                         st.lists(TEXT, max_size=10))),
        return_state=draw(st.booleans()))
    if draw(st.booleans()):
        r.temperature = draw(mostly(st.floats(0, 3, width=32), FLOAT32))
    if draw(st.booleans()):
        r.seed = draw(UINT64)
    if draw(st.integers(0, 2)) == 0:
        r.state = draw(state_blob(t))
    return r


@given(data=st.data())
@FUZZ
def test_predict_fields(target: Target, data: st.DataObject) -> None:
    request = data.draw(predict_request(target))
    code, response = target.outcome("Predict", lambda: target.stub.Predict(request, timeout=30))
    if code == "OK":
        _check_predictions(target, request, response)


@given(data=st.data())
@FUZZ
def test_generate_fields(target: Target, data: st.DataObject) -> None:
    request = data.draw(generate_request(target))
    code, responses = target.outcome("Generate",
                                     lambda: list(target.stub.Generate(request, timeout=60)))
    if code == "OK":
        text = "".join(r.text for r in responses)
        assert len(text) <= request.max_chars
        assert responses[-1].stop_reason != pb.STOP_REASON_UNSPECIFIED
        assert all(r.stop_reason == pb.STOP_REASON_UNSPECIFIED for r in responses[:-1])
        assert set(text) <= target.vocab
        assert bool(responses[-1].state) == request.return_state


@given(method=st.sampled_from(sorted(METHODS)), body=st.one_of(wire_message(), st.binary(max_size=300)))
@FUZZ
def test_raw_bytes_to_unary_methods(target: Target, method: str, body: bytes) -> None:
    target.outcome(method, lambda: target.raw[method](body, timeout=30))


@given(body=st.one_of(wire_message(), st.binary(max_size=300)))
@FUZZ
def test_raw_bytes_to_generate(target: Target, body: bytes) -> None:
    target.outcome("Generate", lambda: list(target.raw_generate(body, timeout=60)))


@given(method=st.sampled_from(["Predict", "GetModelInfo"]), body=OVERSIZED)
@settings(max_examples=max(3, EXAMPLES // 20), deadline=None, database=None,
          derandomize=not FUZZING, suppress_health_check=list(HealthCheck))
def test_oversized_messages_are_resource_exhausted(target: Target, method: str, body: bytes) -> None:
    code, _ = target.outcome(method, lambda: target.raw[method](body, timeout=30))
    assert code == "RESOURCE_EXHAUSTED"


def test_invalid_utf8_is_invalid_argument_with_a_message(target: Target) -> None:
    for payload in (b"\xff", b"\xed\xa0\x80", b"abc\xc3"):  # \xed\xa0\x80: a lone surrogate
        body = b"\x0a" + _varint(len(payload)) + payload
        for method in ("Predict",):
            with pytest.raises(grpc.RpcError) as e:
                target.raw[method](body, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "UTF-8" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(target.raw_generate(body, timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_response_larger_than_the_message_cap_is_refused_cleanly(target: Target) -> None:
    # 64 texts x 256 characters with per-position answers: far over the 64 KiB send cap.
    # Refused before any compute: the answer's size is known from the request.
    request = pb.PredictRequest(texts=["hello world " * 21] * MAX_TEXTS, per_position=True,
                                top_k=50)
    with pytest.raises(grpc.RpcError) as e:
        target.stub.Predict(request, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "> max_message_bytes 65536" in e.value.details()


def test_admin_message_is_empty() -> None:
    assert admin_pb2.ReloadModelRequest().ByteSize() == 0



# -- KServe V2 ---------------------------------------------------------------------------------
DTYPES = st.sampled_from(["BYTES", "INT64", "FP32", "INT32", "bytes", ""])
# Hostile shapes include no rows beside a huge dimension ([0, 2**62]): no elements to count,
# and numpy cannot build an array of that shape (this was INTERNAL).
DIM = st.one_of(st.integers(-2, 2**40), st.sampled_from([0, 2**62, 2**63 - 1]))
EDGE_SHAPES = st.sampled_from([[0], [0, 1], [0, 2**62], [2**62, 0], [0, 2**63 - 1], []])
SHAPE = mostly(st.lists(st.integers(1, 4), min_size=1, max_size=2),
               st.one_of(st.lists(DIM, max_size=3), EDGE_SHAPES))


@st.composite
def infer_tensor(draw: st.DrawFn) -> tuple[kpb.ModelInferRequest.InferInputTensor, bytes | None]:
    name = draw(mostly(st.sampled_from(["text", "ids", "lengths"]), st.text(max_size=8)))
    t = kpb.ModelInferRequest.InferInputTensor(name=name, datatype=draw(DTYPES),
                                               shape=draw(SHAPE))
    raw = None
    how = draw(st.integers(0, 2))
    if how == 0:
        t.contents.bytes_contents.extend(s.encode() for s in draw(st.lists(TEXT, max_size=5)))
    elif how == 1:
        t.contents.int64_contents.extend(draw(st.lists(st.integers(-2**63, 2**63 - 1),
                                                       max_size=12)))
    else:
        raw = draw(st.binary(max_size=64))
    return t, raw


@st.composite
def infer_request(draw: st.DrawFn) -> kpb.ModelInferRequest:
    r = kpb.ModelInferRequest(model_name=draw(mostly(st.just(MODEL), st.text(max_size=12))),
                              model_version=draw(mostly(st.just(""), st.text(max_size=4))),
                              id=draw(st.text(max_size=8)))
    tensors = draw(st.lists(infer_tensor(), min_size=0, max_size=3))
    raws = [raw for _, raw in tensors]
    for t, _ in tensors:
        r.inputs.append(t)
    if any(raw is not None for raw in raws) and draw(st.booleans()):
        r.raw_input_contents.extend(raw or b"" for raw in raws)
    for name in draw(st.lists(st.text(max_size=10) | st.sampled_from(
            ["probs", "top_ids", "top_chars", "top_probs"]), max_size=3)):
        r.outputs.add(name=name)
    for key in draw(st.lists(st.sampled_from(["top_k", "priority", "other"]), max_size=2,
                             unique=True)):
        kind = draw(st.sampled_from(["int64_param", "string_param", "bool_param",
                                     "double_param", "uint64_param"]))
        value = {"int64_param": st.integers(-2**63, 2**63 - 1), "string_param": st.text(max_size=4),
                 "bool_param": st.booleans(), "double_param": st.floats(allow_nan=True),
                 "uint64_param": st.integers(0, 2**64 - 1)}[kind]
        setattr(r.parameters[key], kind, draw(value))
    return r


@st.composite
def well_formed_infer_request(draw: st.DrawFn, t: Target) -> kpb.ModelInferRequest:
    """A request that mostly passes validation: `text` (BYTES [N] or [N, 1]) or `ids` (INT64
    [N, T], `lengths` optional), typed or raw contents, a subset of the outputs, top_k and
    priority in range, each with an occasional hostile value, so the model path and the answer
    encoding get fuzzed as well as the validation in front of them."""
    r = kpb.ModelInferRequest(model_name=MODEL, id=draw(st.text(max_size=8)))
    raw = draw(st.booleans())
    n = draw(mostly(st.integers(1, 4), st.integers(0, MAX_TEXTS + 2)))
    if draw(st.booleans()):
        texts = [s.encode() for s in draw(st.lists(TEXT, min_size=n, max_size=n))]
        shape = [n, 1] if draw(st.booleans()) else [n]
        tensor = r.inputs.add(name="text", datatype="BYTES", shape=shape)
        if raw:
            r.raw_input_contents.append(b"".join(struct.pack("<I", len(b)) + b for b in texts))
        else:
            tensor.contents.bytes_contents.extend(texts)
    else:
        width = draw(mostly(st.integers(1, 40), st.integers(0, MAX_CHARS + 2)))
        # Up to 66 x 258 ids: from a drawn seed, with at most one drawn out-of-range id.
        rng = random.Random(draw(st.integers(0, 2**32 - 1)))
        ids = [rng.randrange(len(t.vocab_list)) for _ in range(n * width)]
        if ids and draw(st.integers(0, 9)) == 0:
            ids[draw(st.integers(0, len(ids) - 1))] = draw(st.integers(-2**63, 2**63 - 1))
        r.inputs.add(name="ids", datatype="INT64", shape=[n, width])
        lengths = None
        if draw(st.booleans()):
            lengths = draw(st.lists(mostly(st.integers(1, max(width, 1)),
                                           st.integers(-2, width + 2)), min_size=n, max_size=n))
            r.inputs.add(name="lengths", datatype="INT64", shape=[n])
        for i, values in enumerate([ids] if lengths is None else [ids, lengths]):
            if raw:
                r.raw_input_contents.append(struct.pack(f"<{len(values)}q", *values))
            else:
                r.inputs[i].contents.int64_contents.extend(values)
    names = ["probs", "top_ids", "top_chars", "top_probs"]
    for name in draw(st.lists(st.sampled_from(names), unique=True, max_size=4)):
        r.outputs.add(name=name)
    top_k = draw(st.integers(0, 2))
    if top_k:
        r.parameters["top_k"].int64_param = draw(TOP_K)
    if draw(st.booleans()):
        r.parameters["priority"].int64_param = draw(mostly(st.integers(0, 2),
                                                           st.integers(-2**63, 2**63 - 1)))
    return r


def _outputs(r: kpb.ModelInferResponse) -> dict[str, list[Any]]:
    """Each output's elements, flat, from typed contents or raw_output_contents."""
    out: dict[str, list[Any]] = {}
    for i, o in enumerate(r.outputs):
        if r.raw_output_contents:
            raw = r.raw_output_contents[i]
            if o.datatype == "BYTES":
                values, pos = [], 0
                while pos < len(raw):
                    (size,) = struct.unpack_from("<I", raw, pos)
                    values.append(raw[pos + 4:pos + 4 + size])
                    pos += 4 + size
            else:
                fmt = "f" if o.datatype == "FP32" else "q"
                values = list(struct.unpack(f"<{len(raw) // 8 if fmt == 'q' else len(raw) // 4}{fmt}",
                                            raw))
        else:
            c = o.contents
            values = list({"FP32": c.fp32_contents, "INT64": c.int64_contents,
                           "BYTES": c.bytes_contents}[o.datatype])
        assert len(values) == math.prod(o.shape), (o.name, o.shape, len(values))
        out[o.name] = values
    return out


def _check_infer(r: kpb.ModelInferResponse, t: Target | None = None,
                 request: kpb.ModelInferRequest | None = None) -> None:
    """Any answer names the model and known outputs; given the request, it is also checked for
    what it must hold: the outputs asked for (all by default), one row per text, raw contents
    exactly when the request sent raw inputs, distributions that sum to 1, ranks in order,
    top_chars the vocabulary's characters for top_ids."""
    assert r.model_name == MODEL and r.outputs
    for out in r.outputs:
        assert out.name in ("probs", "top_ids", "top_chars", "top_probs")
    if t is None or request is None:
        return
    asked = [o.name for o in request.outputs] or ["probs", "top_ids", "top_chars", "top_probs"]
    assert [o.name for o in r.outputs] == asked
    assert r.id == request.id
    assert bool(r.raw_output_contents) == bool(request.raw_input_contents)
    n = request.inputs[0].shape[0]
    vocab = len(t.vocab_list)
    top_k = request.parameters["top_k"].int64_param if "top_k" in request.parameters else 0
    k = top_k or min(5, vocab)
    shapes = {"probs": [n, vocab], "top_ids": [n, k], "top_chars": [n, k], "top_probs": [n, k]}
    for o in r.outputs:
        assert list(o.shape) == shapes[o.name], (o.name, list(o.shape))
    values = _outputs(r)
    if "probs" in values:
        for row in range(n):
            p = values["probs"][row * vocab:(row + 1) * vocab]
            assert all(0.0 <= x <= 1.0 for x in p) and abs(sum(p) - 1.0) < 1e-4
    if "top_probs" in values:
        for row in range(n):
            ranked = values["top_probs"][row * k:(row + 1) * k]
            assert all(0.0 <= x <= 1.0 for x in ranked)
            assert ranked == sorted(ranked, reverse=True)
    if "top_ids" in values:
        assert all(0 <= i < vocab for i in values["top_ids"])
        if "top_chars" in values:
            assert values["top_chars"] == [t.vocab_list[i].encode() for i in values["top_ids"]]
        if "probs" in values and "top_probs" in values:
            for j, i in enumerate(values["top_ids"]):
                assert values["top_probs"][j] == values["probs"][(j // k) * vocab + i]


@given(data=st.data())
@FUZZ
def test_kserve_infer_fields(target: Target, data: st.DataObject) -> None:
    request = data.draw(infer_request())
    code, response = target.outcome("kserve.ModelInfer",
                                    lambda: target.kserve.ModelInfer(request, timeout=30))
    if code == "OK":
        _check_infer(response)


@st.composite
def declared_shape_request(draw: st.DrawFn) -> kpb.ModelInferRequest:
    """Right names and datatypes, any declared shape, few elements: the shape checks alone.
    (The loose requests above reach e.g. ids [0, 2**62] with no data about once in 3,000.)"""
    r = kpb.ModelInferRequest(model_name=MODEL)
    which = draw(st.sampled_from(["text", "ids", "ids+lengths"]))
    shapes = st.one_of(st.lists(DIM, max_size=3), EDGE_SHAPES)
    if which == "text":
        t = r.inputs.add(name="text", datatype="BYTES", shape=draw(shapes))
        t.contents.bytes_contents.extend(b"ab" for _ in range(draw(st.integers(0, 3))))
        return r
    t = r.inputs.add(name="ids", datatype="INT64",
                     shape=draw(shapes) if which == "ids" else [1, 2])
    t.contents.int64_contents.extend([1] * draw(st.integers(0, 3)) if which == "ids" else [1, 2])
    if which == "ids+lengths":
        lt = r.inputs.add(name="lengths", datatype="INT64", shape=draw(shapes))
        lt.contents.int64_contents.extend([2] * draw(st.integers(0, 2)))
    return r


@given(data=st.data())
@FUZZ
def test_kserve_infer_declared_shapes(target: Target, data: st.DataObject) -> None:
    request = data.draw(declared_shape_request())
    code, response = target.outcome("kserve.ModelInfer declared shapes",
                                    lambda: target.kserve.ModelInfer(request, timeout=30))
    if code == "OK":
        _check_infer(response)


@given(data=st.data())
@FUZZ
def test_kserve_infer_well_formed(target: Target, data: st.DataObject) -> None:
    request = data.draw(well_formed_infer_request(target))
    code, response = target.outcome("kserve.ModelInfer well-formed",
                                    lambda: target.kserve.ModelInfer(request, timeout=30))
    if code == "OK":
        _check_infer(response, target, request)


@given(data=st.data())
@FUZZ
def test_kserve_stream_infer_frames(target: Target, data: st.DataObject) -> None:
    # A frame is a well-formed request (kept, to check its answer), a field-level one, or bytes.
    frames: list[tuple[bytes, kpb.ModelInferRequest | None]] = data.draw(st.lists(st.one_of(
        well_formed_infer_request(target).map(lambda r: (r.SerializeToString(), r)),
        infer_request().map(lambda r: (r.SerializeToString(), None)),
        st.one_of(wire_message(), st.binary(max_size=100)).map(lambda b: (b, None))),
        min_size=1, max_size=4))
    code, responses = target.outcome(
        "kserve.ModelStreamInfer",
        lambda: list(target.raw_stream_infer(iter([f for f, _ in frames]), timeout=30)))
    if code == "OK":  # one answer per frame, in order
        assert len(responses) == len(frames)
    for body, (_, request) in zip(responses or [], frames, strict=False):
        r = kpb.ModelStreamInferResponse.FromString(body)
        if r.error_message:
            in_band = r.error_message.split(":", 1)[0]
            codes[f"kserve.ModelStreamInfer in-band {in_band}"] += 1
            assert in_band in STREAM_CODES, r.error_message
        else:
            codes["kserve.ModelStreamInfer in-band OK"] += 1
            _check_infer(r.infer_response, target, request)
