"""Every bad input gets its exact status code and a message naming what is wrong."""

from __future__ import annotations

import grpc
import pytest

from nextchar.client import NextCharClient, NextCharError
from nextchar.v1 import nextchar_pb2 as pb


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(NextCharError) as ei:
        call()
    return ei.value.code, ei.value.details


def test_no_texts(client: NextCharClient) -> None:
    code, msg = _code(lambda: client.predict([]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no texts" in msg


def test_empty_text_is_named(client: NextCharClient) -> None:
    code, msg = _code(lambda: client.predict(["abc", ""]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert msg.startswith("texts[1] is empty")


def test_too_many_texts(client: NextCharClient, tiny_server) -> None:
    limit = tiny_server.settings.max_texts_per_request
    code, msg = _code(lambda: client.predict(["a"] * (limit + 1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{limit + 1} > max_texts_per_request {limit}" in msg


def test_text_too_long(client: NextCharClient, tiny_server) -> None:
    limit = tiny_server.settings.max_chars_per_text
    code, msg = _code(lambda: client.predict(["ok", "a" * (limit + 1)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"texts[1] has {limit + 1} characters > max_chars_per_text {limit}" in msg


@pytest.mark.parametrize(
    ("text", "index", "shown", "pos"),
    [("hello wörld", 0, "'ö' (U+00F6)", 7), ("tab\there", 0, "'\\t' (U+0009)", 3)],
)
def test_unknown_character_named_with_position(client, text, index, shown, pos) -> None:
    code, msg = _code(lambda: client.predict([text]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert msg.startswith(f"texts[{index}]: character {shown} at position {pos} is not in the model's vocabulary")


@pytest.mark.parametrize("top_k", [10_000, 2**32 - 1])
def test_top_k_out_of_range(client: NextCharClient, top_k: int) -> None:
    code, msg = _code(lambda: client.predict(["abc"], top_k=top_k))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_k must be between 1 and" in msg


def test_invalid_utf8_is_invalid_argument_not_internal(tiny_server) -> None:
    # Python protobuf refuses to build such a message, so send the raw bytes: field 1 (texts),
    # wire type 2, length 2, bytes ff fe.
    raw = b"\x0a\x02\xff\xfe"
    with grpc.insecure_channel(tiny_server.address) as ch:
        call = ch.unary_unary("/nextchar.v1.NextChar/Predict",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as ei:
            call(raw, timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details() == (
        "request message does not decode: Error parsing message with type "
        "'nextchar.v1.PredictRequest': String field had bad UTF-8 (strings must be valid UTF-8)")


def test_a_corrupt_message_is_not_blamed_on_utf8(tiny_server) -> None:
    with grpc.insecure_channel(tiny_server.address) as ch:
        call = ch.unary_unary("/nextchar.v1.NextChar/Predict",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as ei:
            call(b"\x0a\x05ab", timeout=10)  # a string field claiming 5 bytes, 2 sent
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details() == (
        "request message does not decode: Error parsing message with type "
        "'nextchar.v1.PredictRequest': Wire format was corrupt (the bytes are not this "
        "method's request message: is the client's .proto the server's?)")


@pytest.mark.parametrize("method, request_", [
    ("Predict", pb.PredictRequest(texts=["hello"], priority=9)),
    ("Generate", pb.GenerateRequest(prompt="hello", max_chars=2, priority=7)),
])
def test_an_unknown_priority_is_refused(tiny_server, method: str, request_) -> None:
    """proto3 keeps enum numbers it does not know: a number no lane has is refused."""
    with grpc.insecure_channel(tiny_server.address) as ch:
        call = getattr(ch, "unary_unary" if method == "Predict" else "unary_stream")(
            f"/nextchar.v1.NextChar/{method}", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as ei:
            result = call(request_, timeout=10)
            if method == "Generate":
                list(result)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    number = request_.priority
    assert ei.value.details() == (
        f"priority must be PRIORITY_UNSPECIFIED (0, the high lane), PRIORITY_HIGH (1) or "
        f"PRIORITY_LOW (2), got {number}")


def test_load_without_a_name_is_refused(tiny_server) -> None:
    from nextchar.v1 import admin_pb2, admin_pb2_grpc

    with grpc.insecure_channel(tiny_server.address) as ch:
        with pytest.raises(grpc.RpcError) as ei:
            admin_pb2_grpc.AdminStub(ch).LoadModel(admin_pb2.LoadModelRequest(model=""), timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details() == "name the model to load (ListModels lists the repository's)"


def test_server_stays_up_after_errors(client: NextCharClient) -> None:
    for bad, starts in (([], "no texts"), ([""], "texts[0] is empty"),
                        (["\x00"], "texts[0]: character '\\x00' (U+0000) at position 0 is not")):
        code, msg = _code(lambda bad=bad: client.predict(bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (bad, code, msg)
        assert msg.startswith(starts), (bad, msg)
    preds = client.predict(["abc"], top_k=3)
    assert len(preds) == 1 and len(preds[0].top) == 3


def test_top_k_default_and_order(client: NextCharClient, tiny_server) -> None:
    (pred,) = client.predict(["the cat"])
    assert len(pred.top) == tiny_server.settings.default_top_k
    probs = [c.prob for c in pred.top]
    assert probs == sorted(probs, reverse=True)
    assert all(len(c.char) == 1 for c in pred.top)


def test_model_info_advertises_limits(client: NextCharClient, tiny_server, tiny_artifact) -> None:
    import json

    info = client.model_info()
    s = tiny_server.settings
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    assert list(info.vocab) == manifest["vocab"]
    assert info.backend == "onnx" and info.device == "cpu"
    assert info.version == manifest["version"]
    assert len(info.artifact_sha256) == 64
    assert info.limits.max_texts_per_request == s.max_texts_per_request
    assert info.limits.max_chars_per_text == s.max_chars_per_text
    assert info.limits.max_message_bytes == s.max_message_bytes
    assert (info.limits.max_queue_texts, info.limits.max_queue_chars,
            info.limits.low_max_queue_texts) == (s.max_queue_texts, s.max_queue_chars,
                                                 s.low_max_queue_texts)
    assert info.config.hidden_size == manifest["model"]["hidden_size"]


def test_health_serving(client: NextCharClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("nextchar.v1.NextChar") == "SERVING"


def test_response_carries_model_version(client: NextCharClient) -> None:
    resp = client.predict_response(pb.PredictRequest(texts=["abc"]))
    assert resp.model_version == client.model_info().version  # the model that answered


def test_an_answer_near_the_message_cap_is_refused_before_compute(start_server, tiny_artifact,
                                                                  tmp_path) -> None:
    """The size check counted only the predictions: with a long model name (a repository
    folder may have 255 bytes) answers just under the cap by that count failed after the
    compute, RESOURCE_EXHAUSTED "Sent message larger than max"."""
    import shutil

    name = "m" * 200
    shutil.copytree(tiny_artifact, tmp_path / "repo" / name / "1")
    st = start_server(model_repository=tmp_path / "repo", max_message_bytes=1024)
    codes = set()
    with NextCharClient(st.address) as c:
        for n in range(1, 40):
            try:
                c.predict(["abc"] * n, top_k=3, model=name)
                codes.add("OK")
            except NextCharError as e:
                codes.add(e.code.name)
                assert e.code == grpc.StatusCode.INVALID_ARGUMENT, e.details
                assert "> max_message_bytes 1024" in e.details
    assert codes == {"OK", "INVALID_ARGUMENT"}
