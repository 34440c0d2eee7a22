"""Unusual and bad HTTP input, each answered with a precise status and the protocol's own error
body: bodies that do not parse (deep nesting, bad UTF-8, wrong Content-Type, empty), bodies
over the limit sent chunked, bodies that stall, HEAD on every GET route, and the OpenAI fields a client may send as
null, as strings, or with values whose OpenAI meaning differs from nextchar's own."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import socket
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import serving
from http_util import Reply, call

LIMIT = 64 * 1024  # max_message_bytes of this module's server
BODY_TIMEOUT_S = 1.0  # its http_body_timeout_s


@pytest.fixture(scope="module")
def st(tiny_artifact: Path) -> Iterator:
    with serving(model=tiny_artifact, backend="onnx", max_message_bytes=LIMIT,
                 http_body_timeout_s=BODY_TIMEOUT_S) as server:
        yield server


@pytest.fixture(scope="module")
def name(st) -> str:
    return st.server.runtime().name


def post(st, path: str, raw: bytes, content_type: str | None = "application/json") -> Reply:
    return call(st.http_url, "POST", path, raw=raw, headers={"content-type": content_type})


def chunked(st, path: str, size: int) -> Reply:
    """A POST whose body (size bytes of a JSON string) comes chunked, with no Content-Length:
    the limit can only be found while it arrives."""
    url = st.http_url.removeprefix("http://")
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    piece = b"a" * 8192
    parts = [b'{"model": "m", "prompt": "', *([piece] * (size // len(piece))), b'"}']
    try:
        conn.request("POST", path, body=iter(parts), encode_chunked=True,
                     headers={"content-type": "application/json"})
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def completion(st, **body) -> Reply:
    return call(st.http_url, "POST", "/v1/completions", body)


def openai_error(r: Reply, status: int) -> dict:
    assert r.status == status, (r.status, r.body)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# -- bodies that do not parse ------------------------------------------------------------------
def test_repository_index_refuses_bodies_that_are_not_a_json_object(st) -> None:
    deep = b"[" * 3000
    for raw, fragment in [(deep, "nested too deeply"), (b"garbage", "not valid JSON"),
                          (b"[]", "must be a JSON object"), (b'{"ready": "yes"}', "true or false")]:
        r = post(st, "/v2/repository/index", raw)
        assert r.status == 400 and fragment in r.json()["error"], (raw[:20], r.body)
    assert post(st, "/v2/repository/index", b"").status == 200
    assert [m["state"] for m in post(st, "/v2/repository/index", b'{"ready": true}').json()] == [
        "READY"]


def test_bad_utf8_is_named_with_its_byte(st, name: str) -> None:
    body = f'{{"model": "{name}", "prompt": "To \xff be"}}'.encode("latin-1")
    err = openai_error(post(st, "/v1/completions", body), 400)
    assert err["message"] == (f"the request body is not valid UTF-8 JSON: byte "
                              f"{body.index(0xFF)} (b'\\xff') invalid start byte")
    infer = (b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], '
             b'"data": ["a\xffb"]}]}')
    r = post(st, f"/v2/models/{name}/infer", infer)
    assert r.status == 400 and r.json()["error"] == (
        f"the request body is not valid UTF-8 JSON: byte {infer.index(0xFF)} (b'\\xff') "
        f"invalid start byte")
    deep = b'{"texts": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    r = post(st, "/nextchar/v1/predict", deep)
    assert r.status == 400 and "not valid JSON" in r.json()["error"], r.body


def test_wrong_content_type_and_empty_body_say_so(st, name: str) -> None:
    body = json.dumps({"model": name, "prompt": "To be", "max_tokens": 2}).encode()
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):
        err = openai_error(post(st, "/v1/completions", body, content_type), 415)
        assert err["message"] == f"Content-Type must be application/json, got '{content_type}'"
    r = post(st, "/nextchar/v1/predict", b'{"texts": ["ab"]}', "text/plain")
    assert r.status == 415 and r.json() == {
        "error": "Content-Type must be application/json, got 'text/plain'"}
    # The V2 routes read the body whatever its Content-Type, as Triton does (docs/http.md).
    infer = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["ab"]}]}
    assert post(st, f"/v2/models/{name}/infer", json.dumps(infer).encode(),
                "text/plain").status == 200
    # No Content-Type at all (requests' data=, http.client, curl -H 'content-type:'): read as
    # JSON on every JSON route, as docs/http.md says.
    assert post(st, "/v1/completions", body, None).json()["object"] == "text_completion"
    r = post(st, "/nextchar/v1/predict", b'{"texts": ["ab"]}', None)
    assert r.status == 200 and len(r.json()["predictions"]) == 1
    r = post(st, "/nextchar/v1/generate", b'{"prompt": "ab", "max_chars": 3, "seed": 1}', None)
    assert r.status == 200 and len(r.json()["text"]) == 3
    r = post(st, "/v2/repository/index", b"{}", None)
    assert r.status == 200 and r.json()[0]["name"] == name
    err = openai_error(post(st, "/v1/completions", b""), 400)
    assert err["message"] == "the request body is empty: send a JSON object"
    err = openai_error(post(st, "/v1/completions", b"[1, 2]"), 400)
    assert err["message"] == "the request body must be a JSON object"


def test_a_lone_surrogate_escape_is_400_naming_where_it_is(st, name: str) -> None:
    # Python's json module accepts "\\ud800", but it is no Unicode character: an echo of it
    # could not be written back (a 500 before this), nor logged as UTF-8.
    tail = "not a Unicode character (send the pair, or the character itself as UTF-8)"
    body = b'{"model": "%s", "prompt": ["ab", "h\\ud800i"], "echo": true}' % name.encode()
    err = openai_error(post(st, "/v1/completions", body), 400)
    assert err["message"] == ("the request body is not valid text: prompt[1] has a lone "
                              f"surrogate \\ud800 at character 1: {tail}")
    r = post(st, "/nextchar/v1/predict", b'{"texts": ["ab"], "\\udfff": 1}')
    assert r.status == 400 and r.json() == {"error": "the request body is not valid text: a key "
                                            f"has a lone surrogate \\udfff at character 0: {tail}"}
    r = post(st, "/nextchar/v1/generate", b'{"prompt": "\\uD83D", "max_chars": 1}')
    assert r.status == 400 and "prompt has a lone surrogate \\ud83d at character 0" in r.json()[
        "error"]
    # A pair is one character (here outside the vocabulary: refused for that, by name).
    err = openai_error(post(st, "/v1/completions",
                            b'{"model": "%s", "prompt": "\\ud83d\\ude00"}' % name.encode()), 400)
    assert "surrogate" not in err["message"] and "\U0001f600" in err["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/nextchar/v1/predict",
                                  "/nextchar/v1/generate", "/v2/models/{name}/infer",
                                  "/v2/repository/index"])
def test_a_chunked_body_over_the_limit_is_413(st, name: str, path: str) -> None:
    r = chunked(st, path.format(name=name), 2 * LIMIT)
    assert r.status == 413, r.body
    message = f"request body over max_message_bytes {LIMIT}"
    if path.startswith("/v1/"):
        err = openai_error(r, 413)
        assert err["message"] == message and err["code"] == "request_too_large"
    else:
        assert r.json() == {"error": message}
    # Under it, the whole body arrives and is parsed: answered for what it asks (model "m",
    # which is not served), not refused for its size nor as cut short.
    err = openai_error(chunked(st, "/v1/completions", LIMIT // 2), 404)
    assert err["code"] == "model_not_found"
    assert err["message"] == f"model 'm' is not served here; models: {name}"


def stalled(st, path: str) -> tuple[Reply, float]:
    """A POST that promises 100 bytes of body, sends 10 and then nothing."""
    host, port = st.http_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 100\r\n\r\n{{\"prompt\":".encode())
        started = time.monotonic()
        r = http.client.HTTPResponse(sock)
        r.begin()
        return (Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()),
                time.monotonic() - started)


@pytest.mark.parametrize("path", ["/v1/completions", "/nextchar/v1/predict",
                                  "/v2/models/{name}/infer", "/v2/repository/index"])
def test_a_body_that_stalls_is_408_after_the_timeout(st, name: str, path: str) -> None:
    r, waited = stalled(st, path.format(name=name))
    assert r.status == 408, r.body
    assert BODY_TIMEOUT_S * 0.9 <= waited < BODY_TIMEOUT_S + 5
    message = (f"the request body stalled: nothing arrived for {BODY_TIMEOUT_S:g}s after 10 "
               f"bytes (--http-body-timeout-s); send the whole body promptly")
    if path.startswith("/v1/"):
        err = openai_error(r, 408)
        assert err["message"] == message and err["code"] == "request_timeout"
    else:
        assert r.json() == {"error": message}
    assert completion(st, model=name, prompt="ab", max_tokens=1).status == 200  # still serving


def encoded(st, path: str, raw: bytes, encoding: str) -> Reply:
    return call(st.http_url, "POST", path, raw=raw,
                headers={"content-type": "application/json", "content-encoding": encoding})


def test_gzip_and_deflate_bodies_are_read_and_checked_after_decompression(st, name: str) -> None:
    body = json.dumps({"model": name, "prompt": "hello", "max_tokens": 3,
                       "temperature": 0}).encode()
    plain = completion(st, model=name, prompt="hello", max_tokens=3, temperature=0)
    assert plain.status == 200
    for encoding, raw in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body)),
                          ("GZIP", gzip.compress(body)), ("identity", body)):
        r = encoded(st, "/v1/completions", raw, encoding)
        assert r.status == 200, (encoding, r.body)
        assert r.json()["choices"] == plain.json()["choices"]
    # A bomb: 64 KiB compressed to a few hundred bytes, over the limit once inflated.
    bomb = gzip.compress(b'{"texts": ["' + b"a" * (4 * LIMIT) + b'"]}')
    assert len(bomb) < LIMIT // 8
    r = encoded(st, "/nextchar/v1/predict", bomb, "gzip")
    assert r.status == 413 and r.json() == {
        "error": f"request body over max_message_bytes {LIMIT}"}
    r = encoded(st, "/nextchar/v1/predict", b"not gzip at all", "gzip")
    assert r.status == 400 and r.json()["error"].startswith(
        "the request body does not decompress as its Content-Encoding says: ")
    r = encoded(st, "/nextchar/v1/predict", gzip.compress(body)[:-12], "gzip")
    assert r.status == 400 and r.json() == {
        "error": "the request body ends inside its compressed stream (truncated)"}
    after = "the request body goes on after the end of its compressed stream (send one gzip " \
            "member or zlib stream)"
    for extra in (b"trailing bytes", gzip.compress(b"{}")):  # garbage; a second member
        r = encoded(st, "/nextchar/v1/predict", gzip.compress(body) + extra, "gzip")
        assert r.status == 400 and r.json() == {"error": after}, r.body
    err = openai_error(encoded(st, "/v1/completions", body, "br"), 415)
    assert err["message"] == ("Content-Encoding 'br' is not supported: send the body as is, "
                              "gzip or deflate")


def chunked_raw(st, path: str, parts, encoding: str) -> Reply:
    host, port = st.http_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", path, body=parts, encode_chunked=True,
                     headers={"content-type": "application/json", "content-encoding": encoding})
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def test_a_compressed_body_is_limited_in_and_out_when_sent_chunked(st) -> None:
    """Chunked, there is no Content-Length to refuse first: the compressed bytes count against
    the limit as they come (empty deflate blocks inflate to nothing, forever), and so do the
    inflated ones (a bomb, spread over many pieces)."""
    z = zlib.compressobj()
    head = z.compress(b'{"texts": ["a') + z.flush(zlib.Z_SYNC_FLUSH)
    empty_block = b"\x00\x00\x00\xff\xff"  # a stored block of no bytes, not the last
    assert zlib.decompressobj().decompress(head + empty_block * 10) == b'{"texts": ["a'
    endless = (head if i == 0 else empty_block * 2000 for i in range(200))  # 2 MB in, 13 out
    r = chunked_raw(st, "/nextchar/v1/predict", endless, "deflate")
    assert r.status == 413 and r.json() == {"error": f"request body over max_message_bytes {LIMIT}"}
    bomb = gzip.compress(b'{"texts": ["' + b"a" * (16 * LIMIT) + b'"]}')
    pieces = (bomb[i:i + 64] for i in range(0, len(bomb), 64))
    r = chunked_raw(st, "/nextchar/v1/predict", pieces, "gzip")
    assert r.status == 413 and r.json() == {"error": f"request body over max_message_bytes {LIMIT}"}


# -- HEAD --------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", "/v2", "/v1/models",
                                  "/v2/models/{name}", "/nextchar/v1/models"])
def test_head_answers_every_get_route_without_a_body(st, name: str, path: str) -> None:
    path = path.format(name=name)
    got = call(st.http_url, "GET", path)
    head = call(st.http_url, "HEAD", path)
    assert (head.status, head.body) == (got.status, b"")
    assert head.headers["content-length"] == str(len(got.body))
    assert head.headers["content-type"] == got.headers["content-type"]


def test_head_on_a_post_route_is_405_and_405s_allow_head(st) -> None:
    r = call(st.http_url, "HEAD", "/nextchar/v1/predict")
    assert r.status == 405 and r.headers["allow"] == "POST" and r.body == b""
    r = call(st.http_url, "POST", "/v1/models", {})
    assert r.status == 405 and r.headers["allow"] == "GET, HEAD"
    assert r.json()["error"]["message"] == "method POST is not allowed on /v1/models"


# -- OpenAI fields -----------------------------------------------------------------------------
def text_of(r: Reply) -> str:
    assert r.status == 200, r.body
    return r.json()["choices"][0]["text"]


def test_null_fields_take_their_defaults(st, name: str) -> None:
    # The openai SDK sends null for a parameter passed as None: OpenAI's schema allows it.
    plain = text_of(completion(st, model=name, prompt="To be", max_tokens=12, seed=4))
    nulls = {k: None for k in ("temperature", "top_p", "n", "echo", "stream", "top_k", "stop",
                               "logprobs", "max_tokens")}
    assert text_of(completion(st, model=name, prompt="To be", seed=4, **{
        **nulls, "max_tokens": 12})) == plain
    assert len(text_of(completion(st, model=name, prompt="To be", seed=4, **nulls))) == 16


def test_top_p_zero_is_greedy(st, name: str) -> None:
    greedy = text_of(completion(st, model=name, prompt="To be", max_tokens=20, temperature=0))
    for seed in (1, 2):
        assert text_of(completion(st, model=name, prompt="To be", max_tokens=20, top_p=0,
                                  seed=seed)) == greedy


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", "5"), ("max_tokens", True), ("echo", 1), ("echo", "yes"), ("seed", "3"),
    ("logprobs", True), ("n", 1.5), ("stream", "true")])
def test_fields_are_strictly_typed(st, name: str, field: str, value) -> None:
    err = openai_error(completion(st, model=name, prompt="To be", **{field: value}), 400)
    assert err["param"] == field and err["message"].startswith(f"{field}: ")


@pytest.mark.parametrize(("path", "field", "value"), [
    ("/nextchar/v1/generate", "max_chars", True), ("/nextchar/v1/generate", "max_chars", "10"),
    ("/nextchar/v1/generate", "max_chars", 10.0), ("/nextchar/v1/generate", "temperature", True),
    ("/nextchar/v1/generate", "stream", "true"), ("/nextchar/v1/predict", "top_k", "3"),
    ("/nextchar/v1/predict", "per_position", 1)])
def test_native_fields_are_strictly_typed_too(st, path: str, field: str, value) -> None:
    """"max_chars": true ran as 1 and "10" as 10: a client's typo was a short answer, not a
    400 naming the field."""
    body = ({"prompt": "To be", "max_chars": 3} if path.endswith("generate")
            else {"texts": ["To be"]})
    r = post(st, path, json.dumps({**body, field: value}).encode())
    assert r.status == 400, r.body
    assert r.json()["error"].startswith(f"{field}: "), r.body


@pytest.mark.parametrize(("field", "value", "message"), [
    ("prompt", [1, 2, 3], "prompt: must be a string or a list of strings (token-id arrays are "
                          "not supported: one token is one character)"),
    ("prompt", None, "prompt: must be a string or a list of strings"),
    ("prompt", ["ok", 5], "prompt: must be a string or a list of strings"),
    ("stop", 5, "stop: must be a string or a list of strings, or null"),
    ("stop", [5], "stop: must be a string or a list of strings, or null"),
])
def test_type_errors_name_the_field_not_the_union(st, name: str, field: str, value,
                                                  message: str) -> None:
    err = openai_error(completion(st, model=name, **{"prompt": "To be", field: value}), 400)
    assert err["param"] == field and err["message"].startswith(message), err


def test_messages_use_openais_names(st, name: str) -> None:
    err = openai_error(completion(st, model=name, prompt="To be", max_tokens=10 ** 8), 400)
    assert err["param"] == "max_tokens" and err["message"].startswith("max_tokens must be")
    err = openai_error(completion(st, model="no-such-model", prompt="To be"), 404)
    assert err["code"] == "model_not_found"


def test_a_stream_with_max_tokens_zero_still_finishes_every_choice(st, name: str) -> None:
    for echo, text in ((False, ""), (True, "To")):
        events = completion(st, model=name, prompt="To", max_tokens=0, stream=True, n=2,
                            echo=echo).events()
        assert events[-1] == "[DONE]"
        finals = [e["choices"][0] for e in events[:-1] if e["choices"][0]["finish_reason"]]
        assert sorted(c["index"] for c in finals) == [0, 1]
        assert all(c["finish_reason"] == "length" and c["text"] == "" for c in finals)
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == text * 2


def test_logprobs_read_each_character_once(st, name: str) -> None:
    # One Predict text per piece (prompt, completion), not one per prefix: the work grows with
    # the text, not with its square.
    stats = st.server.runtime().stats
    before = stats.inference_count
    r = completion(st, model=name, prompt="T", max_tokens=200, logprobs=2, seed=1)
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 200 and all(v is not None for v in lp["token_logprobs"])
    # The 200 generated characters (one model row each) and the 2 texts of the logprobs.
    assert stats.inference_count - before == 200 + 2


# -- repository control ------------------------------------------------------------------------
def test_repository_load_and_unload_over_rest(tiny_artifact: Path) -> None:
    with serving(model=tiny_artifact, backend="onnx") as server:
        url, model = server.http_url, server.server.runtime().name
        infer = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["ab"]}]}
        assert call(url, "POST", f"/v2/models/{model}/infer", infer).status == 200
        r = call(url, "POST", f"/v2/repository/models/{model}/unload")
        assert (r.status, r.json()) == (200, {})
        assert call(url, "POST", f"/v2/models/{model}/infer", infer).status == 404
        (entry,) = call(url, "POST", "/v2/repository/index").json()
        assert entry["state"] != "READY"
        r = call(url, "POST", f"/v2/repository/models/{model}/load", {})
        assert (r.status, r.json()) == (200, {})
        assert call(url, "POST", f"/v2/models/{model}/infer", infer).status == 200
        r = call(url, "POST", f"/v2/repository/models/{model}/load",
                 {"parameters": {"config": "{}"}})
        assert r.status == 400 and "not supported" in r.json()["error"]
        r = call(url, "POST", f"/v2/repository/models/{model}/load", raw=b"garbage")
        assert r.status == 400 and "not valid JSON" in r.json()["error"]
        assert call(url, "POST", "/v2/repository/models/no-such-model/load").status == 404


def test_repository_control_is_refused_to_other_hosts_while_auth_is_off(st, name: str) -> None:
    from fastapi import FastAPI

    from nextchar.server.http import v2 as http_v2
    from nextchar.server.http.errors import EXCEPTION_HANDLERS
    from nextchar.server.security import CONTROL_LOOPBACK_ONLY

    app = FastAPI(exception_handlers=EXCEPTION_HANDLERS)
    app.include_router(http_v2.router(st.server.plane, st.server.gate,
                                      control_loopback_only=True))

    async def post_from(host: str, path: str) -> tuple[int, bytes]:
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
                 "query_string": b"", "root_path": "", "headers": [], "client": (host, 5555),
                 "server": ("10.0.0.1", 8000), "state": {"deadline": None}}
        await app(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    for action in ("load", "unload"):
        status, body = st.call(post_from("10.1.2.3", f"/v2/repository/models/{name}/{action}"))
        assert (status, json.loads(body)) == (403, {"error": CONTROL_LOOPBACK_ONLY})
    assert st.call(post_from("127.0.0.1", f"/v2/repository/models/{name}/load"))[0] == 200


def test_openai_argument_checks_name_the_right_field(st, name: str) -> None:
    err = openai_error(completion(st, model=name, prompt=["a"] * 65), 400)
    assert err["param"] == "prompt" and err["message"] == "65 prompts x n 1 > 64 choices in one request"
    err = openai_error(completion(st, model=name, prompt=["a"] * 33, n=2), 400)
    assert err["param"] == "n"
    err = openai_error(completion(st, model=name, prompt="ab", stream_options={
        "include_usage": True}), 400)
    assert err == {"message": "stream_options is only allowed when stream is true",
                   "type": "invalid_request_error", "param": "stream_options", "code": None}
    err = openai_error(completion(st, model=name, prompt="ab", best_of=0), 400)
    assert err["param"] == "best_of" and "greater than or equal to 1" in err["message"]
    assert completion(st, model=name, prompt="ab", best_of=1, max_tokens=2).status == 200


def test_v2_infer_with_an_empty_outputs_list_answers_every_output(st, name: str) -> None:
    infer = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["ab"]}],
             "outputs": []}
    r = call(st.http_url, "POST", f"/v2/models/{name}/infer", infer)
    assert [o["name"] for o in r.json()["outputs"]] == ["probs", "top_ids", "top_chars",
                                                       "top_probs"]


@pytest.mark.parametrize("refused", [1, 2])
def test_a_stream_refused_at_a_first_model_call_is_an_http_status(
        start_server, tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch,
        refused: int) -> None:
    """With echo the prompt's event went out before the first model call, and with n 2 the
    first choice's text went out before the second's first call: a refusal there (a full
    queue) was an error event inside a 200, which the SDK does not retry. Every choice's first
    call has its outcome before any event: the 429, as for one choice without echo."""
    from nextchar.server.errors import Overloaded

    st = start_server(model=tiny_artifact)
    rt = st.server.runtime()
    real, calls = rt.batcher.submit, {"n": 0}

    async def full_at_call(items: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == refused:
            await asyncio.sleep(0.1)  # after the other choice's first text
            raise Overloaded("server overloaded: 8192 texts queued in the high-priority lane, "
                             "limit 8192; retry with backoff")
        return await real(items)

    monkeypatch.setattr(rt.batcher, "submit", full_at_call)
    for echo in (False, True):
        calls["n"] = 0
        r = call(st.http_url, "POST", "/v1/completions",
                 {"model": rt.name, "prompt": "To be", "max_tokens": 5, "stream": True,
                  "echo": echo, "n": 2, "seed": 1})
        err = openai_error(r, 429)
        assert r.headers["retry-after"] == "1", r.headers
        assert (err["type"], err["code"]) == ("rate_limit_error", "rate_limit_exceeded"), err
