"""The nextchar client: one class, sync, a context manager.

    from nextchar.client import NextCharClient
    with NextCharClient("127.0.0.1:50051", timeout_s=5) as c:
        for pred in c.predict(["To be, or not to b"], top_k=3):
            print(pred.top[0].char, pred.top[0].prob)

Errors are `NextCharError` with the gRPC status code kept (`.code`) and the RpcError chained.
Several addresses (or a DNS name resolving to several replicas) are load-balanced by gRPC's
own `round_robin` policy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nextchar.v1 import nextchar_pb2 as pb
from nextchar.v1 import nextchar_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class NextCharError(Exception):
    """A failed call; `code` is the grpc.StatusCode, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc_error(cls, e: grpc.RpcError) -> NextCharError:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = e.details() if hasattr(e, "details") else str(e)
        return cls(code, details or "")


def target_for(servers: Sequence[str] | str) -> str:
    """One address stays as is; several become an ipv4/ipv6 list gRPC balances over."""
    if isinstance(servers, str):
        return servers
    if len(servers) == 1:
        return servers[0]
    return "ipv4:" + ",".join(s.removeprefix("ipv4:") for s in servers)


class NextCharClient:
    def __init__(
        self,
        servers: Sequence[str] | str = "127.0.0.1:50051",
        timeout_s: float | None = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.timeout_s = timeout_s
        service_config = {"loadBalancingConfig": [{"round_robin": {}}]}
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.service_config", json.dumps(service_config)),
            ("grpc.enable_retries", 0),  # retries are the caller's policy (see client.batch)
        ]
        self.channel = grpc.insecure_channel(target_for(servers), options=options)
        self.stub = pb_grpc.NextCharStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> NextCharClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        try:
            return method(request, timeout=self.timeout_s if timeout_s is None else timeout_s)
        except grpc.RpcError as e:
            raise NextCharError.from_rpc_error(e) from e

    def predict(
        self,
        texts: Sequence[str],
        top_k: int = 0,
        per_position: bool = False,
        timeout_s: float | None = None,
    ) -> list[pb.Prediction]:
        request = pb.PredictRequest(texts=list(texts), top_k=top_k, per_position=per_position)
        return list(self._call(self.stub.Predict, request, timeout_s).predictions)

    def predict_response(self, request: pb.PredictRequest, timeout_s: float | None = None) -> pb.PredictResponse:
        return self._call(self.stub.Predict, request, timeout_s)

    def model_info(self, timeout_s: float | None = None) -> pb.GetModelInfoResponse:
        return self._call(self.stub.GetModelInfo, pb.GetModelInfoRequest(), timeout_s)

    def health(self, service: str = "", timeout_s: float | None = None) -> str:
        """'SERVING', 'NOT_SERVING', ... for the server ('') or one service name."""
        resp = self._call(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service), timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_until_serving(self, timeout_s: float = 60.0) -> None:
        """Blocks until health says SERVING; raises NextCharError(DEADLINE_EXCEEDED) otherwise."""
        import time

        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health(timeout_s=1.0)
                if last == "SERVING":
                    return
            except NextCharError as e:
                last = e.code.name
            time.sleep(0.1)
        raise NextCharError(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"server not SERVING after {timeout_s:.0f}s (last: {last})")


def prediction_to_dict(text: str, pred: pb.Prediction) -> dict[str, Any]:
    """The stable JSON shape of one prediction (documented in the README)."""
    out: dict[str, Any] = {
        "text": text,
        "top": [{"char": c.char, "prob": round(c.prob, 6)} for c in pred.top],
    }
    if pred.argmax_text:
        out["argmax"] = pred.argmax_text
        out["positions"] = [{"char": c.char, "prob": round(c.prob, 6)} for c in pred.positions]
    return out
