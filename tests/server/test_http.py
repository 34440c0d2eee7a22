"""The HTTP front end (server/http/) on an in-process server: KServe V2 REST, OpenAI-compatible
completions, nextchar JSON; parity with gRPC (nextchar.v1 and KServe V2) on the same server;
errors in each protocol's shape; tokens, TLS, request ids, deadlines, limits, metrics, drain."""

from __future__ import annotations

import base64
import json
import math
import shutil
import socket
import ssl
import struct
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from http_util import Reply, call

from nextchar.client import NextCharClient
from nextchar.kserve import grpc_predict_v2_pb2 as kpb
from nextchar.kserve import grpc_predict_v2_pb2_grpc as kpb_grpc

TEXTS = ["hello worl", "To be, or not to b", "a"]
TOKEN = "http-token-0123456789abcdef"


@pytest.fixture(scope="module")
def name(tiny_server) -> str:
    return tiny_server.server.runtime().name


def v2(st, method: str, path: str, body=None, **kw) -> Reply:
    return call(st.http_url, method, path, body, **kw)


def text_input(texts: list[str]) -> dict:
    return {"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}


# -- KServe V2 REST ---------------------------------------------------------------------------
def test_v2_server_and_model_metadata_and_health(tiny_server, name: str) -> None:
    r = v2(tiny_server, "GET", "/v2")
    assert r.status == 200 and r.json()["name"] == "nextchar"
    assert v2(tiny_server, "GET", "/v2/health/live").json() == {"live": True}
    assert v2(tiny_server, "GET", "/v2/health/ready").json() == {"ready": True}
    rt = tiny_server.server.runtime()
    meta = v2(tiny_server, "GET", f"/v2/models/{name}").json()
    assert meta["name"] == name and meta["versions"] == [rt.version]
    assert meta["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("text", "BYTES", [-1, 1]), ("ids", "INT64", [-1, -1]), ("lengths", "INT64", [-1, 1])]
    assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [
        ("probs", "FP32"), ("top_ids", "INT64"), ("top_chars", "BYTES"), ("top_probs", "FP32")]
    assert meta["outputs"][0]["shape"] == [-1, rt.artifact.vocab_size]
    assert v2(tiny_server, "GET", f"/v2/models/{name}/versions/{rt.version}").json() == meta
    assert v2(tiny_server, "GET", f"/v2/models/{name}/ready").json() == {"name": name,
                                                                        "ready": True}
    r = v2(tiny_server, "GET", f"/v2/models/{name}/versions/nope/ready")
    assert r.status == 404 and "no version 'nope'" in r.json()["error"]
    r = v2(tiny_server, "GET", "/v2/models/nope")
    assert r.status == 404 and set(r.json()) == {"error"}
    index = v2(tiny_server, "POST", "/v2/repository/index", {}).json()
    assert [(m["name"], m["state"]) for m in index] == [(name, "READY")]


def test_v2_model_config_is_the_grpc_one_in_tritons_json(tiny_server, name: str) -> None:
    """Triton's JSON form: proto field names, enum names, dims as numbers (not proto3 JSON's
    strings); the same content as the gRPC ModelConfig RPC."""
    from google.protobuf import json_format

    rt = tiny_server.server.runtime()
    config = v2(tiny_server, "GET", f"/v2/models/{name}/config").json()
    assert config["max_batch_size"] == rt.predictor.limits.max_texts_per_request
    assert config["output"][0] == {"name": "probs", "data_type": "TYPE_FP32",
                                   "dims": [rt.artifact.vocab_size]}
    assert v2(tiny_server, "GET", f"/v2/models/{name}/versions/{rt.version}/config").json() == \
        config
    with grpc.insecure_channel(tiny_server.address) as ch:
        via_grpc = kpb_grpc.GRPCInferenceServiceStub(ch).ModelConfig(
            kpb.ModelConfigRequest(name=name)).config
    assert json_format.ParseDict(config, kpb.ModelConfig()) == via_grpc
    r = v2(tiny_server, "GET", "/v2/models/nope/config")
    assert r.status == 404 and set(r.json()) == {"error"}


def test_v2_infer_equals_grpc_kserve_and_nextchar_v1(tiny_server, name: str) -> None:
    """The same texts: the same top-k over V2 REST, V2 gRPC and nextchar.v1 (<= 1e-6)."""
    k = 4
    r = v2(tiny_server, "POST", f"/v2/models/{name}/infer",
           {"id": "req-1", "parameters": {"top_k": k}, "inputs": [text_input(TEXTS)]})
    assert r.status == 200, r.body
    doc = r.json()
    assert doc["id"] == "req-1" and doc["model_name"] == name
    out = {o["name"]: o for o in doc["outputs"]}
    assert list(out) == ["probs", "top_ids", "top_chars", "top_probs"]
    n = len(TEXTS)
    assert out["top_ids"]["shape"] == [n, k] and out["top_chars"]["shape"] == [n, k]
    rest_ids = np.array(out["top_ids"]["data"]).reshape(n, k)
    rest_probs = np.array(out["top_probs"]["data"]).reshape(n, k)
    probs = np.array(out["probs"]["data"]).reshape(out["probs"]["shape"])
    assert np.array_equal(probs[np.arange(n)[:, None], rest_ids], rest_probs)
    with NextCharClient(tiny_server.address) as c:
        preds = c.predict(TEXTS, top_k=k)
    with grpc.insecure_channel(tiny_server.address) as ch:
        req = kpb.ModelInferRequest(model_name=name)
        req.parameters["top_k"].int64_param = k
        t = req.inputs.add(name="text", datatype="BYTES", shape=[n])
        t.contents.bytes_contents.extend(s.encode() for s in TEXTS)
        req.outputs.add(name="top_ids")
        req.outputs.add(name="top_probs")
        g = kpb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req)
    grpc_ids = np.array(g.outputs[0].contents.int64_contents).reshape(n, k)
    grpc_probs = np.array(g.outputs[1].contents.fp32_contents).reshape(n, k)
    v1_ids = np.array([[cp.id for cp in p.top] for p in preds])
    v1_probs = np.array([[cp.prob for cp in p.top] for p in preds])
    assert np.array_equal(rest_ids, grpc_ids) and np.array_equal(rest_ids, v1_ids)
    assert np.abs(rest_probs - grpc_probs).max() <= 1e-6
    assert np.abs(rest_probs - v1_probs).max() <= 1e-6
    chars = [[cp.char for cp in p.top] for p in preds]
    assert np.array(out["top_chars"]["data"]).reshape(n, k).tolist() == chars


def test_v2_timeout_parameter_bounds_the_wait_in_the_queue(start_server, tiny_artifact) -> None:
    """Triton's schedule-policy `timeout` in microseconds, as over gRPC (test_kserve.py): with a
    50 ms batch delay, 1 us is over before a worker takes the request (504, the V2 error body);
    60 s is not."""
    st = start_server(model=tiny_artifact, backend="onnx", max_batch_delay_ms=50)
    with NextCharClient(st.address) as c:
        name = c.model_info().name
        ids = [cp.id for cp in c.predict(["hello"], top_k=2)[0].top]
    body = {"inputs": [text_input(["hello"])], "parameters": {"top_k": 2, "timeout": 1}}
    r = v2(st, "POST", f"/v2/models/{name}/infer", body)
    assert (r.status, r.json()) == (504, {"error": "deadline expired while queued"})
    body["parameters"]["timeout"] = 60_000_000
    r = v2(st, "POST", f"/v2/models/{name}/infer", body)
    assert r.status == 200, r.body
    assert {o["name"]: o["data"] for o in r.json()["outputs"]}["top_ids"] == ids


def test_v2_infer_ids_nested_data_outputs_and_binary(tiny_server, name: str) -> None:
    vocab = tiny_server.server.runtime().artifact.vocab
    ids = [[vocab.index(ch) for ch in "hello"], [vocab.index(ch) for ch in "ab"] + [0, 0, 0]]
    body = {"inputs": [{"name": "ids", "datatype": "INT64", "shape": [2, 5], "data": ids},
                       {"name": "lengths", "datatype": "INT64", "shape": [2], "data": [5, 2]}],
            "outputs": [{"name": "top_chars"}]}
    doc = v2(tiny_server, "POST", f"/v2/models/{name}/infer", body).json()
    by_text = v2(tiny_server, "POST", f"/v2/models/{name}/infer",
                 {"inputs": [text_input(["hello", "ab"])], "outputs": [{"name": "top_chars"}]})
    assert [o["name"] for o in doc["outputs"]] == ["top_chars"]
    assert doc["outputs"] == by_text.json()["outputs"]
    # Binary-tensor extension: text in as 4-byte length + bytes, probs out as raw FP32.
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in ["hello", "ab"])
    head = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2],
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "outputs": [{"name": "probs", "parameters": {"binary_data": True}},
                                   {"name": "top_chars"}]}).encode()
    r = v2(tiny_server, "POST", f"/v2/models/{name}/infer", raw=head + raw,
           headers={"inference-header-content-length": str(len(head)),
                    "content-type": "application/octet-stream"})
    assert r.status == 200, r.body
    n = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.body[:n])
    assert meta["outputs"][1]["data"] == by_text.json()["outputs"][0]["data"]
    size = meta["outputs"][0]["parameters"]["binary_data_size"]
    assert size == 2 * len(vocab) * 4 and len(r.body) == n + size
    probs = np.frombuffer(r.body[n : n + size], dtype="<f4").reshape(2, len(vocab))
    # The same float32 values as the JSON answer's, row for row (a sum would miss a row swap
    # or a shuffled row), and the JSON top-k are those rows' own entries.
    as_json = {o["name"]: o for o in v2(tiny_server, "POST", f"/v2/models/{name}/infer", {
        "inputs": [text_input(["hello", "ab"])], "parameters": {"top_k": 3},
        "outputs": [{"name": "probs"}, {"name": "top_ids"}, {"name": "top_probs"}]}).json()[
        "outputs"]}
    assert as_json["probs"]["shape"] == [2, len(vocab)]
    assert np.array_equal(probs, np.array(as_json["probs"]["data"], dtype=np.float32).reshape(
        2, len(vocab)))
    top_ids = np.array(as_json["top_ids"]["data"]).reshape(2, 3)
    assert np.array_equal(np.take_along_axis(probs, top_ids, axis=1),
                          np.array(as_json["top_probs"]["data"], dtype=np.float32).reshape(2, 3))
    assert not np.array_equal(probs[0], probs[1])  # two different rows: a swap would show


@pytest.mark.parametrize("length", ["1_3", "+13", "0x1f", "-1", "x", "999"])
def test_v2_a_header_length_that_is_not_digits_within_the_body_is_400(tiny_server, name: str,
                                                                     length: str) -> None:
    """As HTTP's Content-Length: ASCII digits only. int() alone would read "1_3" and "+13" as 13
    and split the body there."""
    head = json.dumps({"inputs": [text_input(["hello"])]}).encode()
    assert len(head) > 13
    r = v2(tiny_server, "POST", f"/v2/models/{name}/infer", raw=head,
           headers={"inference-header-content-length": length})
    assert r.status == 400, r.body
    assert r.json() == {"error": f"Inference-Header-Content-Length {length!r} is not a length "
                                 f"within the body ({len(head)} bytes)"}


@pytest.mark.parametrize(("body", "fragment"), [
    ({"inputs": []}, "no inputs"),
    ({"inputs": [{"name": "text", "datatype": "INT64", "shape": [1], "data": [1]}]},
     "must have datatype BYTES"),
    ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a"]}]},
     "needs 2 BYTES elements"),
    ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}]},
     "unknown input"),
    ({"inputs": [text_input(["a~"])]}, "not in the model's vocabulary"),
    ({"inputs": [text_input([""])]}, "empty"),
    ({"inputs": [text_input(["a"])], "parameters": {"top_k": 10_000}}, "top_k"),
    ({"inputs": [text_input(["a"])], "parameters": {"top_k": "3"}}, "integer"),
    ({"inputs": [text_input(["a"])], "parameters": {"priority": 7}}, "priority"),
    ({"inputs": [text_input(["a"])], "parameters": {"timeout": -1}},
     "parameter timeout must be microseconds between 0 (none) and 9223372036854775, got -1"),
    ({"inputs": [text_input(["a"])], "parameters": {"timeout": 1.5}},
     "parameter timeout must be an integer, got 1.5"),
    ({"inputs": [text_input(["a"])], "outputs": [{"name": "nope"}]}, "unknown output"),
    ({"inputs": [{"name": "ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 1.5]}]},
     "integer"),
    ([1, 2], "JSON object"),
    # No rows and a huge other dimension (this was a 500: numpy cannot reshape to it).
    ({"inputs": [{"name": "ids", "datatype": "INT64", "shape": [0, 2**62], "data": []}]},
     "input 'ids': shape [0, 4611686018427387904] has no rows: send at least one text"),
    ({"inputs": [{"name": "ids", "datatype": "INT64", "shape": [1, 1], "data": [1]},
                 {"name": "lengths", "datatype": "INT64", "shape": [0, 2**62], "data": []}]},
     "input 'lengths': shape [0, 4611686018427387904] has no rows: send at least one text"),
])
def test_v2_bad_requests_are_400_with_the_v2_error_shape(tiny_server, name: str, body,
                                                         fragment: str) -> None:
    r = v2(tiny_server, "POST", f"/v2/models/{name}/infer", body)
    assert r.status == 400, r.body
    assert set(r.json()) == {"error"} and fragment in r.json()["error"], r.json()


def test_errors_never_500_and_name_the_endpoint(tiny_server, name: str) -> None:
    r = v2(tiny_server, "POST", f"/v2/models/{name}/infer", raw=b"{not json")
    assert r.status == 400 and "not valid JSON" in r.json()["error"]
    r = v2(tiny_server, "GET", "/v2/nope")
    assert r.status == 404 and r.json() == {"error": "no such endpoint: GET /v2/nope (docs/http.md)"}
    r = v2(tiny_server, "DELETE", "/v2")
    assert r.status == 405 and "not allowed" in r.json()["error"]
    r = v2(tiny_server, "GET", "/v1/nope")
    assert r.status == 404 and r.json()["error"]["type"] == "invalid_request_error"


# -- OpenAI-compatible completions ---------------------------------------------------------------
def completion(st, **body) -> Reply:
    return call(st.http_url, "POST", "/v1/completions", body)


def test_openai_models_and_chat_refusal(tiny_server, name: str) -> None:
    doc = v2(tiny_server, "GET", "/v1/models").json()
    assert doc["object"] == "list" and [m["id"] for m in doc["data"]] == [name]
    assert v2(tiny_server, "GET", f"/v1/models/{name}").json()["id"] == name
    r = v2(tiny_server, "POST", "/v1/chat/completions",
           {"model": name, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "character-level" in err["message"] and "/v1/completions" in err["message"]


def test_completion_stream_non_stream_and_grpc_generate_agree(tiny_server, name: str) -> None:
    settings = {"max_tokens": 60, "temperature": 0.9, "top_p": 0.95, "seed": 42}
    with NextCharClient(tiny_server.address) as c:
        grpc_text = "".join(c.generate("To be", max_chars=60, temperature=0.9, top_p=0.95,
                                       seed=42))
    plain = completion(tiny_server, model=name, prompt="To be", **settings)
    assert plain.status == 200, plain.body
    doc = plain.json()
    assert doc["object"] == "text_completion" and doc["model"] == name
    (choice,) = doc["choices"]
    assert choice["text"] == grpc_text and choice["finish_reason"] == "length"
    assert doc["usage"] == {"prompt_tokens": 5, "completion_tokens": 60, "total_tokens": 65}
    streamed = completion(tiny_server, model=name, prompt="To be", stream=True,
                          stream_options={"include_usage": True}, **settings)
    assert streamed.status == 200 and streamed.headers["content-type"].startswith(
        "text/event-stream")
    events = streamed.events()
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"] == doc["usage"] and events[-2]["choices"] == []
    chunks = [e for e in events[:-2]]
    assert "".join(e["choices"][0]["text"] for e in chunks) == grpc_text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(e["choices"][0]["finish_reason"] is None for e in chunks[:-1])


@pytest.mark.parametrize("settings", [
    {"temperature": 1e-50, "seed": 1},  # float32 0: greedy everywhere
    {"temperature": 0.7, "top_p": 1e-50, "seed": 2},  # top_p float32 0: off over gRPC
    {"temperature": 0.7, "top_p": 0.3, "seed": (1 << 63) + 5},  # uint64 seeds past 2**63
])
def test_gen_settings_sample_alike_over_grpc_and_native_http(tiny_server, settings) -> None:
    """nextchar.v1 carries temperature and top_p as float32 and the seed as uint64: JSON's
    doubles are read as float32 too, so one request is one text on every protocol."""
    with NextCharClient(tiny_server.address) as c:
        grpc_text = "".join(c.generate("hello", max_chars=80, **settings))
    r = call(tiny_server.http_url, "POST", "/nextchar/v1/generate",
             {"prompt": "hello", "max_chars": 80, **settings})
    assert r.status == 200, r.body
    assert r.json()["text"] == grpc_text


def test_a_temperature_past_float32_is_named_as_sent(tiny_server, name: str) -> None:
    r = call(tiny_server.http_url, "POST", "/nextchar/v1/generate",
             {"prompt": "hello", "max_chars": 5, "temperature": 1e39})
    assert r.status == 400 and r.json() == {
        "error": "temperature 1e+39 is beyond float32's range (<= 3.403e+38)"}
    err = completion(tiny_server, model=name, prompt="hello", top_p=0.5,
                     temperature=1e39).json()["error"]
    assert (err["message"], err["param"]) == (
        "temperature 1e+39 is beyond float32's range (<= 3.403e+38)", "temperature")


def test_completion_n_prompt_list_echo_stop(tiny_server, name: str) -> None:
    doc = completion(tiny_server, model=name, prompt=["ab", "cd"], n=2, max_tokens=20,
                     seed=7, echo=True).json()
    assert [c["index"] for c in doc["choices"]] == [0, 1, 2, 3]
    assert all(c["text"].startswith(p) for c, p in zip(doc["choices"], ["ab", "ab", "cd", "cd"],
                                                       strict=True))
    with NextCharClient(tiny_server.address) as c:
        seed8 = "".join(c.generate("ab", max_chars=20, seed=8))
        greedy = "".join(c.generate("hello", max_chars=40, temperature=0.0))
    assert doc["choices"][1]["text"] == "ab" + seed8  # choice i samples with seed + i
    assert doc["usage"]["prompt_tokens"] == 4 and doc["usage"]["completion_tokens"] == 80
    stop = greedy[10:12]
    cut = completion(tiny_server, model=name, prompt="hello", max_tokens=40, temperature=0,
                     stop=[stop]).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == greedy[: greedy.index(stop)]


def test_completion_logprobs_are_the_models_distribution(tiny_server, name: str) -> None:
    doc = completion(tiny_server, model=name, prompt="hello", max_tokens=6, seed=3,
                     logprobs=3, echo=True).json()
    (choice,) = doc["choices"]
    lp = choice["logprobs"]
    text = choice["text"]
    assert lp["tokens"] == list(text) and lp["text_offset"] == list(range(len(text)))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with NextCharClient(tiny_server.address) as c:
        size = len(c.model_info().vocab)  # 59 <= max_top_k: every character's probability
        preds = c.predict([text[:j] for j in range(1, len(text))], top_k=size)
    for j, p in enumerate(preds, start=1):
        assert len(p.top) == size
        top = lp["top_logprobs"][j]
        # The 3 likeliest, then the chosen character if it is not among them (OpenAI's
        # "up to logprobs + 1").
        ranked = [cp.char for cp in p.top[:3]]
        assert list(top) == ranked + ([text[j]] if text[j] not in ranked else [])
        assert all(abs(top[cp.char] - math.log(cp.prob)) < 1e-6 for cp in p.top[:3])
        assert top[text[j]] == lp["token_logprobs"][j]
        # Each character's own logprob after the text before it, likeliest or not. Both sides
        # are the log of the same float32 probability (identical here; 1e-6 as for the top
        # ones above, room for a backend that rounds its last bit differently).
        prob = {cp.char: cp.prob for cp in p.top}[text[j]]
        assert abs(lp["token_logprobs"][j] - math.log(prob)) < 1e-6, (j, text[j])
    # Not only top-1 characters (seed 3): a top-1 logprob everywhere would not pass the above.
    assert any(text[j] != p.top[0].char for j, p in enumerate(preds, start=1))
    streamed = completion(tiny_server, model=name, prompt="hello", max_tokens=6, seed=3,
                          logprobs=3, stream=True).events()
    tokens = [t for e in streamed[:-1] for t in e["choices"][0]["logprobs"]["tokens"]]
    offsets = [t for e in streamed[:-1] for t in e["choices"][0]["logprobs"]["text_offset"]]
    assert tokens == list(text[5:]) and offsets == list(range(5, len(text)))


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"prompt": "ab"}, 400, "model"),
    ({"model": "nope", "prompt": "ab"}, 404, None),
    ({"prompt": "ab", "temperature": -1}, 400, "temperature"),
    ({"prompt": "ab", "n": 0}, 400, "n"),
    ({"prompt": "a~"}, 400, "prompt"),
    ({"prompt": [1, 2, 3]}, 400, "prompt"),
    ({"prompt": "ab", "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ({"prompt": "ab", "logprobs": 1000}, 400, "logprobs"),
    ({"prompt": "ab", "best_of": 3}, 400, "best_of"),
    ({"prompt": "ab", "best_of": 1, "n": 2}, 400, "best_of"),  # OpenAI: best_of >= n
    ({"prompt": "ab", "stop": ["x"] * 9}, 400, "stop"),
])
def test_completion_errors_have_openais_shape(tiny_server, name: str, body, status: int,
                                              param) -> None:
    body = {"model": name, **body} if "model" not in body and param != "model" else body
    r = completion(tiny_server, **body)
    assert r.status == status, r.body
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err


def test_completion_messages_name_the_prompt_and_openais_ranges(tiny_server, name: str) -> None:
    """Which prompt of a list is at fault; max_tokens' range includes 0 (accepted here); no
    talk of states, which this API does not have."""
    def message(**body) -> str:
        r = completion(tiny_server, model=name, **body)
        assert r.status == 400, r.body
        return r.json()["error"]["message"]

    assert message(prompt=["hello", "hi~"], max_tokens=3).startswith(
        "prompt[1]: character '~' (U+007E) at position 2 is not in the model's vocabulary")
    assert message(prompt="hi~", max_tokens=3).startswith("prompt: character '~'")
    assert message(prompt=["hello", ""]) == "prompt[1] is empty: send at least one character"
    assert message(prompt="") == "prompt is empty: send at least one character"
    assert message(prompt="ab", max_tokens=10 ** 8) == (
        "max_tokens must be between 0 and 4096 (max_chars_per_text), got 100000000")
    assert completion(tiny_server, model=name, prompt="ab", max_tokens=0).status == 200


def test_completion_logprobs_for_a_long_prompt_with_max_tokens_null_or_16(tiny_server,
                                                                          name: str) -> None:
    """The prompt and the completion are scored as separate pieces, each within the limits:
    max_tokens null (the default, 16) and an explicit 16 answer alike."""
    prompt = ("hello " * 700)[:4090]
    answers = [completion(tiny_server, model=name, prompt=prompt, logprobs=1, temperature=0,
                          **extra) for extra in ({"max_tokens": None}, {"max_tokens": 16}, {})]
    assert [r.status for r in answers] == [200, 200, 200], answers[0].body
    first = answers[0].json()["choices"][0]
    assert len(first["text"]) == 16 and len(first["logprobs"]["tokens"]) == 16
    assert all(r.json()["choices"][0] == first for r in answers)


# -- nextchar JSON: continuation state ---------------------------------------------------------
def test_native_predict_states_and_generate_from_a_state(tiny_server) -> None:
    url = tiny_server.http_url
    whole = call(url, "POST", "/nextchar/v1/predict",
                 {"texts": ["To be, or not to b"], "top_k": 3, "per_position": True}).json()
    head = call(url, "POST", "/nextchar/v1/predict",
                {"texts": ["To be, or no"], "return_state": True}).json()
    state = head["predictions"][0]["state"]
    tail = call(url, "POST", "/nextchar/v1/predict",
                {"texts": ["t to b"], "states": [state], "top_k": 3}).json()
    a, b = whole["predictions"][0]["top"], tail["predictions"][0]["top"]
    assert [x["char"] for x in a] == [x["char"] for x in b]
    assert max(abs(x["prob"] - y["prob"]) for x, y in zip(a, b, strict=True)) <= 1e-5
    assert len(whole["predictions"][0]["argmax_text"]) == len("To be, or not to b")
    with NextCharClient(tiny_server.address) as c:
        (p,) = c.predict(["To be"], return_state=True)
        grpc_text = "".join(c.generate(", or", max_chars=30, seed=5, state=p.state))
    state = call(url, "POST", "/nextchar/v1/predict",
                 {"texts": ["To be"], "return_state": True}).json()["predictions"][0]["state"]
    assert base64.b64decode(state) == p.state
    gen = call(url, "POST", "/nextchar/v1/generate",
               {"prompt": ", or", "max_chars": 30, "seed": 5, "state": state,
                "return_state": True}).json()
    assert gen["text"] == grpc_text and gen["stop_reason"] == "max_chars" and gen["state"]
    events = call(url, "POST", "/nextchar/v1/generate",
                  {"prompt": ", or", "max_chars": 30, "seed": 5, "state": state,
                   "stream": True}).events()
    assert events[-1] == "[DONE]" and "".join(e["text"] for e in events[:-1]) == grpc_text
    r = call(url, "POST", "/nextchar/v1/predict", {"texts": ["a"], "states": ["!!"]})
    assert r.status == 400 and "base64" in r.json()["error"]
    info = call(url, "GET", "/nextchar/v1/models/" + tiny_server.server.runtime().name).json()
    assert info["vocab"] == tiny_server.server.runtime().artifact.vocab
    with NextCharClient(tiny_server.address) as c:  # the same limits as GetModelInfo's
        grpc_limits = c.model_info().limits
    assert info["limits"] == {f.name: getattr(grpc_limits, f.name)
                              for f in grpc_limits.DESCRIPTOR.fields}


# -- operations --------------------------------------------------------------------------------
def test_request_id_in_and_out_and_deadline_header(tiny_server, name: str) -> None:
    r = v2(tiny_server, "GET", "/v2", headers={"x-request-id": "my-id-1"})
    assert r.headers["x-request-id"] == "my-id-1"
    r = v2(tiny_server, "GET", "/v2/nope")
    assert len(r.headers["x-request-id"]) == 32  # fresh, errors included
    r = call(tiny_server.http_url, "POST", "/nextchar/v1/generate",
             {"prompt": "ab", "max_chars": 5}, headers={"x-request-timeout-ms": "0.000001"})
    assert r.status == 504 and "deadline" in r.json()["error"]
    r = call(tiny_server.http_url, "POST", "/v1/completions", {"model": name, "prompt": "ab"},
             headers={"x-request-timeout-ms": "soon"})
    assert r.status == 400 and "x-request-timeout-ms" in r.json()["error"]["message"]


def test_tokens_body_limit_and_metrics(start_server, tiny_artifact: Path) -> None:
    st = start_server(model=tiny_artifact, auth_tokens=TOKEN, max_message_bytes=4096,
                      metrics_port=0)
    name = st.server.runtime().name
    assert v2(st, "GET", "/v2/health/ready").status == 200  # health stays open
    r = v2(st, "GET", "/v2")
    assert r.status == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "missing bearer token" in r.json()["error"]
    r = call(st.http_url, "POST", "/v1/completions", {"model": name, "prompt": "a"},
             headers={"authorization": "Bearer wrong-token-0123456789"})
    # OpenAI's own answer to a bad key: type invalid_request_error, code invalid_api_key.
    assert r.status == 401 and r.json() == {"error": {
        "message": "bearer token not accepted", "type": "invalid_request_error", "param": None,
        "code": "invalid_api_key"}}
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert v2(st, "GET", "/v2", headers=auth).status == 200
    big = {"inputs": [text_input(["a" * 5000])]}
    r = v2(st, "POST", f"/v2/models/{name}/infer", big, headers=auth)
    assert r.status == 413 and "max_message_bytes" in r.json()["error"]
    ok = v2(st, "POST", f"/v2/models/{name}/infer", {"inputs": [text_input(["ab"])]},
            headers=auth)
    assert ok.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{st.server.metrics_port}/metrics") as m:
        metrics = m.read().decode()
    assert ('nextchar_requests_total{code="200",method="POST /v2/models/{name}/infer",'
            'protocol="http"} 1.0') in metrics
    assert 'code="401",method="GET /v2",protocol="http"' in metrics
    assert 'code="413"' in metrics


def test_tls_and_mtls(start_server, tiny_artifact: Path, pki) -> None:
    st = start_server(model=tiny_artifact, tls_cert=pki.server_cert, tls_key=pki.server_key,
                      tls_client_ca=pki.client_ca, tls_require_client_cert=True)
    url = st.http_url.replace("http://127.0.0.1", "https://localhost")
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    refused = _refused(url, context=ctx)  # no client certificate
    assert isinstance(refused, (ssl.SSLError, ConnectionResetError)), repr(refused)
    ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    assert call(url, "GET", "/v2", context=ctx).status == 200
    _refused(st.http_url)  # plaintext to a TLS port


def _refused(url: str, **kw) -> BaseException:
    """A connection the server refuses: it fails at once (a TLS alert, a reset or a close),
    not by waiting out the client's timeout for an answer that never comes."""
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)) as e:
        call(url, "GET", "/v2", timeout_s=5, **kw)
    assert not isinstance(e.value, (socket.timeout, TimeoutError)), repr(e.value)
    return e.value


def test_drain_turns_health_not_ready_then_refuses_with_retry_after(start_server,
                                                                    tiny_artifact: Path) -> None:
    st = start_server(model=tiny_artifact)
    name = st.server.runtime().name
    # A call whose body is still arriving is accepted and tracked: it holds the drain open.
    held = socket.create_connection(("127.0.0.1", int(st.http_url.rsplit(":", 1)[1])))
    held.sendall(f"POST /v2/models/{name}/infer HTTP/1.1\r\nhost: x\r\n"
                 "content-type: application/json\r\ncontent-length: 100\r\n\r\n{".encode())
    time.sleep(0.3)
    st.loop.call_soon_threadsafe(
        lambda: st.loop.create_task(st.server.stop(grace_s=5.0, prestop_s=1.5)))
    time.sleep(0.2)
    try:
        assert v2(st, "GET", "/v2/health/ready").status == 503  # not ready first ...
        assert v2(st, "GET", "/v2/health/live").status == 200
        assert v2(st, "GET", "/v2").status == 200  # ... while still serving (pre-stop)
        deadline = time.monotonic() + 5
        while (r := v2(st, "POST", f"/v2/models/{name}/infer",
                       {"inputs": [text_input(["ab"])]})).status == 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert r.status == 503 and r.headers["retry-after"] == "1"
        assert "shutting down" in r.json()["error"]
    finally:
        held.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from test_security import pki as make_pki

    return make_pki.__wrapped__(tmp_path_factory)


def test_overload_is_429_with_retry_after(start_server, tiny_artifact: Path) -> None:
    st = start_server(model=tiny_artifact, max_queue_texts=1)
    name = st.server.runtime().name
    r = v2(st, "POST", f"/v2/models/{name}/infer", {"inputs": [text_input(["ab", "cd"])]})
    assert r.status == 429 and r.headers["retry-after"] == "1"
    assert "overloaded" in r.json()["error"]
    r = call(st.http_url, "POST", "/nextchar/v1/predict", {"texts": ["ab", "cd"]})
    assert r.status == 429
    assert v2(st, "POST", f"/v2/models/{name}/infer",
              {"inputs": [text_input(["ab"])]}).status == 200


def _abandon(st, path: str, body: dict, streams: int) -> None:
    """Sends a non-streaming POST, waits until its `streams` Generate streams run, then closes
    the connection unanswered."""
    host, port = st.http_url.removeprefix("http://").split(":")
    raw = json.dumps(body).encode()
    gen = st.server.runtime().generator
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
        deadline = time.monotonic() + 10
        while gen.active_streams < streams and time.monotonic() < deadline:
            time.sleep(0.005)
        assert gen.active_streams == streams


@pytest.mark.parametrize("path, body, streams", [
    ("/v1/completions", {"prompt": ["hello"] * 16, "max_tokens": 1_000_000, "n": 4}, 64),
    ("/nextchar/v1/generate", {"prompt": "hello", "max_chars": 1_000_000}, 1),
])
def test_a_non_streaming_generation_ends_when_its_caller_leaves(
        start_server, tiny_artifact: Path, path: str, body: dict, streams: int) -> None:
    """Its streams are closed at once (as a cancelled gRPC call's are), not run to the end.
    Counted in characters, not seconds, so a loaded machine cannot fail it: a million a stream
    would take minutes; unloaded, ~1500 steps of 64 streams run in a second."""
    st = start_server(model=tiny_artifact, generate_flush_ms=0, max_chars_per_text=1_000_000)
    name = st.server.runtime().name
    gen = st.server.runtime().generator
    _abandon(st, path, {"model": name, **body}, streams)
    left = time.monotonic()
    while gen.active_streams and time.monotonic() < left + 5:
        time.sleep(0.005)
    assert gen.active_streams == 0
    stats = gen.stats
    assert (stats.opened, stats.finished, stats.closed_early) == (streams, 0, streams), stats
    assert stats.chars <= 1000 * streams, stats  # 0.1 % of what they asked for, at most
    r = call(st.http_url, "POST", "/v1/completions", {"model": name, "prompt": "hello",
                                                      "max_tokens": 2})
    assert r.status == 200 and len(r.json()["choices"][0]["text"]) == 2


def test_a_deadline_mid_stream_sends_every_character_it_counts(start_server,
                                                               tiny_artifact: Path) -> None:
    """The text made visible before the deadline goes out, then the error, whose count is
    exactly what the client got; over native SSE and OpenAI SSE."""
    import re

    st = start_server(model=tiny_artifact, max_chars_per_text=1_000_000)
    name = st.server.runtime().name
    for path, body in (("/nextchar/v1/generate", {"prompt": "hello", "max_chars": 1_000_000,
                                                  "seed": 1, "stream": True}),
                       ("/v1/completions", {"model": name, "prompt": "hello", "seed": 1,
                                            "max_tokens": 1_000_000, "stream": True})):
        r = call(st.http_url, "POST", path, body, headers={"x-request-timeout-ms": "1500"})
        assert r.status == 200
        events = [e for e in r.events() if e != "[DONE]"]
        *texts, last = events
        if path.startswith("/v1/"):
            got = "".join(e["choices"][0]["text"] for e in texts)
            message = last["error"]["message"]
        else:
            got = "".join(e["text"] for e in texts)
            message = last["error"]
        counted = re.fullmatch(r"deadline expired after (\d+) characters", message)
        assert counted is not None, message
        n = int(counted[1])
        assert n > 0 and len(got) == n, (path, len(got), n)


def test_completion_max_tokens_0_is_checked_and_n_beyond_max_streams_is_400(
        start_server, tiny_artifact: Path) -> None:
    """max_tokens 0 makes no characters but refuses what any other value would; a request for
    more choices than the server ever runs at once is the caller's (400 on n), not 429."""
    st = start_server(model=tiny_artifact, max_streams=2)
    name = st.server.runtime().name

    def error(**body) -> dict:
        r = call(st.http_url, "POST", "/v1/completions", {"model": name, **body})
        assert r.status == 400, r.body
        return r.json()["error"]

    for bad, param in (({"prompt": "h~"}, "prompt"), ({"prompt": ""}, "prompt"),
                       ({"prompt": "a" * 5000}, "prompt"), ({"prompt": "hi", "top_k": 10 ** 6},
                                                            "top_k"),
                       ({"prompt": "hi", "stop": [""]}, "stop")):
        assert error(max_tokens=0, **bad)["param"] == param, bad
    r = call(st.http_url, "POST", "/v1/completions", {"model": name, "prompt": "hi",
                                                      "max_tokens": 0, "echo": True,
                                                      "logprobs": 1})
    assert r.status == 200 and r.json()["choices"][0]["text"] == "hi"
    err = error(prompt="hi", n=3, max_tokens=2)
    assert err == {"message": "1 prompts x n 3 choices > max_streams 2, the Generate streams "
                              "this server runs at once; ask for fewer",
                   "type": "invalid_request_error", "param": "n", "code": None}
    r = call(st.http_url, "POST", "/v1/completions", {"model": name, "prompt": "hi", "n": 2,
                                                      "max_tokens": 2})
    assert r.status == 200 and len(r.json()["choices"]) == 2
    r = call(st.http_url, "POST", "/v1/completions", {"model": name, "prompt": "hi", "n": 3,
                                                      "max_tokens": 0})  # opens no stream
    assert r.status == 200 and len(r.json()["choices"]) == 3


def test_every_route_has_its_own_metric_label() -> None:
    from nextchar.server.http import native, openai, v2
    from nextchar.server.http.middleware import route_label

    for module in (v2, openai, native):
        for route in module.router(None, None).routes:  # building a router calls nothing
            (method,) = route.methods
            path = route.path.replace("{version}", "3").replace("{name}", "m").replace(
                "{model}", "m")
            expected = route.path.replace("/versions/{version}", "")
            assert route_label(method, path) == f"{method} {expected}", route.path


def test_logprobs_of_a_character_outside_the_vocabulary_are_the_unknown_tokens(
        start_server, tiny_artifact: Path, tmp_path: Path) -> None:
    art = tmp_path / "with-unk"
    shutil.copytree(tiny_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["unk_id"] = manifest["vocab"].index("?")
    (art / "manifest.json").write_text(json.dumps(manifest))
    st = start_server(model=art, backend="onnx")
    name = st.server.runtime().name
    doc = completion(st, model=name, prompt="h\u00c9i", max_tokens=0, echo=True,
                     logprobs=1).json()
    lp = doc["choices"][0]["logprobs"]
    assert lp["tokens"] == ["h", "\u00c9", "i"]
    with NextCharClient(st.address) as c:
        (after_h,) = c.predict(["h"], top_k=len(manifest["vocab"]))
        (after_hq,) = c.predict(["h?"], top_k=len(manifest["vocab"]))
    prob = {cp.char: cp.prob for cp in after_h.top}
    assert abs(lp["token_logprobs"][1] - math.log(prob["?"])) < 1e-6  # not -10000: unk's own
    assert abs(lp["token_logprobs"][2]
               - math.log({cp.char: cp.prob for cp in after_hq.top}["i"])) < 1e-6


def test_a_stream_the_queue_refuses_is_a_429_not_an_in_band_error(start_server,
                                                                 tiny_artifact: Path) -> None:
    """Two choices for a queue of one text (the batch delay keeps the first one queued):
    refused before any byte, so the answer is the HTTP status OpenAI's SDK retries on (429,
    retry-after), as without stream; it was a 200 with the refusal as an event."""
    st = start_server(model=tiny_artifact, max_queue_texts=1, max_batch_delay_ms=500)
    name = st.server.runtime().name
    for stream in (False, True):
        r = completion(st, model=name, prompt="ab", n=2, max_tokens=3, stream=stream)
        assert (r.status, r.headers.get("retry-after")) == (429, "1"), (stream, r.body)
        err = r.json()["error"]
        assert (err["type"], err["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    time.sleep(1.0)  # the refused calls' first prompts leave the queue at their batch delay
    r = completion(st, model=name, prompt="ab", max_tokens=3, stream=True, seed=1)
    assert r.status == 200 and r.events()[-1] == "[DONE]"  # one fits


def test_a_native_stream_the_queue_refuses_is_a_429_too(start_server, tiny_artifact: Path) -> None:
    """/nextchar/v1/generate waits for its first event before the 200 as completions do: with
    the queue's one text taken (a Predict held by the batch delay), the stream is a 429."""
    import threading

    st = start_server(model=tiny_artifact, max_queue_texts=1, max_batch_delay_ms=1500)
    held = threading.Thread(target=lambda: call(st.http_url, "POST", "/nextchar/v1/predict",
                                                {"texts": ["ab"]}))
    held.start()
    deadline = time.monotonic() + 10
    while not st.server.runtime().batcher.lane_depth(0) and time.monotonic() < deadline:
        time.sleep(0.01)  # the Predict waits in the queue now
    r = call(st.http_url, "POST", "/nextchar/v1/generate",
             {"prompt": "ab", "max_chars": 3, "stream": True})
    held.join(30)
    assert (r.status, r.headers.get("retry-after")) == (429, "1"), r.body
    assert r.json()["error"].startswith("server overloaded: 1 texts queued")
