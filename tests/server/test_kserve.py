"""KServe V2 (`inference.GRPCInferenceService`) on the nextchar port, over real gRPC.

Answers are checked against nextchar.v1's Predict on the same server: the same batcher and
validation must give the same numbers. The last test drives the server with the real Triton
client (`tritonclient[grpc]`) from its own venv (.venv-triton; `make tritonclient-test`).
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from nextchar import __version__
from nextchar.client import NextCharClient
from nextchar.kserve import grpc_predict_v2_pb2 as pb
from nextchar.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from nextchar.server.errors import InvalidInput
from nextchar.server.v2_tensors import unpack_bytes
from nextchar.v1 import nextchar_pb2 as v1pb

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["hello world", "To be, or not to b", "Q"]


@pytest.fixture(scope="module")
def stub(tiny_server) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(tiny_server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def info(tiny_server) -> Any:
    with NextCharClient(tiny_server.address) as c:
        return c.model_info()


def _expected(address: str, texts: list[str], top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, probs) of nextchar.v1 Predict: the reference for every V2 answer."""
    with NextCharClient(address) as c:
        preds = c.predict(texts, top_k=top_k)
    ids = np.array([[cp.id for cp in p.top] for p in preds], dtype=np.int64)
    probs = np.array([[cp.prob for cp in p.top] for p in preds], dtype=np.float32)
    return ids, probs


def _text_input(texts: list[str], shape: list[int] | None = None) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=shape or [len(texts)],
        contents=pb.InferTensorContents(bytes_contents=[t.encode() for t in texts]))


def _request(info: Any, inputs: list[Any], top_k: int | None = None, **kw: Any) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=info.name, inputs=inputs, **kw)
    if top_k is not None:
        req.parameters["top_k"].int64_param = top_k
    return req


def _pack_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _unpack_bytes(raw: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(raw):
        (n,) = struct.unpack_from("<I", raw, pos)
        out.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def _outputs(resp: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Every output as an array of its shape, from typed contents or raw_output_contents."""
    out = {}
    for i, t in enumerate(resp.outputs):
        shape = list(t.shape)
        if resp.raw_output_contents:
            raw = resp.raw_output_contents[i]
            if t.datatype == "BYTES":
                arr = np.array([b.decode() for b in _unpack_bytes(raw)], dtype=object)
            else:
                arr = np.frombuffer(raw, dtype={"FP32": "<f4", "INT64": "<i8"}[t.datatype])
        elif t.datatype == "BYTES":
            arr = np.array([b.decode() for b in t.contents.bytes_contents], dtype=object)
        elif t.datatype == "FP32":
            arr = np.array(t.contents.fp32_contents, dtype=np.float32)
        else:
            arr = np.array(t.contents.int64_contents, dtype=np.int64)
        out[t.name] = arr.reshape(shape)
    return out


def _assert_matches_v1(out: dict[str, np.ndarray], info: Any, ids: np.ndarray, probs: np.ndarray) -> None:
    n, k = ids.shape
    assert np.array_equal(out["top_ids"], ids)
    assert out["top_probs"].dtype == np.float32
    assert np.array_equal(out["top_probs"], probs)
    assert out["top_chars"].tolist() == [[info.vocab[i] for i in row] for row in ids.tolist()]
    full = out["probs"]
    assert full.shape == (n, len(info.vocab))
    assert np.array_equal(np.take_along_axis(full, ids, axis=1), probs)
    assert np.array_equal(full.argmax(axis=1), ids[:, 0])
    np.testing.assert_allclose(full.sum(axis=1), 1.0, atol=1e-5)


def _code(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(request, timeout=30)
    return e.value.code(), e.value.details()


# -- health, readiness, metadata --------------------------------------------------------------


def test_live_ready_and_server_metadata(stub) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest()).live is True
    assert stub.ServerReady(pb.ServerReadyRequest()).ready is True
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert (meta.name, meta.version, list(meta.extensions)) == (
        "nextchar", __version__, ["model_repository", "statistics", "model_configuration",
                                 "schedule_policy"])


def test_model_ready_by_name_and_version(stub, info) -> None:
    assert stub.ModelReady(pb.ModelReadyRequest(name=info.name)).ready is True
    assert stub.ModelReady(pb.ModelReadyRequest(name=info.name, version=info.version)).ready is True


def test_model_metadata(stub, info) -> None:
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=info.name))
    assert (meta.name, list(meta.versions), meta.platform) == (
        info.name, [info.version], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("text", "BYTES", [-1, 1]), ("ids", "INT64", [-1, -1]), ("lengths", "INT64", [-1, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("probs", "FP32", [-1, len(info.vocab)]), ("top_ids", "INT64", [-1, -1]),
        ("top_chars", "BYTES", [-1, -1]), ("top_probs", "FP32", [-1, -1])]


def test_unknown_model_is_not_found(stub, info) -> None:
    code, details = _code(stub.ModelMetadata, pb.ModelMetadataRequest(name="nope"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert details == f"model 'nope' is not served here; models: {info.name}"


def test_unknown_version_is_not_found(stub, info) -> None:
    code, details = _code(stub.ModelMetadata, pb.ModelMetadataRequest(name=info.name, version="0"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert f"has no version '0' loaded; it serves version '{info.version}'" in details


def test_an_unknown_model_or_version_is_not_ready(stub, info) -> None:
    """Triton's ModelReady answers ready=false, not an error, for what it does not serve."""
    assert stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready is False
    assert stub.ModelReady(pb.ModelReadyRequest(name=info.name, version="0")).ready is False
    code, _ = _code(stub.ModelReady, pb.ModelReadyRequest(name=""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_readiness_follows_the_servers_own_state(stub, info, tiny_server) -> None:
    """The flag the app sets when warm and clears when draining drives both protocols."""
    plane = tiny_server.server.plane
    plane.accepting = False
    try:
        assert stub.ServerLive(pb.ServerLiveRequest()).live is True
        assert stub.ServerReady(pb.ServerReadyRequest()).ready is False
        assert stub.ModelReady(pb.ModelReadyRequest(name=info.name)).ready is False
        code, details = _code(stub.ModelInfer, _request(info, [_text_input(["hello"])]))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "not ready" in details
    finally:
        plane.accepting = True
    assert stub.ServerReady(pb.ServerReadyRequest()).ready is True


def test_unready_once_stopped(start_server, tiny_artifact) -> None:
    st = start_server(model=tiny_artifact, backend="onnx")
    with grpc.insecure_channel(st.address) as channel:
        s = pb_grpc.GRPCInferenceServiceStub(channel)
        assert s.ServerReady(pb.ServerReadyRequest(), timeout=10).ready is True
        st.call(st.server.stop(grace_s=0.5))
        with pytest.raises(grpc.RpcError) as e:
            s.ServerReady(pb.ServerReadyRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # port closed: nothing answers
    assert st.server.plane.accepting is False


def test_reflection_lists_the_service(tiny_server) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(tiny_server.address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "inference.GRPCInferenceService" in services
    assert "nextchar.v1.NextChar" in services


# -- inference ------------------------------------------------------------------------------


def test_text_typed_contents_match_v1_predict(stub, info, tiny_server) -> None:
    ids, probs = _expected(tiny_server.address, TEXTS, top_k=3)
    resp = stub.ModelInfer(_request(info, [_text_input(TEXTS)], top_k=3, id="req-7"))
    assert (resp.model_name, resp.model_version, resp.id) == (info.name, info.version, "req-7")
    assert not resp.raw_output_contents  # typed in, typed out
    assert [(t.name, t.datatype, list(t.shape)) for t in resp.outputs] == [
        ("probs", "FP32", [3, len(info.vocab)]), ("top_ids", "INT64", [3, 3]),
        ("top_chars", "BYTES", [3, 3]), ("top_probs", "FP32", [3, 3])]
    _assert_matches_v1(_outputs(resp), info, ids, probs)


def test_raw_inputs_get_raw_outputs(stub, info, tiny_server) -> None:
    ids, probs = _expected(tiny_server.address, TEXTS, top_k=4)
    req = _request(info, [pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[3, 1])], top_k=4)
    req.raw_input_contents.append(_pack_bytes([t.encode() for t in TEXTS]))
    resp = stub.ModelInfer(req)
    assert len(resp.raw_output_contents) == 4
    assert all(not t.HasField("contents") for t in resp.outputs)
    _assert_matches_v1(_outputs(resp), info, ids, probs)


def _ids_inputs(info: Any, texts: list[str], raw: bool, lengths: bool = True) -> tuple[list[Any], list[bytes]]:
    index = {c: i for i, c in enumerate(info.vocab)}
    lens = np.array([len(t) for t in texts], dtype=np.int64)
    ids = np.full((len(texts), int(lens.max())), 7, dtype=np.int64)  # padding is never read
    for row, t in enumerate(texts):
        ids[row, : len(t)] = [index[c] for c in t]
    tensors = [("ids", ids)] + ([("lengths", lens)] if lengths else [])
    inputs, raws = [], []
    for name, arr in tensors:
        t = pb.ModelInferRequest.InferInputTensor(name=name, datatype="INT64", shape=list(arr.shape))
        if raw:
            raws.append(arr.astype("<i8").tobytes())
        else:
            t.contents.int64_contents.extend(arr.ravel().tolist())
        inputs.append(t)
    return inputs, raws


@pytest.mark.parametrize("raw", [False, True])
def test_int64_ids_with_lengths_match_text(stub, info, tiny_server, raw: bool) -> None:
    ids, probs = _expected(tiny_server.address, TEXTS, top_k=5)
    inputs, raws = _ids_inputs(info, TEXTS, raw)
    req = _request(info, inputs, top_k=5, raw_input_contents=raws)
    out = _outputs(stub.ModelInfer(req))
    _assert_matches_v1(out, info, ids, probs)


def test_lengths_as_n_by_1_as_a_triton_client_sends_them(stub, info, tiny_server) -> None:
    """ModelConfig says lengths is dims [1] (a batched scalar): [N, 1] is taken as [N]."""
    ids, probs = _expected(tiny_server.address, TEXTS, top_k=5)
    inputs, _ = _ids_inputs(info, TEXTS, raw=False)
    inputs[1].shape[:] = [len(TEXTS), 1]
    out = _outputs(stub.ModelInfer(_request(info, inputs, top_k=5)))
    _assert_matches_v1(out, info, ids, probs)


def test_model_config_describes_what_the_server_takes(stub, info, tiny_server) -> None:
    from google.protobuf import json_format

    rt = tiny_server.server.runtime()
    delay = round(rt.settings.max_batch_delay_ms * 1000)
    got = stub.ModelConfig(pb.ModelConfigRequest(name=info.name)).config
    assert json_format.MessageToDict(got, preserving_proto_field_name=True) == {
        "name": info.name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
        "max_batch_size": rt.predictor.limits.max_texts_per_request,
        "input": [
            {"name": "text", "data_type": "TYPE_STRING", "dims": ["1"], "optional": True},
            {"name": "ids", "data_type": "TYPE_INT64", "dims": ["-1"], "optional": True},
            {"name": "lengths", "data_type": "TYPE_INT64", "dims": ["1"], "reshape": {},
             "optional": True}],
        "output": [
            {"name": "probs", "data_type": "TYPE_FP32", "dims": [str(len(info.vocab))]},
            {"name": "top_ids", "data_type": "TYPE_INT64", "dims": ["-1"]},
            {"name": "top_chars", "data_type": "TYPE_STRING", "dims": ["-1"]},
            {"name": "top_probs", "data_type": "TYPE_FP32", "dims": ["-1"]}],
        "instance_group": [{"name": info.name, "count": rt.backend.workers, "kind": "KIND_CPU"}],
        # proto3 JSON leaves out zeros: without a delay only the priority levels show.
        "dynamic_batching": {**({"max_queue_delay_microseconds": str(delay)} if delay else {}),
                             "priority_levels": "2", "default_priority_level": "1"},
    }
    # Triton derives each tensor's metadata shape from its config: -1 (the batch) + dims.
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=info.name))
    assert [(t.name, [-1, *t.dims]) for t in [*got.input, *got.output]] == \
        [(t.name, list(t.shape)) for t in [*meta.inputs, *meta.outputs]]
    assert got.input[2].HasField("reshape") and list(got.input[2].reshape.shape) == []
    same = stub.ModelConfig(pb.ModelConfigRequest(name=info.name, version=info.version)).config
    assert same == got
    assert _code(stub.ModelConfig, pb.ModelConfigRequest(name="nope"))[0] == \
        grpc.StatusCode.NOT_FOUND
    assert _code(stub.ModelConfig, pb.ModelConfigRequest(name=info.name, version="0"))[0] == \
        grpc.StatusCode.NOT_FOUND
    assert _code(stub.ModelConfig, pb.ModelConfigRequest(name=""))[0] == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_ids_without_lengths_use_full_rows(stub, info, tiny_server) -> None:
    texts = ["abcd", "dcba"]
    ids, probs = _expected(tiny_server.address, texts, top_k=2)
    inputs, _ = _ids_inputs(info, texts, raw=False, lengths=False)
    _assert_matches_v1(_outputs(stub.ModelInfer(_request(info, inputs, top_k=2))), info, ids, probs)


def test_default_top_k_and_output_selection(stub, info, tiny_server) -> None:
    ids, probs = _expected(tiny_server.address, ["hello"], top_k=0)
    req = _request(info, [_text_input(["hello"])], outputs=[
        pb.ModelInferRequest.InferRequestedOutputTensor(name="top_probs"),
        pb.ModelInferRequest.InferRequestedOutputTensor(name="top_chars")])
    resp = stub.ModelInfer(req)
    assert [t.name for t in resp.outputs] == ["top_probs", "top_chars"]  # asked for, in order
    out = _outputs(resp)
    assert out["top_probs"].shape == (1, info.limits.default_top_k)
    assert np.array_equal(out["top_probs"], probs)
    assert out["top_chars"].tolist() == [[info.vocab[i] for i in ids[0]]]


def test_requests_go_through_the_shared_batcher(stub, info, tiny_server) -> None:
    stats = tiny_server.server.runtime().batcher.stats
    before = stats.texts
    stub.ModelInfer(_request(info, [_text_input(TEXTS)]))
    assert stats.texts == before + len(TEXTS)


def test_stream_infer_answers_in_order_with_errors_in_band(stub, info, tiny_server) -> None:
    ids, probs = _expected(tiny_server.address, TEXTS, top_k=3)
    requests = [
        _request(info, [_text_input(TEXTS)], top_k=3, id="a"),
        _request(info, [_text_input(["x\u00e9"])], id="b"),
        pb.ModelInferRequest(model_name="nope", id="c", inputs=[_text_input(["hi"])]),
        _request(info, [_text_input(TEXTS)], top_k=3, id="d"),
    ]
    answers = list(stub.ModelStreamInfer(iter(requests), timeout=30))
    assert [a.infer_response.id for a in answers] == ["a", "b", "c", "d"]
    assert [a.error_message.split(":")[0] for a in answers] == [
        "", "INVALID_ARGUMENT", "NOT_FOUND", ""]
    assert "'\u00e9' (U+00E9) at position 1" in answers[1].error_message
    for a in (answers[0], answers[3]):
        _assert_matches_v1(_outputs(a.infer_response), info, ids, probs)


def _final_flag(value: Any) -> Any:
    p = pb.InferParameter()
    if isinstance(value, bool):
        p.bool_param = value
    else:
        p.string_param = value
    return p


def test_stream_marks_each_response_final_when_asked(stub, info) -> None:
    """tritonclient's enable_empty_final_response=True: every response (one per request here,
    errors too) carries triton_final_response=true; unasked, the parameter is absent."""
    asked = _request(info, [_text_input(["hello"])], id="a")
    asked.parameters["triton_enable_empty_final_response"].CopyFrom(_final_flag(True))
    failed = pb.ModelInferRequest(model_name="nope", id="b", inputs=[_text_input(["hi"])])
    failed.parameters["triton_enable_empty_final_response"].CopyFrom(_final_flag(True))
    plain = _request(info, [_text_input(["hello"])], id="c")
    wrong = _request(info, [_text_input(["hello"])], id="d")
    wrong.parameters["triton_enable_empty_final_response"].CopyFrom(_final_flag("yes"))
    answers = list(stub.ModelStreamInfer(iter([asked, failed, plain, wrong]), timeout=30))
    flags = [dict(a.infer_response.parameters).get("triton_final_response") for a in answers]
    assert [f.bool_param if f is not None else None for f in flags] == [True, True, None, None]
    assert [a.error_message.split(":")[0] for a in answers] == [
        "", "NOT_FOUND", "", "INVALID_ARGUMENT"]
    assert "triton_enable_empty_final_response must be a bool_param" in answers[3].error_message


def test_statistics_ignore_a_version_without_a_model_name(stub, info) -> None:
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="", version="no-such-version"))
    assert [m.name for m in stats.model_stats] == [info.name]


# -- errors: exact codes, actionable messages -----------------------------------------------


def _t(name: str, datatype: str, shape: list[int], **contents: Any) -> Any:
    return pb.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=shape, contents=pb.InferTensorContents(**contents))


BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("no model name", {"model_name": ""}, "model name is required"),
    ("no inputs", {"inputs": []}, "no inputs: send 'text' (BYTES [N])"),
    ("unknown input", {"inputs": [_t("prompt", "BYTES", [1], bytes_contents=[b"a"])]},
     "unknown input 'prompt'"),
    ("twice", {"inputs": [_t("text", "BYTES", [1], bytes_contents=[b"a"])] * 2},
     "input 'text' is given twice"),
    ("text as INT64", {"inputs": [_t("text", "INT64", [1], int64_contents=[1])]},
     "input 'text' must have datatype BYTES, got 'INT64'"),
    ("count mismatch", {"inputs": [_t("text", "BYTES", [2], bytes_contents=[b"a"])]},
     "input 'text': shape [2] needs 2 BYTES elements, contents.bytes_contents holds 1"),
    ("text 2-D", {"inputs": [_t("text", "BYTES", [1, 2], bytes_contents=[b"a", b"b"])]},
     "input 'text' must have shape [N] or [N, 1] (one text per row), got [1, 2]"),
    ("negative dim", {"inputs": [_t("text", "BYTES", [-1], bytes_contents=[b"a"])]},
     "shape [-1] has a negative dimension"),
    ("bad utf-8", {"inputs": [_t("text", "BYTES", [1], bytes_contents=[b"ab\xff"])]},
     "text[0] is not valid UTF-8: invalid start byte at byte 2"),
    ("empty text", {"inputs": [_t("text", "BYTES", [2], bytes_contents=[b"a", b""])]},
     "texts[1] is empty"),
    ("out of vocab", {"inputs": [_t("text", "BYTES", [1], bytes_contents=[b"ab~"])]},
     "character '~' (U+007E) at position 2 is not in the model's vocabulary"),
    ("text and ids", {"inputs": [_t("text", "BYTES", [1], bytes_contents=[b"a"]),
                                 _t("ids", "INT64", [1, 1], int64_contents=[1])]},
     "send either 'text' or 'ids' (+ 'lengths'), not both"),
    ("lengths alone", {"inputs": [_t("lengths", "INT64", [1], int64_contents=[1])]},
     "'lengths' needs an 'ids' input"),
    ("ids 1-D", {"inputs": [_t("ids", "INT64", [2], int64_contents=[1, 2])]},
     "input 'ids' must have shape [N, T] with T >= 1, got [2]"),
    # No rows and a huge other dimension: no elements to count, and numpy cannot reshape to
    # it (this was INTERNAL, "array is too big").
    ("ids no rows", {"inputs": [_t("ids", "INT64", [0, 2**62])]},
     "input 'ids': shape [0, 4611686018427387904] has no rows: send at least one text"),
    ("lengths no rows", {"inputs": [_t("ids", "INT64", [1, 1], int64_contents=[1]),
                                    _t("lengths", "INT64", [0, 2**62])]},
     "input 'lengths': shape [0, 4611686018427387904] has no rows: send at least one text"),
    ("lengths 0 inside", {"inputs": [_t("ids", "INT64", [1, 1], int64_contents=[1]),
                                     _t("lengths", "INT64", [33, 2**62, 0])]},
     "input 'lengths': shape [33, 4611686018427387904, 0] has a 0 dimension, so no elements"),
    ("text no rows", {"inputs": [_t("text", "BYTES", [0])]},
     "input 'text': shape [0] has no rows: send at least one text"),
    ("raw BYTES past the shape", {"inputs": [pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[1])],
        "raw_input_contents": [_pack_bytes([b"a", b"b", b"c"])]},
     "input 'text': shape [1] needs 1 BYTES elements, the raw content holds more"),
    ("ids as INT32", {"inputs": [_t("ids", "INT32", [1, 1], int_contents=[1])]},
     "input 'ids' must have datatype INT64, got 'INT32'"),
    ("id out of range", {"inputs": [_t("ids", "INT64", [1, 3], int64_contents=[1, 2, 999])]},
     "ids[0][2] = 999 is not a vocabulary id"),
    ("negative id", {"inputs": [_t("ids", "INT64", [1, 2], int64_contents=[-1, 2])]},
     "ids[0][0] = -1 is not a vocabulary id"),
    ("length 0", {"inputs": [_t("ids", "INT64", [2, 2], int64_contents=[1, 2, 3, 4]),
                             _t("lengths", "INT64", [2], int64_contents=[2, 0])]},
     "lengths[1] = 0 is outside 1..2"),
    ("length > T", {"inputs": [_t("ids", "INT64", [1, 2], int64_contents=[1, 2]),
                               _t("lengths", "INT64", [1], int64_contents=[3])]},
     "lengths[0] = 3 is outside 1..2"),
    ("lengths shape", {"inputs": [_t("ids", "INT64", [2, 1], int64_contents=[1, 2]),
                                  _t("lengths", "INT64", [1], int64_contents=[1])]},
     "lengths must have shape [2] or [2, 1] (one per ids row), got [1]"),
    ("lengths 0-d", {"inputs": [_t("ids", "INT64", [1, 1], int64_contents=[1]),
                                _t("lengths", "INT64", [], int64_contents=[1])]},
     "lengths must have shape [1] or [1, 1] (one per ids row), got []"),
    ("unknown output", {"outputs": [pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")]},
     "unknown output 'logits': this model has probs, top_ids, top_chars, top_probs"),
    ("output twice", {"outputs": [pb.ModelInferRequest.InferRequestedOutputTensor(name="probs")] * 2},
     "output 'probs' is requested twice"),
    ("raw count", {"raw_input_contents": [b"", b""]},
     "raw_input_contents has 2 entries for 1 inputs"),
    ("raw and typed", {"raw_input_contents": [_pack_bytes([b"a"])]},
     "an input has 'contents' while raw_input_contents is used"),
]


@pytest.mark.parametrize("case, fields, message", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_are_invalid_argument(stub, info, case: str, fields: dict[str, Any], message: str) -> None:
    req = _request(info, [_text_input(["hello"])])
    for name, value in fields.items():
        req.ClearField(name)
        if isinstance(value, list):
            getattr(req, name).extend(value)
        else:
            setattr(req, name, value)
    code, details = _code(stub.ModelInfer, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert message in details


def test_refused_calls_give_their_lease_back(stub, info, tiny_server) -> None:
    """A refused call must not keep the runtime leased: a leased runtime never closes, so an
    unload or a reload of that model would wait for it for good."""
    req = _request(info, [_t("ids", "INT64", [1, 1], int64_contents=[1]),
                          _t("lengths", "INT64", [], int64_contents=[1])])
    for _ in range(3):
        assert _code(stub.ModelInfer, req)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert tiny_server.server.registry.serving(info.name).calls == 0


@pytest.mark.parametrize("raw, message", [
    (b"\x05\x00\x00\x00ab", "raw BYTES element 0 claims 5 bytes but only 2 remain"),
    (b"\x01\x00", "raw BYTES content is truncated at byte 0"),
])
def test_malformed_raw_bytes(stub, info, raw: bytes, message: str) -> None:
    req = _request(info, [pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1])])
    req.raw_input_contents.append(raw)
    code, details = _code(stub.ModelInfer, req)
    assert (code, message in details) == (grpc.StatusCode.INVALID_ARGUMENT, True), details


def test_raw_int64_must_be_whole_elements(stub, info) -> None:
    req = _request(info, [pb.ModelInferRequest.InferInputTensor(name="ids", datatype="INT64", shape=[1, 1])],
                   raw_input_contents=[b"\x01\x00\x00"])
    code, details = _code(stub.ModelInfer, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw content of 3 bytes is not a whole number of INT64 elements" in details


@pytest.mark.parametrize("set_param, message", [
    (lambda p: setattr(p, "int64_param", 10_000), "top_k must be between 1 and"),
    (lambda p: setattr(p, "int64_param", -1), "top_k must be between 1 and"),
    (lambda p: setattr(p, "string_param", "3"), "parameter top_k must be an integer (int64_param), got string_param"),
])
def test_bad_top_k(stub, info, set_param: Any, message: str) -> None:
    req = _request(info, [_text_input(["hello"])])
    set_param(req.parameters["top_k"])
    code, details = _code(stub.ModelInfer, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details


def test_timeout_parameter_bounds_the_wait_in_the_queue(start_server, tiny_artifact) -> None:
    """Triton's schedule-policy `timeout` (microseconds; tritonclient's infer(timeout=)). With
    a 50 ms batch delay a lone request waits in the queue: 1 us is over before a worker takes
    it (without a delay it may not be: the loop's clock moves in milliseconds), 60 s is not,
    0 is none."""
    st = start_server(model=tiny_artifact, backend="onnx", max_batch_delay_ms=50)
    with grpc.insecure_channel(st.address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        name = stub.RepositoryIndex(pb.RepositoryIndexRequest()).models[0].name

        def with_timeout(set_param: Any) -> pb.ModelInferRequest:
            req = pb.ModelInferRequest(model_name=name, inputs=[_text_input(["hello"])])
            req.parameters["top_k"].int64_param = 2
            set_param(req.parameters["timeout"])
            return req

        assert _code(stub.ModelInfer, with_timeout(lambda p: setattr(p, "int64_param", 1))) == (
            grpc.StatusCode.DEADLINE_EXCEEDED, "deadline expired while queued")
        ids, _ = _expected(st.address, ["hello"], 2)
        for field, micros in (("int64_param", 60_000_000), ("int64_param", 0),
                              ("uint64_param", 60_000_000)):
            out = _outputs(stub.ModelInfer(
                with_timeout(lambda p, f=field, m=micros: setattr(p, f, m)), timeout=30))
            np.testing.assert_array_equal(out["top_ids"], ids)
        assert _code(stub.ModelInfer, with_timeout(lambda p: setattr(p, "int64_param", -5))) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "parameter timeout must be microseconds between 0 (none) and 9223372036854775, got -5")
        assert _code(stub.ModelInfer, with_timeout(lambda p: setattr(p, "double_param", 1.5))) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "parameter timeout must be an integer (int64_param), got double_param")
        stream = list(stub.ModelStreamInfer(iter([with_timeout(
            lambda p: setattr(p, "int64_param", 1))]), timeout=30))
        assert [r.error_message for r in stream] == ["DEADLINE_EXCEEDED: deadline expired while queued"]


def test_timeout_parameter_only_shortens_the_calls_deadline() -> None:
    from nextchar.server.v2_tensors import deadline_with_timeout

    async def check() -> None:
        now = asyncio.get_running_loop().time()
        assert deadline_with_timeout(None, 0) is None
        assert deadline_with_timeout(now + 5.0, 0) == now + 5.0
        assert deadline_with_timeout(now + 5.0, 60_000_000) == now + 5.0  # never extended
        assert now + 0.9 < deadline_with_timeout(now + 5.0, 1_000_000) < now + 1.9
        assert now + 0.9 < deadline_with_timeout(None, 1_000_000) < now + 1.9

    asyncio.run(check())


def test_unknown_model_or_version_on_infer_is_not_found(stub, info) -> None:
    req = _request(info, [_text_input(["hello"])])
    req.model_name = "other"
    assert _code(stub.ModelInfer, req)[0] == grpc.StatusCode.NOT_FOUND
    req.model_name, req.model_version = info.name, "v-does-not-exist"
    assert _code(stub.ModelInfer, req)[0] == grpc.StatusCode.NOT_FOUND


def test_too_many_texts_uses_the_shared_limit(start_server, tiny_artifact) -> None:
    st = start_server(model=tiny_artifact, backend="onnx", max_texts_per_request=2)
    with grpc.insecure_channel(st.address) as channel, NextCharClient(st.address) as c:
        name = c.model_info().name
        req = pb.ModelInferRequest(model_name=name, inputs=[_text_input(["a", "b", "c"])])
        code, details = _code(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "too many texts: 3 > max_texts_per_request 2; split the request"


# -- the real Triton client -------------------------------------------------------------------


def _triton_python() -> Path:
    """.venv-triton's python, built on demand by the Makefile target if it is missing."""
    venv = Path(os.environ.get("NEXTCHAR_TRITON_VENV", REPO / ".venv-triton"))
    python = venv / "bin" / "python"
    if not (venv / ".installed").is_file():
        proc = subprocess.run(["make", "-C", str(REPO), "triton-venv", f"TRITON_VENV={venv}"],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"could not build {venv} (needs PyPI): {proc.stderr[-2000:]}")
    return python


def test_tritonclient_against_nextchar(tiny_server, info, tmp_path: Path) -> None:
    python = _triton_python()
    top_k = 3
    with NextCharClient(tiny_server.address) as c:
        preds = c.predict(TEXTS, top_k=top_k)
    expected = {
        "model": info.name, "version": info.version, "server_version": __version__,
        "vocab": list(info.vocab), "top_k": top_k, "texts": TEXTS,
        "predictions": [[{"id": cp.id, "char": cp.char, "prob": cp.prob} for cp in p.top]
                        for p in preds],
    }
    expect = tmp_path / "expected.json"
    expect.write_text(json.dumps(expected), encoding="utf-8")
    script = REPO / "tests" / "compat" / "triton_client_check.py"
    proc = subprocess.run([str(python), str(script), "--url", tiny_server.address,
                           "--expect", str(expect)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "20 checks passed" in proc.stdout, proc.stdout
    print(proc.stdout.strip(), file=sys.stderr)


def test_raw_bytes_stop_decoding_at_the_first_element_past_the_shape() -> None:
    """A million empty elements and then a truncated one: refused for the count, at element 2,
    so the decoder never reached the truncation a million elements on (the event loop would
    spend about a second on 16 MB of them)."""
    raw = b"\0\0\0\0" * 1_000_000 + b"\xff"
    with pytest.raises(InvalidInput) as e:
        unpack_bytes(raw, "text", 1, [1])
    assert str(e.value) == "input 'text': shape [1] needs 1 BYTES elements, the raw content holds more"
    with pytest.raises(InvalidInput) as e:  # given room for all of them, it reaches the end
        unpack_bytes(raw, "text", 2_000_000, [2_000_000])
    assert "truncated at byte 4000000" in str(e.value)


def test_every_refused_infer_counts_as_a_failure_in_the_statistics(start_server,
                                                                   tiny_artifact) -> None:
    """Whichever layer refuses it (the tensor decoding or the model's own checks), over gRPC or
    REST, a refused infer of a served model is one `fail` in ModelStatistics."""
    from http_util import call

    st = start_server(model=tiny_artifact)
    with grpc.insecure_channel(st.address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        name = st.server.runtime().name
        refused = [_t("text", "INT32", [1], int_contents=[1]),  # the codec's
                   _t("text", "BYTES", [1], bytes_contents=[b"\xff"]),
                   _t("text", "BYTES", [1], bytes_contents=[b"a~"]),  # the predictor's
                   _t("text", "BYTES", [1], bytes_contents=[b""])]
        for tensor in refused:
            code, _ = _code(stub.ModelInfer, pb.ModelInferRequest(model_name=name, inputs=[tensor]))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
        bad_priority = pb.ModelInferRequest(model_name=name, inputs=[_text_input(["hi"])])
        bad_priority.parameters["priority"].int64_param = 9
        assert _code(stub.ModelInfer, bad_priority)[0] == grpc.StatusCode.INVALID_ARGUMENT
        for body in ({"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1]}]},
                     {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                  "data": ["a~"]}]}):
            assert call(st.http_url, "POST", f"/v2/models/{name}/infer", body).status == 400
        # nextchar.v1's Predict too: its model checks, and its priority enum.
        v1 = ch.unary_unary("/nextchar.v1.NextChar/Predict",
                            request_serializer=lambda m: m.SerializeToString(),
                            response_deserializer=lambda b: b)
        for request in (v1pb.PredictRequest(texts=["a~"]), v1pb.PredictRequest(texts=["hi"],
                                                                                 priority=9)):
            assert _code(v1, request)[0] == grpc.StatusCode.INVALID_ARGUMENT
        stub.ModelInfer(pb.ModelInferRequest(model_name=name, inputs=[_text_input(["hi"])]))
        (s,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name=name)).model_stats
    assert (s.inference_stats.fail.count, s.inference_stats.success.count) == (9, 1)
    assert s.inference_count == 1


def test_statistics_over_rest_are_the_grpc_ones(start_server, tiny_artifact) -> None:
    """Triton's statistics extension over HTTP (GET /v2/models[/{name}[/versions/{v}]]/stats,
    what tritonclient.http's get_inference_statistics reads): the gRPC document in Triton's
    JSON, numbers as numbers."""
    from google.protobuf import json_format
    from http_util import call

    st = start_server(model=tiny_artifact)
    name, version = st.server.runtime().name, st.server.runtime().version
    with grpc.insecure_channel(st.address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        stub.ModelInfer(pb.ModelInferRequest(model_name=name, inputs=[_text_input(["hi", "a"])]))
        assert _code(stub.ModelInfer, pb.ModelInferRequest(model_name=name, inputs=[
            _text_input(["a~"])]))[0] == grpc.StatusCode.INVALID_ARGUMENT
        grpc_doc = json_format.MessageToDict(
            stub.ModelStatistics(pb.ModelStatisticsRequest(name=name)),
            preserving_proto_field_name=True)
    for path in ("/v2/models/stats", f"/v2/models/{name}/stats",
                 f"/v2/models/{name}/versions/{version}/stats"):
        r = call(st.http_url, "GET", path)
        assert r.status == 200, r.body
        doc = r.json()
        (s,) = doc["model_stats"]
        assert (s["name"], s["version"], s["inference_count"]) == (name, version, 2)
        assert s["inference_stats"]["success"]["count"] == 1
        assert s["inference_stats"]["fail"]["count"] == 1
        # Triton's eight, zeros included (perf_analyzer reads every one without a check).
        assert set(s["inference_stats"]) == {"success", "fail", "queue", "compute_input",
                                             "compute_infer", "compute_output", "cache_hit",
                                             "cache_miss"}
        assert s["inference_stats"]["compute_input"] == {"count": 0, "ns": 0}
        assert json_format.ParseDict(doc, pb.ModelStatisticsResponse()) == json_format.ParseDict(
            grpc_doc, pb.ModelStatisticsResponse())
    r = call(st.http_url, "GET", f"/v2/models/{name}/versions/nope/stats")
    assert (r.status, r.json()) == (404, {"error": f"model '{name}' has no version 'nope' loaded"})
    assert "statistics" in call(st.http_url, "GET", "/v2").json()["extensions"]


def test_shared_memory_tensors_are_refused_saying_so(stub, info, tiny_server) -> None:
    """Triton's shared-memory extension is not served: an output naming a region was answered
    inline with OK (a client then read its output from a region nothing wrote), and an input
    naming one was refused as a shape error. Both transports, inputs and outputs."""
    from http_util import call

    said = ("shared memory is not supported by this server (Triton's shared-memory "
            "extension): send the data in the request and read the outputs from the response")
    region = {"shared_memory_region": pb.InferParameter(string_param="r1"),
              "shared_memory_byte_size": pb.InferParameter(int64_param=64)}
    out = pb.ModelInferRequest.InferRequestedOutputTensor(name="probs", parameters=region)
    code, details = _code(stub.ModelInfer, pb.ModelInferRequest(
        model_name=info.name, inputs=[_text_input(["ab"])], outputs=[out]))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, f"output 'probs': {said}")
    shm_input = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1],
                                                      parameters=region)
    code, details = _code(stub.ModelInfer, pb.ModelInferRequest(model_name=info.name,
                                                                inputs=[shm_input]))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, f"input 'text': {said}")
    params = {"shared_memory_region": "r1", "shared_memory_byte_size": 64}
    for body, where in (
            ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["ab"]}],
              "outputs": [{"name": "top_ids", "parameters": params}]}, "output 'top_ids'"),
            ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                          "parameters": params}]}, "input 'text'")):
        r = call(tiny_server.http_url, "POST", f"/v2/models/{info.name}/infer", body)
        assert (r.status, r.json()) == (400, {"error": f"{where}: {said}"})
