"""The client's retry policy: the codes of a call a server refused without running it
(CANCELLED, UNAVAILABLE) are retried, up to 5 attempts; nothing else is.

A stopping gRPC server answers CANCELLED to calls that arrived but never reached a handler
(grpc/grpc#41785), and UNAVAILABLE once its connection is gone. A stub server here answers the
first N calls with a chosen code, then OK.
"""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from nextchar.client import NextCharClient, NextCharError
from nextchar.v1 import nextchar_pb2 as pb
from nextchar.v1 import nextchar_pb2_grpc as pb_grpc


class Flaky(pb_grpc.NextCharServicer):
    def __init__(self, code: grpc.StatusCode, failures: int) -> None:
        self.code, self.failures, self.calls = code, failures, 0

    def Predict(self, request, context):  # noqa: N802 (gRPC's method name)
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(self.code, f"attempt {self.calls} fails")
        return pb.PredictResponse(predictions=[pb.Prediction(argmax_text="x")])

    def ListModels(self, request, context):  # noqa: N802
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(self.code, f"attempt {self.calls} fails")
        return pb.ListModelsResponse(models=[pb.ModelStatus(name="m")])


@pytest.fixture
def flaky_server():
    servers = []

    def start(code: grpc.StatusCode, failures: int) -> tuple[str, Flaky]:
        servicer = Flaky(code, failures)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_NextCharServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", servicer

    yield start
    for s in servers:
        s.stop(0)


@pytest.mark.parametrize("code", [grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE])
def test_a_refused_call_is_retried(flaky_server, code) -> None:
    address, servicer = flaky_server(code, failures=4)
    with NextCharClient(address, timeout_s=10) as c:
        assert [p.argmax_text for p in c.predict(["ab"])] == ["x"]
    assert servicer.calls == 5


@pytest.mark.parametrize("code", [grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE])
def test_a_refused_call_gives_up_after_five_attempts(flaky_server, code) -> None:
    address, servicer = flaky_server(code, failures=6)
    with NextCharClient(address, timeout_s=10) as c, pytest.raises(NextCharError) as e:
        c.predict(["ab"])
    assert e.value.code == code and e.value.details == "attempt 5 fails"
    assert servicer.calls == 5


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.DEADLINE_EXCEEDED])
def test_other_codes_are_not_retried(flaky_server, code) -> None:
    address, servicer = flaky_server(code, failures=1)
    with NextCharClient(address, timeout_s=10) as c, pytest.raises(NextCharError) as e:
        c.predict(["ab"])
    assert e.value.code == code and e.value.details == "attempt 1 fails"
    assert servicer.calls == 1


def test_list_models_is_retried_like_the_other_reads(flaky_server) -> None:
    """ListModels was not in the retry policy: `nextchar models` failed against a replica
    that was draining while another one served."""
    address, servicer = flaky_server(grpc.StatusCode.UNAVAILABLE, failures=3)
    with NextCharClient(address, timeout_s=10) as c:
        assert [m.name for m in c.list_models().models] == ["m"]
    assert servicer.calls == 4


def test_a_client_closed_between_its_check_and_the_call_says_closed() -> None:
    """close() from another thread can land after the client's own check: gRPC then raises a
    bare ValueError ("Cannot invoke RPC on closed channel!"), which escaped as one."""
    c = NextCharClient("127.0.0.1:1", timeout_s=1)

    def closes_then_calls(request, timeout):
        c.close()
        raise ValueError("Cannot invoke RPC on closed channel!")

    with pytest.raises(NextCharError) as e:
        c._call(closes_then_calls, pb.PredictRequest(), None)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_wait_until_serving_stops_at_once_for_what_waiting_cannot_change() -> None:
    import time

    c = NextCharClient("127.0.0.1:1", timeout_s=1)
    c.close()
    started = time.monotonic()
    with pytest.raises(NextCharError) as e:
        c.wait_until_serving(5)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION  # not 5 s, then DEADLINE_EXCEEDED
    assert time.monotonic() - started < 4
    with NextCharClient("127.0.0.1:1", timeout_s=1) as c2, pytest.raises(NextCharError) as e:
        c2.wait_until_serving(-1)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_float_beyond_float32_is_refused_by_the_client() -> None:
    """Protobuf sends 1e40 as inf, and the server's refusal quoted "inf"."""
    with NextCharClient("127.0.0.1:1", timeout_s=1) as c, pytest.raises(NextCharError) as e:
        next(iter(c.generate("a", max_chars=5, temperature=1e40)))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details.startswith("temperature must be within float32"), e.value.details
