"""OpenTelemetry spans (--otel): the span tree of two Predict calls that shared one model call,
the caller's trace context from the thin client, and one HTTP completion (issue 17)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from nextchar.client import NextCharClient

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)


def _traced(start_server, tiny_artifact, **settings):
    st = start_server(model=tiny_artifact, otel=True, otel_exporter="none", http_port=0,
                      **settings)
    exporter = InMemorySpanExporter()
    st.server.tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))
    return st, exporter


@pytest.fixture
def traced(start_server, tiny_artifact):
    return _traced(start_server, tiny_artifact)


@pytest.fixture
def traced_pairs(start_server, tiny_artifact):
    """Every model call waits for two texts (up to 10 s, the longest delay there is): two
    calls share one however late the second thread gets to send, on a loaded machine too."""
    return _traced(start_server, tiny_artifact, max_batch_size=2, max_batch_delay_ms=10_000)


def _children(spans, parent):
    return {s.name: s for s in spans if s.parent is not None
            and s.parent.span_id == parent.context.span_id}


def test_two_predicts_sharing_one_model_call(traced_pairs) -> None:
    st, exporter = traced_pairs
    caller = TracerProvider().get_tracer("caller")  # the application calling nextchar
    roots = []

    def call(text: str) -> None:
        with caller.start_as_current_span(f"caller {text}") as span:
            roots.append(span)
            with NextCharClient(st.address) as c:
                assert len(c.predict([text])[0].top) == 5

    threads = [threading.Thread(target=call, args=(t,)) for t in ("hello", "world!")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.name == "nextchar.v1.NextChar/Predict"]
    assert len(servers) == 2
    assert {s.context.trace_id for s in servers} == {r.get_span_context().trace_id for r in roots}
    models = []
    for server in servers:
        assert server.kind == trace.SpanKind.SERVER
        # OpenTelemetry's RPC conventions, the status as gRPC's number (0: OK).
        assert {k: v for k, v in server.attributes.items() if k.startswith("rpc.")} == {
            "rpc.system": "grpc", "rpc.service": "nextchar.v1.NextChar", "rpc.method": "Predict",
            "rpc.grpc.status_code": 0}
        assert server.parent is not None  # the caller's span, through `traceparent` metadata
        assert server.parent.span_id in {r.get_span_context().span_id for r in roots}
        kids = _children(spans, server)
        assert set(kids) == {"nextchar.queue", "nextchar.model", "nextchar.send"}
        q, m, send = kids["nextchar.queue"], kids["nextchar.model"], kids["nextchar.send"]
        assert server.start_time <= q.start_time <= q.end_time <= m.start_time + 1
        assert m.end_time <= send.start_time + 1 and send.end_time <= server.end_time
        models.append(m)
    a, b = models
    assert a.attributes["nextchar.batch.id"] == b.attributes["nextchar.batch.id"]
    assert a.attributes["nextchar.batch.requests"] == 2 and a.attributes["nextchar.batch.texts"] == 2
    # Each model span links to the other call's server span: the batch's membership.
    assert [link.context.span_id for link in a.links] == [b.parent.span_id]
    assert [link.context.span_id for link in b.links] == [a.parent.span_id]


def test_an_http_completion_is_one_server_span_with_its_prefill(traced) -> None:
    st, exporter = traced
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    body = json.dumps({"model": "random-rnn", "prompt": "hello", "max_tokens": 8,
                       "seed": 1}).encode()
    req = urllib.request.Request(f"{st.http_url}/v1/completions", data=body, headers={
        "content-type": "application/json",
        "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
        assert len(json.loads(r.read())["choices"][0]["text"]) == 8
    deadline = time.monotonic() + 10  # the span ends just after the answer was sent
    while not [s for s in exporter.get_finished_spans() if s.name == "POST /v1/completions"]:
        assert time.monotonic() < deadline, [s.name for s in exporter.get_finished_spans()]
        time.sleep(0.02)
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.name == "POST /v1/completions"]
    assert format(server.context.trace_id, "032x") == trace_id
    assert server.parent.span_id == 0x00F067AA0BA902B7
    # OpenTelemetry's HTTP server-span conventions.
    assert {k: v for k, v in server.attributes.items() if k.startswith("http.")} == {
        "http.request.method": "POST", "http.route": "/v1/completions",
        "http.response.status_code": 200}
    kids = _children(spans, server)
    assert {"nextchar.queue", "nextchar.model"} <= set(kids)  # the prompt's prefill
    assert kids["nextchar.model"].attributes["nextchar.texts"] == 1


def test_tracing_off_makes_no_tracer(start_server, tiny_artifact) -> None:
    st = start_server(model=tiny_artifact)
    assert st.server.tracing is None
    assert st.server.runtime().batcher.tracing is None
