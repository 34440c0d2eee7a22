"""Property-based fuzzing of the HTTP front end (every endpoint: KServe V2 REST, OpenAI
completions, nextchar JSON) against a real `nextchar serve` subprocess.

Bad requests must get a 4xx in the endpoint's own error shape (never a 5xx, never a traceback);
good ones a well-formed 200; afterwards the server must be alive, ready and within a memory
bound, with no unhandled error in its log.

    make test        # a few dozen examples per property
    make fuzz-http   # NEXTCHAR_FUZZ_HTTP_EXAMPLES=1000: >= 6,000 requests, docs/fuzz_http.json

Bodies come from JSON strategies shaped like each endpoint's request (right names with wrong
types, huge and negative numbers, unicode, nesting), plus raw bytes (invalid UTF-8, broken
JSON, NaN), to every route and to random paths.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from http_util import Connection, Reply, root_conftest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("NEXTCHAR_FUZZ_HTTP_EXAMPLES", "30"))
REPORT = os.environ.get("NEXTCHAR_FUZZ_HTTP_REPORT")
FUZZING = "NEXTCHAR_FUZZ_HTTP_EXAMPLES" in os.environ
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not FUZZING,
                suppress_health_check=list(HealthCheck))

MAX_MESSAGE_BYTES = 65536
MAX_CHARS = 64  # per text and per generated completion: keeps every example cheap
MAX_TEXTS = 32
RSS_GROWTH_BOUND_KIB = 200 * 1024
MODEL = "random-rnn"  # the tiny artifact's name
ALLOWED = {200, 400, 404, 405, 409, 413, 415, 429}
ROUTES = [("GET", "/v2"), ("GET", "/v2/health/live"), ("GET", "/v2/health/ready"),
          ("GET", f"/v2/models/{MODEL}"), ("GET", f"/v2/models/{MODEL}/ready"),
          ("GET", f"/v2/models/{MODEL}/config"),
          ("POST", f"/v2/models/{MODEL}/infer"), ("POST", "/v2/repository/index"),
          ("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"), ("POST", "/v1/completions"),
          ("POST", "/v1/chat/completions"), ("POST", "/nextchar/v1/predict"),
          ("POST", "/nextchar/v1/generate"), ("GET", "/nextchar/v1/models"),
          ("GET", f"/nextchar/v1/models/{MODEL}"), ("GET", "/openapi.json")]
statuses: Counter[str] = Counter()


class Target:
    def __init__(self, sp: Any) -> None:
        self.sp = sp
        self.conn = Connection(sp.http_url)
        self.rss_start_kib = sp.rss_kib()
        self.rss_peak_kib = self.rss_start_kib
        self.started = time.monotonic()

    def send(self, method: str, path: str, body: bytes | None,
             headers: dict[str, str] | None = None) -> Reply:
        h = {"content-type": "application/json", **(headers or {})}
        r = self.conn.request(method, path, body, h)
        route = path.split("?")[0]
        statuses[f"{method} {route if (method, route) in ROUTES else '(other)'} {r.status}"] += 1
        assert r.status in ALLOWED, (method, path, body and body[:300], r.status, r.body[:500])
        assert "x-request-id" in r.headers
        if method == "HEAD":
            assert not r.body
        elif r.status != 200:
            doc = json.loads(r.body)
            err = doc["error"]
            if route.startswith("/v1/"):
                assert set(err) == {"message", "type", "param", "code"}, doc
                assert isinstance(err["message"], str) and err["message"]
            else:
                assert isinstance(err, str) and err, doc
            assert "Traceback" not in r.body.decode("utf-8", "replace")
        elif r.headers.get("content-type", "").startswith("text/event-stream"):
            events = r.events()
            assert events and (events[-1] == "[DONE]" or "error" in events[-1]), r.body[-300:]
        elif "inference-header-content-length" in r.headers:  # V2 binary tensors follow
            header = int(r.headers["inference-header-content-length"])
            assert 0 < header <= len(r.body), (header, len(r.body))
            json.loads(r.body[:header])
        elif route != "/openapi.json":
            json.loads(r.body)
        if sum(statuses.values()) % 500 == 0:
            self.rss_peak_kib = max(self.rss_peak_kib, self.sp.rss_kib())
        return r


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, tiny_artifact: Path) -> Iterator[Target]:
    log = tmp_path_factory.mktemp("fuzz-http") / "server.log"
    sp = root_conftest().ServerProcess(
        ["--model", str(tiny_artifact), "--max-message-bytes", str(MAX_MESSAGE_BYTES),
         "--max-chars-per-text", str(MAX_CHARS), "--max-texts-per-request", str(MAX_TEXTS)],
        log)
    try:
        t = Target(sp)
        yield t
        _check_alive_and_bounded(t)
    finally:
        t.conn.close()
        sp.close()


def _check_alive_and_bounded(t: Target) -> None:
    ready = t.conn.request("GET", "/v2/health/ready")
    assert ready.status == 200 and t.sp.proc.poll() is None, "the server is not healthy"
    ok = t.conn.request("POST", "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "ab", "max_tokens": 4}).encode(),
        {"content-type": "application/json"})
    assert ok.status == 200
    rss_end = t.sp.rss_kib()
    t.rss_peak_kib = max(t.rss_peak_kib, rss_end)
    by_status = Counter()
    for key, n in statuses.items():
        by_status[key.rsplit(" ", 1)[1]] += n
    import platform
    import subprocess
    from datetime import datetime, timezone

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    report = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"Python {platform.python_version()}",
        "command": "make fuzz-http",
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
        "requests": sum(statuses.values()),
        "by_status": dict(sorted(by_status.items())),
        "by_route": dict(sorted(statuses.items())),
        "seconds": round(time.monotonic() - t.started, 1),
        "rss_kib_start": t.rss_start_kib, "rss_kib_peak": t.rss_peak_kib, "rss_kib_end": rss_end,
        "examples_per_property": EXAMPLES,
        "internal_errors_in_log": t.sp.log().count("unhandled error"),
    }
    if REPORT:
        Path(REPORT).write_text(json.dumps(report, indent=2) + "\n")
    assert report["internal_errors_in_log"] == 0, t.sp.log()[-5000:]
    assert not any(s.startswith("5") for s in by_status), by_status
    assert rss_end - t.rss_start_kib < RSS_GROWTH_BOUND_KIB


# -- strategies --------------------------------------------------------------------------------
texts = st.one_of(st.text(alphabet="abcdefgh ,.!?\n", max_size=12), st.text(max_size=12),
                  st.text(min_size=MAX_CHARS - 2, max_size=MAX_CHARS + 4, alphabet="ab"))
numbers = st.one_of(st.integers(-3, 70), st.integers(-(1 << 70), 1 << 70),
                    st.floats(allow_nan=False, allow_infinity=False), st.booleans())
leaf = st.one_of(st.none(), st.booleans(), numbers, texts)
anything = st.recursive(leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the right kind of value, sometimes anything."""
    return st.one_of(value, value, value, anything)


@st.composite
def body_of(draw: st.DrawFn, required: dict[str, st.SearchStrategy[Any]],
            optional: dict[str, st.SearchStrategy[Any]]) -> Any:
    """About half the bodies are valid (so the model path runs), a fifth valid but for one
    field, the rest loose: any subset of the fields with any values, or any JSON at all."""
    mode = draw(st.integers(0, 9))
    if mode < 7:
        body = {k: draw(v) for k, v in required.items()}
        for k, v in optional.items():
            if draw(st.integers(0, 2)) == 0:
                body[k] = draw(v)
        if mode >= 5:
            key = draw(st.sampled_from(sorted({*required, *optional})))
            body[key] = draw(anything)
        return body
    if mode < 9:
        fields = {**required, **optional}
        return draw(st.fixed_dictionaries({}, optional={k: maybe(v) for k, v in fields.items()}))
    return draw(anything)


vocab_text = st.text(alphabet="abcdefgh ,.!?\n", min_size=1, max_size=12)
bad_text = st.one_of(st.text(max_size=12), st.text(min_size=MAX_CHARS - 2, max_size=MAX_CHARS + 4,
                                                   alphabet="ab"))


@st.composite
def v2_inputs(draw: st.DrawFn) -> list[Any]:
    if draw(st.booleans()):
        texts = draw(st.lists(st.one_of(vocab_text, vocab_text, vocab_text, bad_text), min_size=1,
                              max_size=4))
        return [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]
    rows = draw(st.lists(st.lists(st.integers(0, 58), min_size=1, max_size=8), min_size=1,
                         max_size=3))
    width = max(map(len, rows))
    return [{"name": "ids", "datatype": "INT64", "shape": [len(rows), width],
             "data": [r + [0] * (width - len(r)) for r in rows]},
            {"name": "lengths", "datatype": "INT64", "shape": [len(rows)],
             "data": [len(r) for r in rows]}]


v2_loose_input = st.fixed_dictionaries({}, optional={
    "name": maybe(st.sampled_from(["text", "ids", "lengths", "probs", ""])),
    "datatype": maybe(st.sampled_from(["BYTES", "INT64", "FP32", "INT32", "bytes"])),
    # No rows beside a huge dimension ([0, 2**62]) was a 500 (numpy cannot reshape to it).
    "shape": maybe(st.lists(st.one_of(st.integers(-2, 40), st.sampled_from([0, 2**62, 2**63 - 1])),
                            min_size=0, max_size=3)),
    "data": maybe(st.one_of(st.lists(texts, max_size=6), st.lists(st.integers(-3, 70),
                                                                  max_size=12),
                            st.lists(st.lists(st.integers(-3, 70), max_size=4), max_size=4))),
    "parameters": maybe(st.dictionaries(st.sampled_from(["binary_data_size", "content_type"]),
                                        numbers, max_size=2)),
})
v2_body = body_of({"inputs": st.one_of(v2_inputs(), v2_inputs(), v2_inputs(),
                                       st.lists(v2_loose_input, max_size=3))}, {
    "id": texts,
    "parameters": st.fixed_dictionaries({}, optional={
        "top_k": st.integers(0, 8), "priority": st.sampled_from([1, 2]),
        "binary_data_output": st.booleans()}),
    "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(
        ["probs", "top_ids", "top_chars", "top_probs"])}, optional={
        "parameters": st.fixed_dictionaries({"binary_data": st.booleans()})}),
        min_size=1, max_size=3, unique_by=lambda o: o["name"]),
})
completion_body = body_of({"model": st.just(MODEL), "prompt": st.one_of(
    vocab_text, st.lists(vocab_text, min_size=1, max_size=2))}, {
    "max_tokens": st.integers(0, 30), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1), "n": st.integers(1, 3),
    "stop": st.one_of(vocab_text, st.lists(vocab_text, max_size=3)),
    "seed": st.integers(0, 1 << 62), "logprobs": st.integers(0, 5), "echo": st.booleans(),
    "user": texts, "stream": st.booleans(), "top_k": st.integers(0, 10),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
})
states = st.one_of(st.just(""), st.text(max_size=20), st.binary(max_size=64).map(
    lambda b: __import__("base64").b64encode(b).decode()))
predict_body = body_of({"texts": st.lists(vocab_text, min_size=1, max_size=5)}, {
    "top_k": st.integers(0, 8), "per_position": st.booleans(),
    "states": st.lists(st.just(""), max_size=1), "return_state": st.booleans(),
    "model": st.sampled_from([MODEL, ""]), "priority": st.sampled_from(["high", "low"]),
})
generate_body = body_of({"prompt": vocab_text, "max_chars": st.integers(1, 40)}, {
    "temperature": st.floats(0, 2), "top_k": st.integers(0, 10), "top_p": st.floats(0, 1),
    "seed": st.integers(0, 1 << 62), "stop": st.lists(vocab_text, max_size=3),
    "state": states, "return_state": st.booleans(), "model": st.sampled_from([MODEL, ""]),
    "stream": st.booleans(), "priority": st.sampled_from(["high", "low"]),
})


def encode(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")


# -- properties --------------------------------------------------------------------------------
@FUZZ
@given(body=v2_body, version=st.sampled_from([None, None, "nope"]))
def test_v2_infer_bodies(target: Target, body: Any, version: str | None) -> None:
    path = (f"/v2/models/{MODEL}/infer" if version is None
            else f"/v2/models/{MODEL}/versions/{version}/infer")
    target.send("POST", path, encode(body))


@FUZZ
@given(body=completion_body)
def test_completion_bodies(target: Target, body: Any) -> None:
    target.send("POST", "/v1/completions", encode(body))


@FUZZ
@given(body=predict_body)
def test_nextchar_predict_bodies(target: Target, body: Any) -> None:
    target.send("POST", "/nextchar/v1/predict", encode(body))


@FUZZ
@given(body=generate_body)
def test_nextchar_generate_bodies(target: Target, body: Any) -> None:
    target.send("POST", "/nextchar/v1/generate", encode(body))


@FUZZ
@given(route=st.sampled_from(ROUTES), body=st.one_of(
    st.binary(max_size=200), st.just(b"{"), st.just(b'{"inputs": NaN}'),
    st.just(b"\xff\xfe{}"), st.text(max_size=50).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(min_size=MAX_MESSAGE_BYTES + 1, max_size=MAX_MESSAGE_BYTES + 2)),
       header_length=st.one_of(st.none(), st.integers(-5, 300).map(str), st.just("x")),
       timeout=st.one_of(st.none(), st.none(), st.sampled_from(["-1", "0", "nan", "1e9", "x"])),
       content_type=st.sampled_from(["application/json", "application/json", "text/plain",
                                     "application/x-www-form-urlencoded", "application/ld+json"]))
def test_raw_bytes_to_every_route(target: Target, route: tuple[str, str], body: bytes,
                                  header_length: str | None, timeout: str | None,
                                  content_type: str) -> None:
    headers = {"content-type": content_type}
    if header_length is not None:
        headers["inference-header-content-length"] = header_length
    if timeout is not None:
        headers["x-request-timeout-ms"] = timeout
    target.send(route[1] and route[0], route[1], body, headers)


segment = st.one_of(st.sampled_from([MODEL, "nope", "", "..", "%00", "%ff", "a b"]),
                    st.text(alphabet="abc%/._-~", max_size=10))


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
       template=st.sampled_from(["/v2/models/{}", "/v2/models/{}/ready", "/v2/models/{}/infer",
                                 "/v2/models/{}/versions/{}", "/v2/models/{}/versions/{}/ready",
                                 "/v2/models/{}/config", "/v2/models/{}/versions/{}/config",
                                 "/v1/models/{}", "/nextchar/v1/models/{}", "/{}", "/v2/{}",
                                 "/v1/{}"]),
       a=segment, b=segment)
def test_paths_and_methods(target: Target, method: str, template: str, a: str, b: str) -> None:
    from urllib.parse import quote

    path = template.format(quote(a, safe="%"), quote(b, safe="%"))
    target.send(method, path, b"{}" if method in ("POST", "PUT", "PATCH") else None)
