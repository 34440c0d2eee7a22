"""Metrics (one registry per server), request ids in trailing metadata, JSON logs."""

from __future__ import annotations

import io
import json
import logging
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nextchar.server.logging_setup import JsonFormatter, RequestIdFilter, request_id_var
from nextchar.v1 import nextchar_pb2 as pb
from nextchar.v1 import nextchar_pb2_grpc as pb_grpc

PREDICT = "nextchar.v1.NextChar/Predict"


def scrape(port: int, settled: bool = True) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from a live /metrics endpoint; settled: once no
    call is in flight (a call's status reaches the client a moment before the server counts it)."""
    deadline = time.monotonic() + 30 if settled else 0.0
    while True:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}
        if samples[("nextchar_in_flight_requests", ())] == 0 or time.monotonic() > deadline:
            return samples
        time.sleep(0.02)


def value(samples: dict, sample: str, **labels: str) -> float:
    """The sum over the samples named `sample` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (name, have), v in samples.items() if name == sample and want <= set(have))


def test_metrics_count_requests_batches_and_model(start_server, tiny_artifact: Path) -> None:
    st = start_server(model=tiny_artifact, metrics_port=0)
    with grpc.insecure_channel(st.address) as ch:
        stub = pb_grpc.NextCharStub(ch)
        stub.Predict(pb.PredictRequest(texts=["hello", "wor"]))
        stub.Predict(pb.PredictRequest(texts=["abc"]))
        with pytest.raises(grpc.RpcError) as e:
            stub.Predict(pb.PredictRequest(texts=["h\u00e9"]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub.GetModelInfo(pb.GetModelInfoRequest())
    m = scrape(st.server.metrics_port)
    assert value(m, "nextchar_requests_total", method=PREDICT, code="OK") == 2
    assert value(m, "nextchar_requests_total", method=PREDICT, code="INVALID_ARGUMENT") == 1
    assert value(m, "nextchar_requests_total", method="nextchar.v1.NextChar/GetModelInfo",
                 code="OK") == 1
    assert value(m, "nextchar_request_duration_seconds_count", method=PREDICT) == 3
    # 3 valid texts were computed: each waited in the queue once, in 1 or 2 model calls.
    assert value(m, "nextchar_queue_wait_seconds_count") == 3
    assert value(m, "nextchar_batch_size_texts_sum") == 3
    batches = value(m, "nextchar_batch_size_texts_count")
    assert batches in (2, 3)
    assert value(m, "nextchar_compute_seconds_count") == batches
    assert value(m, "nextchar_in_flight_requests") == 0
    assert value(m, "nextchar_queue_depth_texts") == 0
    assert value(m, "nextchar_active_streams") == 0
    assert value(m, "nextchar_draining") == 0
    assert value(m, "nextchar_model_reloads_total", result="failure") == 0
    assert value(m, "nextchar_model_reloads_total", result="success") == 1  # the first load
    a = st.server.runtime().predictor.artifact
    assert value(m, "nextchar_model_info", backend="onnx", device="cpu", name=a.name,
                 sha256=a.sha256, version=a.version) == 1


def test_each_server_has_its_own_registry(start_server, tiny_artifact: Path) -> None:
    one = start_server(model=tiny_artifact, metrics_port=0)
    two = start_server(model=tiny_artifact, metrics_port=0)
    with grpc.insecure_channel(one.address) as ch:
        pb_grpc.NextCharStub(ch).Predict(pb.PredictRequest(texts=["abc"]))
    assert value(scrape(one.server.metrics_port), "nextchar_requests_total", method=PREDICT,
                 code="OK") == 1
    assert value(scrape(two.server.metrics_port), "nextchar_requests_total", method=PREDICT,
                 code="OK") == 0


def test_active_streams_gauge_follows_generate(start_server, tiny_artifact: Path) -> None:
    # Longer than the HTTP/2 window: the server cannot finish while the client reads nothing.
    st = start_server(model=tiny_artifact, metrics_port=0, max_chars_per_text=1_000_000)
    with grpc.insecure_channel(st.address) as ch:
        stream = pb_grpc.NextCharStub(ch).Generate(
            pb.GenerateRequest(prompt="hello", max_chars=1_000_000, seed=1))
        next(stream)  # the stream is open on the server now
        m = scrape(st.server.metrics_port, settled=False)
        assert value(m, "nextchar_active_streams") == 1
        assert value(m, "nextchar_in_flight_requests") == 1
        stream.cancel()
    deadline = time.monotonic() + 30
    while value(scrape(st.server.metrics_port, settled=False), "nextchar_active_streams") != 0:
        assert time.monotonic() < deadline, "the cancelled stream was never released"
        time.sleep(0.05)
    m = scrape(st.server.metrics_port)
    assert value(m, "nextchar_requests_total", method="nextchar.v1.NextChar/Generate",
                 code="CANCELLED") == 1


def test_request_id_is_echoed_on_success_and_error(tiny_server) -> None:
    with grpc.insecure_channel(tiny_server.address) as ch:
        stub = pb_grpc.NextCharStub(ch)
        _, call = stub.Predict.with_call(pb.PredictRequest(texts=["abc"]),
                                         metadata=[("x-request-id", "job-7/line-12")])
        assert dict(call.trailing_metadata())["x-request-id"] == "job-7/line-12"
        with pytest.raises(grpc.RpcError) as e:
            stub.Predict(pb.PredictRequest(texts=[""]), metadata=[("x-request-id", "bad-1")])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(e.value.trailing_metadata())["x-request-id"] == "bad-1"
        # None given, or one that could forge log structure: the server makes one up.
        _, call = stub.Predict.with_call(pb.PredictRequest(texts=["abc"]))
        generated = dict(call.trailing_metadata())["x-request-id"]
        assert len(generated) == 32 and int(generated, 16) >= 0
        _, call = stub.Predict.with_call(pb.PredictRequest(texts=["abc"]),
                                         metadata=[("x-request-id", "has space")])
        assert dict(call.trailing_metadata())["x-request-id"] not in ("has space", generated)
        # A stream names it first too: one cancelled mid-way gets no trailers.
        stream = stub.Generate(pb.GenerateRequest(prompt="ab", max_chars=4096, seed=1),
                               metadata=[("x-request-id", "gen-3")])
        assert dict(stream.initial_metadata())["x-request-id"] == "gen-3"
        next(stream)
        stream.cancel()


@contextmanager
def access_lines(level: int, until: str) -> Iterator[list[dict]]:
    """The access log's JSON lines written in the block, at `level` on the logger at whose
    level it is checked (DEBUG: the access logger; INFO: the root, `nextchar serve`'s default),
    once a line with request id `until` came (it is written just after the status went out).
    Every in-process server of the run logs here: callers pick their own ids."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("nextchar.server.access")
    target = access if level == logging.DEBUG else logging.getLogger()
    access.addHandler(handler)
    old_level = target.level
    target.setLevel(level)
    lines: list[dict] = []
    try:
        yield lines
        deadline = time.monotonic() + 30
        while until not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        access.removeHandler(handler)
        target.setLevel(old_level)
    lines += map(json.loads, out.getvalue().splitlines())


def test_access_log_is_json_with_the_request_id(tiny_server) -> None:
    with access_lines(logging.DEBUG, until="req-42") as lines:
        with grpc.insecure_channel(tiny_server.address) as ch:
            with pytest.raises(grpc.RpcError):
                pb_grpc.NextCharStub(ch).Predict(pb.PredictRequest(texts=["\u00e9"]),
                                                 metadata=[("x-request-id", "req-42")])
    # This call's line (a stream an earlier test cancelled may end while this one runs).
    (line,) = [x for x in lines if x["request_id"] == "req-42"]
    assert line["code"] == "INVALID_ARGUMENT"
    assert line["method"] == "/" + PREDICT
    assert line["level"] == "DEBUG" and line["logger"] == "nextchar.server.access"
    assert isinstance(line["duration_ms"], float)
    assert line["protocol"] == "grpc"
    assert line["detail"].startswith("texts[0]: ") and "not in the model's vocabulary" in line[
        "detail"]  # why it was refused, beside the id the caller holds


def test_access_log_flag_logs_every_call_at_info_with_a_refusals_message(
        start_server, tiny_artifact: Path) -> None:
    """--access-log: gRPC and HTTP calls at INFO; a refused call's line says why."""
    from http_util import call

    st = start_server(model=tiny_artifact, access_log=True)
    with access_lines(logging.INFO, until="bad-2") as lines:
        with grpc.insecure_channel(st.address) as ch:
            pb_grpc.NextCharStub(ch).Predict(pb.PredictRequest(texts=["ab"]),
                                             metadata=[("x-request-id", "ok-1")])
        r = call(st.http_url, "POST", "/nextchar/v1/predict", {"texts": ["a~"]},
                 headers={"x-request-id": "bad-2"})
        assert r.status == 400
    mine = {x["request_id"]: x for x in lines if x["request_id"] in ("ok-1", "bad-2")}
    assert {k: (v["level"], v["protocol"], v["code"]) for k, v in mine.items()} == {
        "ok-1": ("INFO", "grpc", "OK"), "bad-2": ("INFO", "http", "400")}
    assert "detail" not in mine["ok-1"]
    assert mine["bad-2"]["detail"] == r.json()["error"]


def test_json_formatter_keeps_extras_and_tracebacks() -> None:
    formatter = JsonFormatter()
    token = request_id_var.set("r-1")
    try:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("here",), None)
        RequestIdFilter().filter(record)
        record.code = "INTERNAL"
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            record.exc_info = sys.exc_info()
        line = json.loads(formatter.format(record))
    finally:
        request_id_var.reset(token)
    assert line["msg"] == "failed here" and line["request_id"] == "r-1"
    assert line["code"] == "INTERNAL" and "ValueError: boom" in line["exc"]
    assert line["ts"].endswith("Z")


def test_text_log_lines_cannot_be_forged_by_a_callers_text() -> None:
    """A path like /%0Afake... is quoted in messages (404s, access log details): its line
    breaks are written escaped, so the log keeps one line per record; tracebacks stay."""
    from nextchar.server.logging_setup import TEXT_FORMAT, TextFormatter

    record = logging.LogRecord("nextchar.server.access", logging.INFO, "", 0,
                               "no such endpoint: GET %s", ("/\nfake ERROR line\r",), None)
    record.request_id = "r-1"
    line = TextFormatter(TEXT_FORMAT).format(record)
    assert line.endswith(" INFO nextchar.server.access [r-1]: no such endpoint: GET "
                         "/\\nfake ERROR line\\r") and "\n" not in line
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    assert TextFormatter(TEXT_FORMAT).format(record).splitlines()[-1] == "ValueError: boom"


def test_without_metrics_port_nothing_is_counted_and_calls_still_work(
        start_server, tiny_artifact: Path) -> None:
    """--metrics-port unset: no registry, no exporter, no per-call counting, the same answers."""
    st = start_server(model=tiny_artifact)
    assert st.server.metrics is None and st.server.metrics_port is None
    with grpc.insecure_channel(st.address) as ch:
        stub = pb_grpc.NextCharStub(ch)
        assert len(stub.Predict(pb.PredictRequest(texts=["hello"])).predictions) == 1
        with pytest.raises(grpc.RpcError) as e:
            stub.Predict(pb.PredictRequest(texts=["h\u00e9"]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert st.server.runtime().stats.inference_count == 1  # KServe statistics still count


def test_per_model_inference_counts_agree_with_model_statistics(start_server,
                                                                tiny_artifact: Path) -> None:
    """Every kind of inference request of a model, counted per model and version in both
    nextchar_inference_requests_total and KServe's ModelStatistics; its series go with an
    unload. Requests inside one ModelStreamInfer count one by one (the RPC counts once)."""
    from nextchar.kserve import grpc_predict_v2_pb2 as kpb
    from nextchar.kserve import grpc_predict_v2_pb2_grpc as kpb_grpc

    st = start_server(model=tiny_artifact, metrics_port=0)
    rt = st.server.runtime()
    name, version = rt.name, rt.version

    def infer(text: str) -> kpb.ModelInferRequest:
        req = kpb.ModelInferRequest(model_name=name)
        req.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
            text.encode())
        return req

    with grpc.insecure_channel(st.address) as ch:
        v1, kserve = pb_grpc.NextCharStub(ch), kpb_grpc.GRPCInferenceServiceStub(ch)
        v1.Predict(pb.PredictRequest(texts=["hello", "wor"]))  # success 1 (2 texts)
        with pytest.raises(grpc.RpcError):
            v1.Predict(pb.PredictRequest(texts=["h~"]))  # failure 1
        chunks = list(v1.Generate(pb.GenerateRequest(prompt="he", max_chars=7, seed=1)))
        assert "".join(c.text for c in chunks) and chunks[-1].stop_reason  # success 2 (7 chars)
        with pytest.raises(grpc.RpcError):
            list(v1.Generate(pb.GenerateRequest(prompt="he", max_chars=7, temperature=-1)))
        answers = list(kserve.ModelStreamInfer(iter([infer("abc"), infer("a~"), infer("ab")])))
        assert [bool(a.error_message) for a in answers] == [False, True, False]
        kserve.ModelInfer(infer("abc"))  # success 5
        (s,) = kserve.ModelStatistics(kpb.ModelStatisticsRequest(name=name)).model_stats
    assert (s.inference_stats.success.count, s.inference_stats.fail.count) == (5, 3)
    assert s.inference_count == 2 + 7 + 1 + 1 + 1  # texts, and a stream's characters
    assert s.inference_count >= s.execution_count  # Triton's: inferences per execution >= 1
    m = scrape(st.server.metrics_port)
    assert value(m, "nextchar_inference_requests_total", model=name, version=version,
                 result="success") == 5
    assert value(m, "nextchar_inference_requests_total", model=name, version=version,
                 result="failure") == 3
    assert value(m, "process_cpu_seconds_total") > 0
    assert value(m, "process_resident_memory_bytes") > 0
    st.call(st.server.plane.unload_model(name))
    deadline = time.monotonic() + 30  # the queue and stream gauges last while it closes
    while left := sorted({n for (n, labels) in scrape(st.server.metrics_port)
                          if dict(labels).get("model") == name}):
        assert time.monotonic() < deadline, left
        time.sleep(0.05)


def test_a_call_refused_while_draining_is_counted_in_its_protocols_code() -> None:
    """HTTP answers it 503: counted "503" like every HTTP answer, gRPC's as UNAVAILABLE."""
    from prometheus_client import generate_latest

    from nextchar.server.metrics import Metrics
    from nextchar.server.telemetry import CallTracker, DrainGate, Telemetry

    metrics, gate = Metrics(), DrainGate()
    gate.closed = True
    telemetry = Telemetry(CallTracker(), gate, metrics)
    assert telemetry.enter("POST /nextchar/v1/predict", "http") is None
    assert telemetry.enter("/nextchar.v1.NextChar/Predict", "grpc") is None
    counted = {line for line in generate_latest(metrics.registry).decode().splitlines()
               if line.startswith("nextchar_requests_total")}
    assert counted == {
        'nextchar_requests_total{code="503",method="POST /nextchar/v1/predict",protocol="http"} 1.0',
        'nextchar_requests_total{code="UNAVAILABLE",method="nextchar.v1.NextChar/Predict",'
        'protocol="grpc"} 1.0'}


def test_an_sse_stream_the_client_leaves_is_counted_499(start_server, tiny_artifact: Path) -> None:
    """Its 200 went out with the first event, its answer did not: counted as the client's
    close (499, as a non-streaming call the client leaves), not as a success."""
    import socket

    st = start_server(model=tiny_artifact, metrics_port=0, max_chars_per_text=1_000_000)
    host, port = st.http_url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": st.server.runtime().name, "prompt": "he", "stream": True,
                       "max_tokens": 1_000_000, "seed": 1}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                  b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 30
    while (left := value(scrape(st.server.metrics_port), "nextchar_requests_total",
                         method="POST /v1/completions", code="499")) != 1:
        assert time.monotonic() < deadline, left
        time.sleep(0.05)
    m = scrape(st.server.metrics_port)
    assert value(m, "nextchar_requests_total", method="POST /v1/completions", code="200") == 0


def test_streams_cancelled_at_any_moment_leave_no_tracked_call(start_server,
                                                               tiny_artifact: Path) -> None:
    """Deadlines of 0.5-5 ms end Generate calls at every stage, including while the server
    sends a stream's first metadata: each is still ended, so drains do not wait out their grace
    on calls long gone and the in-flight gauge returns to 0 (7 of 500 stayed tracked)."""
    st = start_server(model=tiny_artifact, metrics_port=0)
    with grpc.insecure_channel(st.address) as ch:
        stub = pb_grpc.NextCharStub(ch)
        for timeout in (0.0005, 0.001, 0.002, 0.003, 0.005):
            calls = [stub.Generate(pb.GenerateRequest(prompt="hello", max_chars=50),
                                   timeout=timeout) for _ in range(100)]
            for c in calls:
                try:
                    list(c)
                except grpc.RpcError:
                    pass
    deadline = time.monotonic() + 30
    while st.server.tracker.count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert st.server.tracker.count == 0
    assert value(scrape(st.server.metrics_port), "nextchar_in_flight_requests") == 0


def test_a_call_ending_after_its_models_unload_adds_no_series_back(start_server,
                                                                   tiny_artifact: Path) -> None:
    """The unload drops the model's series at once; a call it let finish must not bring
    nextchar_inference_requests_total back for a model no longer served."""
    import threading

    st = start_server(model=tiny_artifact, metrics_port=0, max_batch_delay_ms=1500)
    name = st.server.runtime().name
    answered: list[int] = []

    def predict() -> None:
        with grpc.insecure_channel(st.address) as ch:
            reply = pb_grpc.NextCharStub(ch).Predict(pb.PredictRequest(texts=["ab"]), timeout=30)
            answered.append(len(reply.predictions))

    caller = threading.Thread(target=predict)
    caller.start()
    deadline = time.monotonic() + 10
    while not st.server.runtime().batcher.lane_depth(0) and time.monotonic() < deadline:
        time.sleep(0.01)  # the call waits in the batch delay
    st.call(st.server.plane.unload_model(name))
    caller.join(30)
    assert answered == [1]  # an accepted call finishes
    m = scrape(st.server.metrics_port)
    assert [n for (n, labels) in m if dict(labels).get("model") == name
            and n.startswith("nextchar_inference_requests")] == []


def test_an_http_call_failing_after_its_response_began_counts_500(caplog) -> None:
    """Its status went out (200), its body did not end: a server error, logged, counted 500;
    not 499, the client's close. A client that left while the body went out stays 499."""
    import asyncio

    from prometheus_client import generate_latest

    from nextchar.server.http.middleware import CallLayer
    from nextchar.server.metrics import Metrics
    from nextchar.server.telemetry import CallTracker, DrainGate, Telemetry

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        if scope["path"] == "/nextchar/v1/generate":
            raise RuntimeError("a backend failure mid-stream")
        raise OSError("the client went away")

    metrics = Metrics()
    layer = CallLayer(app, Telemetry(CallTracker(), DrainGate(), metrics), None,
                      open_health=True, max_body_bytes=1 << 20)

    async def call(path: str) -> None:
        async def receive() -> dict:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict) -> None:
            pass

        await layer({"type": "http", "method": "POST", "path": path, "headers": []},
                    receive, send)

    with caplog.at_level(logging.ERROR, logger="nextchar.server.http.middleware"):
        asyncio.run(call("/nextchar/v1/generate"))
        asyncio.run(call("/v1/completions"))
    counted = {line for line in generate_latest(metrics.registry).decode().splitlines()
               if line.startswith("nextchar_requests_total")}
    assert counted == {
        'nextchar_requests_total{code="500",method="POST /nextchar/v1/generate",protocol="http"} 1.0',
        'nextchar_requests_total{code="499",method="POST /v1/completions",protocol="http"} 1.0'}
    assert [r.getMessage() for r in caplog.records] == [
        "unhandled error in POST /nextchar/v1/generate after its response began"]
