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
