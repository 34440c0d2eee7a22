"""Paths that must answer precisely and leave the server up: request budgets, answers too big to
send, control calls from other hosts, backend failures inside a batch and a Generate step,
KServe under auth, request-stream frames that do not decode, cancelled streams, the standard
ONNX graph on CPU (issue 16 items 6, 7, 10, 14)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

import nextchar.server.registry as registry_module
from nextchar.client import NextCharClient, NextCharError
from nextchar.kserve import grpc_predict_v2_pb2 as kpb
from nextchar.kserve import grpc_predict_v2_pb2_grpc as kpb_grpc
from nextchar.v1 import admin_pb2, admin_pb2_grpc

TOKEN = "hardening-token-0123456789"


def _code(fn, *args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(NextCharError) as e:
        fn(*args, **kw)
    return e.value.code, e.value.details


def _infer_request(model: str, texts: list[str]) -> kpb.ModelInferRequest:
    return kpb.ModelInferRequest(model_name=model, inputs=[kpb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[len(texts)],
        contents=kpb.InferTensorContents(bytes_contents=[t.encode() for t in texts]))])


def test_a_request_over_the_character_budget_is_refused_before_compute(start_server,
                                                                         tiny_artifact) -> None:
    st = start_server(model=tiny_artifact, max_chars_per_request=100)
    batches = st.server.runtime().batcher.stats.batches
    with NextCharClient(st.address) as c:
        code, details = _code(c.predict, ["a" * 60, "b" * 60])
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details == ("the request has 120 characters > max_chars_per_request 100; split "
                           "it into smaller requests")
        assert len(c.predict(["a" * 50, "b" * 50])) == 2  # within the budget
    assert st.server.runtime().batcher.stats.batches == batches + 1


def test_an_answer_that_cannot_be_sent_is_refused_before_compute(start_server,
                                                                 tiny_artifact) -> None:
    st = start_server(model=tiny_artifact, max_message_bytes=8192, max_chars_per_text=100_000)
    batches = st.server.runtime().batcher.stats.batches
    with NextCharClient(st.address) as c:
        code, details = _code(c.predict, ["abc" * 300], per_position=True)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("the answer would be about ")
        assert "> max_message_bytes 8192" in details and "per_position off" in details
        assert len(c.predict(["abc" * 300])[0].top) == 5  # without per_position it fits
    assert st.server.runtime().batcher.stats.batches == batches + 1


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: picks the outgoing address
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_control_calls_need_loopback_while_auth_is_off(start_server, tiny_artifact) -> None:
    ip = _non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to call from")
    st = start_server(model=tiny_artifact, host="0.0.0.0")
    with grpc.insecure_channel(f"{ip}:{st.port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            admin_pb2_grpc.AdminStub(ch).ReloadModel(admin_pb2.ReloadModelRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "loopback callers only while auth is off" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            kpb_grpc.GRPCInferenceServiceStub(ch).RepositoryModelUnload(
                kpb.RepositoryModelUnloadRequest(model_name="random-rnn"), timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Inference from the same host is not control: it is answered.
        stub = kpb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ModelInfer(_infer_request("random-rnn", ["abc"]), timeout=10).outputs
    with NextCharClient(st.address) as c:  # from loopback the same call is fine
        assert c.reload_model().reloaded is False


def test_a_backend_failure_answers_internal_and_the_server_stays_up(start_server,
                                                                    tiny_artifact) -> None:
    st = start_server(model=tiny_artifact)
    backend = st.server.runtime().backend
    real_run = backend.run
    calls = {"n": 0}

    def failing(ids, lengths, state, positions=False):
        calls["n"] += 1
        raise RuntimeError("secret internal detail")

    with NextCharClient(st.address) as c:
        backend.run = failing
        try:
            code, details = _code(c.predict, ["hello"])
            assert code == grpc.StatusCode.INTERNAL
            assert details == "internal server error (logged on the server)"  # no internals
            code, details = _code(lambda: list(c.generate("hi", max_chars=5, seed=1)))
            assert code == grpc.StatusCode.INTERNAL
            assert "secret" not in details
        finally:
            backend.run = real_run
        assert calls["n"] >= 2
        assert len(c.predict(["hello"])[0].top) == 5  # still serving
        assert c.health() == "SERVING"


def test_a_generate_step_failure_fails_every_stream_of_that_step_and_only_them(
        start_server, tiny_artifact) -> None:
    """A step runs every live stream at once, so a backend failure in it fails all of them
    (INTERNAL, server/generator.py's step), not one of them and not the server: two concurrent
    streams both end INTERNAL, and Predict and Generate are answered afterwards."""
    st = start_server(model=tiny_artifact)
    rt = st.server.runtime()
    real = rt.batcher.run_model
    failed_rows: list[int] = []

    def failing_once_both_run(ids, lengths, state):
        if ids.shape[0] >= 2 and not failed_rows:  # the first step with both streams in it
            failed_rows.append(ids.shape[0])
            raise RuntimeError("step broke")
        return real(ids, lengths, state)

    with NextCharClient(st.address) as c:
        rt.batcher.run_model = failing_once_both_run  # prefills pass; steps of one stream too
        try:
            first = c.generate("hi", max_chars=4000, seed=1)
            next(first)  # running (4000 characters take about a second) when the second joins
            second = c.generate("ho", max_chars=4000, seed=2)
            assert _code(lambda: list(first))[0] == grpc.StatusCode.INTERNAL
            assert _code(lambda: list(second))[0] == grpc.StatusCode.INTERNAL
        finally:
            rt.batcher.run_model = real
        assert failed_rows == [2]
        assert len(c.predict(["hello"])[0].top) == 5  # the server keeps serving
        assert len("".join(c.generate("hi", max_chars=50, seed=1))) == 50
        assert c.health() == "SERVING"


@pytest.mark.parametrize("path", ["/nextchar/v1/generate", "/v1/completions"])
def test_a_backend_failure_mid_sse_stream_ends_it_with_an_error_event(start_server,
                                                                     tiny_artifact,
                                                                     path: str) -> None:
    """After its first event a stream cannot change its status: a backend failure then is an
    in-band 500 without internals, then [DONE]. The native route caught only ServingError, so
    the stream was cut mid-body (a client read an incomplete chunked response)."""
    from http_util import call

    st = start_server(model=tiny_artifact)
    rt = st.server.runtime()
    real = rt.batcher.run_model
    calls = {"n": 0}

    def failing_after_a_while(ids, lengths, state):
        calls["n"] += 1
        if calls["n"] > 20:  # the prompt and some steps pass: the stream has sent events
            raise RuntimeError("secret internal detail")
        return real(ids, lengths, state)

    body = ({"prompt": "hi", "max_chars": 4000, "seed": 1, "stream": True}
            if path.startswith("/nextchar") else
            {"model": rt.name, "prompt": "hi", "max_tokens": 4000, "seed": 1, "stream": True})
    rt.batcher.run_model = failing_after_a_while
    try:
        reply = call(st.http_url, "POST", path, body, timeout_s=60)
    finally:
        rt.batcher.run_model = real
    events = reply.events()
    assert reply.status == 200 and events[-1] == "[DONE]", reply
    error = events[-2]["error"]
    message = error if isinstance(error, str) else error["message"]
    assert message == "internal server error (logged on the server)"
    assert any("text" in e or "choices" in e for e in events[:-2])  # it had begun
    assert call(st.http_url, "POST", path, {**body, "stream": False}).status == 200


def test_kserve_under_auth(start_server, tiny_artifact) -> None:
    st = start_server(model=tiny_artifact, auth_tokens=TOKEN)
    with grpc.insecure_channel(st.address) as ch:
        stub = kpb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(_infer_request("random-rnn", ["abc"]), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing bearer token" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(stub.ModelStreamInfer(iter([_infer_request("random-rnn", ["abc"])]), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        md = (("authorization", f"Bearer {TOKEN}"),)
        assert stub.ModelInfer(_infer_request("random-rnn", ["abc"]), metadata=md,
                               timeout=10).outputs
        (resp,) = stub.ModelStreamInfer(iter([_infer_request("random-rnn", ["abc"])]),
                                        metadata=md, timeout=10)
        assert resp.error_message == "" and resp.infer_response.outputs


def test_an_undecodable_stream_frame_is_invalid_argument(tiny_server) -> None:
    with grpc.insecure_channel(tiny_server.address) as ch:
        call = ch.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        good = _infer_request("random-rnn", ["abc"]).SerializeToString()
        bad = b"\x0a\x03\xff\xfe\xfd"  # model_name: 3 bytes of invalid UTF-8
        with pytest.raises(grpc.RpcError) as e:
            list(call(iter([good, bad]), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not decode" in e.value.details()


def test_a_cancelled_stream_infer_frees_the_server(tiny_server) -> None:
    with grpc.insecure_channel(tiny_server.address) as ch:
        stub = kpb_grpc.GRPCInferenceServiceStub(ch)

        def requests():
            for _ in range(3):
                yield _infer_request("random-rnn", ["abc"])
            time.sleep(30)  # a client that stops sending; the call is cancelled meanwhile

        responses = stub.ModelStreamInfer(requests(), timeout=60)
        for _ in range(3):
            assert next(responses).infer_response.outputs
        responses.cancel()
        with pytest.raises(grpc.RpcError) as e:
            next(responses)
        assert e.value.code() == grpc.StatusCode.CANCELLED
    deadline = time.monotonic() + 10
    while tiny_server.server.tracker.count:  # the server side of the call ended
        assert time.monotonic() < deadline, "the cancelled stream is still tracked"
        time.sleep(0.05)


def test_the_standard_onnx_graph_on_cpu_answers_as_the_loop_graph(start_server,
                                                                  tiny_artifact) -> None:
    loop = start_server(model=tiny_artifact, onnx_graph="loop")
    standard = start_server(model=tiny_artifact, onnx_graph="standard")
    assert standard.server.runtime().backend.model_file == "model.onnx"
    assert loop.server.runtime().backend.model_file == "model_loop.onnx"
    texts = ["hello", "To be, or not to b", "Q"]
    with NextCharClient(loop.address) as a, NextCharClient(standard.address) as b:
        pa, pb_ = a.predict(texts, top_k=5), b.predict(texts, top_k=5)
    for x, y in zip(pa, pb_, strict=True):
        assert [c.id for c in x.top] == [c.id for c in y.top]
        assert np.allclose([c.prob for c in x.top], [c.prob for c in y.top], atol=1e-5)


def test_a_batch_job_request_in_the_low_lane_is_answered(start_server, tiny_artifact: Path) -> None:
    st = start_server(model=tiny_artifact)
    with NextCharClient(st.address) as c:
        low = c.predict(["hello"], top_k=3, priority="low")
        high = c.predict(["hello"], top_k=3, priority="high")
    assert [x.id for x in low[0].top] == [x.id for x in high[0].top]


def test_metrics_bind_loopback_even_when_the_server_binds_everywhere(start_server,
                                                                     tiny_artifact) -> None:
    st = start_server(model=tiny_artifact, host="0.0.0.0", metrics_port=0)
    assert st.server.metrics._http.server_address[0] == "127.0.0.1"
    opened = start_server(model=tiny_artifact, metrics_port=0, metrics_host="0.0.0.0")
    assert opened.server.metrics._http.server_address[0] == "0.0.0.0"


def test_a_failed_version_is_not_reverified_on_every_admin_call(start_server, tiny_artifact,
                                                                 tmp_path: Path) -> None:
    import shutil

    repo = tmp_path / "model"
    shutil.copytree(tiny_artifact, repo / "1")
    st = start_server(model=repo)
    shutil.copytree(tiny_artifact, repo / "2")
    (repo / "2" / "model_loop.onnx").write_bytes(b"broken")
    opened: list[str] = []
    with NextCharClient(st.address) as c:
        code, details = _code(c.reload_model)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "version 2 not loaded" in details and "does not match the manifest" in details
        real_open = registry_module.open_model

        def counting_open(path, settings):
            opened.append(path.name)
            return real_open(path, settings)

        registry_module.open_model = counting_open
        try:
            for _ in range(5):
                code, details = _code(c.reload_model)
                assert code == grpc.StatusCode.FAILED_PRECONDITION
                assert "not re-verified before 30s or a change to its files or config.json" in details
        finally:
            registry_module.open_model = real_open
        assert opened == []  # the broken version was not opened again
        assert c.model_info().version == "1"


def test_closing_a_model_with_a_call_still_running_keeps_the_event_loop_free(
        start_server, tiny_artifact) -> None:
    """A drain past its grace closes models whose calls still run; the executor's shutdown
    waits for them on a helper thread, not on the event loop (issue 16 item 8)."""
    import asyncio
    import threading

    st = start_server(model=tiny_artifact)
    rt = st.server.runtime()
    backend = rt.backend
    real_run = backend.run
    entered = threading.Event()

    def slow(ids, lengths, state, positions=False):
        entered.set()
        deadline = time.monotonic() + 10
        while not rt.closed and time.monotonic() < deadline:  # the drain reached the model
            time.sleep(0.01)
        time.sleep(2.5)  # and the call runs on for 2.5 s while the model closes
        return real_run(ids, lengths, state, positions=positions)

    backend.run = slow
    gaps: list[float] = []

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(0.05)
            now = loop.time()
            gaps.append(now - last)
            last = now

    tick = asyncio.run_coroutine_threadsafe(ticker(), st.loop)
    with NextCharClient(st.address, timeout_s=30) as c:
        caller = threading.Thread(target=lambda: _code(c.predict, ["hello"]), daemon=True)
        caller.start()
        assert entered.wait(10)
        st.call(st.server.stop(grace_s=0.1))  # closes the model while its call still runs
    tick.cancel()
    caller.join(10)
    assert rt.closed
    # Waiting on the loop, it would stall for the 2.5 s the call runs on; 1.5 s leaves a loaded
    # machine's scheduling room without letting that through.
    assert gaps and max(gaps) < 1.5, f"the event loop stalled for {max(gaps):.2f}s"


def test_the_log_names_the_model_file_actually_loaded(server_process, tiny_artifact) -> None:
    """Issue 18 item 14: the server said `(model.onnx)` while it loaded model_loop.onnx."""
    sp = server_process(["--model", str(tiny_artifact), "--no-http"])
    with NextCharClient(sp.address) as c:
        assert c.health() == "SERVING"
    log = sp.log()
    assert "onnx backend (loop graph, model_loop.onnx)" in log
    assert "(model.onnx)" not in log
