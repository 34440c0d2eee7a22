"""Addresses and probes as operators meet them: IPv6 binds and callers, a health status for every
service name, KServe liveness/readiness as open over gRPC as over HTTP, the printed URLs, and
configuration errors that name what the user set (flag or NEXTCHAR_* variable)."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from http_util import call
from pydantic import ValidationError

from nextchar.client import NextCharClient
from nextchar.kserve import grpc_predict_v2_pb2 as kpb
from nextchar.kserve import grpc_predict_v2_pb2_grpc as kpb_grpc
from nextchar.server import cli
from nextchar.server.grpc.wrapping import is_loopback_peer
from nextchar.server.security import is_loopback, open_method
from nextchar.server.settings import ServerSettings, host_port
from nextchar.v1 import nextchar_pb2 as pb
from nextchar.v1 import nextchar_pb2_grpc as pb_grpc

TOKEN = "ops-network-token-0123456789"
MODEL = "random-rnn"  # the tiny artifact's name


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(),
                                reason="this machine has no IPv6 loopback (::1)")


# 1. IPv6 loopback callers may use model control while auth is off.

@pytest.mark.parametrize(("peer", "loopback"), [
    ("ipv4:127.0.0.1:5000", True),
    ("ipv4:127.1.2.3:5000", True),
    ("ipv6:%5B::1%5D:38580", True),  # as grpc writes it: a URI, brackets percent-encoded
    ("ipv6:[::1]:38580", True),
    ("ipv6:%5B::ffff:127.0.0.1%5D:38580", True),  # IPv4 loopback through a dual-stack socket
    ("unix:/tmp/nextchar.sock", True),
    ("ipv4:10.1.2.3:5000", False),
    ("ipv6:%5B2001:db8::1%5D:38580", False),
    ("ipv6:%5B::ffff:10.1.2.3%5D:38580", False),
    ("ipv6:%5Bfe80::1%25eth0%5D:38580", False),  # a zone id, percent-encoded too
])
def test_grpc_peer_strings_are_parsed_as_grpc_writes_them(peer: str, loopback: bool) -> None:
    assert is_loopback_peer(peer) is loopback


def test_ipv4_mapped_loopback_is_loopback() -> None:
    assert is_loopback("::ffff:127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("::ffff:192.0.2.1") and not is_loopback("example.com")


@needs_ipv6
def test_control_calls_from_ipv6_loopback_are_answered_while_auth_is_off(start_server,
                                                                         tiny_artifact) -> None:
    st = start_server(model=tiny_artifact, host="0.0.0.0", http=False)  # gRPC binds dual-stack
    with NextCharClient(f"[::1]:{st.port}", timeout_s=10) as c:
        assert c.reload_model().reloaded is False  # PERMISSION_DENIED before the fix


# 2. An IPv6 --host binds; the lines printed name addresses a client can use.

def test_settings_take_an_ipv6_host_bare_or_in_brackets() -> None:
    assert ServerSettings(host="[::1]").host == "::1"
    assert ServerSettings(host="::").host == "::"
    assert ServerSettings(metrics_host="[::1]").metrics_host == "::1"
    with pytest.raises(ValidationError, match=r"brackets hold an IPv6 address"):
        ServerSettings(host="[example.com]")
    assert host_port("::1", 50051) == "[::1]:50051"
    assert host_port("127.0.0.1", 50051) == "127.0.0.1:50051"
    assert host_port("example.com", 80) == "example.com:80"


@needs_ipv6
def test_a_server_on_ipv6_loopback_answers_grpc_http_and_metrics(server_process,
                                                                  tiny_artifact) -> None:
    sp = server_process(["--model", str(tiny_artifact), "--host", "::1", "--metrics-port", "0"])
    assert sp.address.startswith("[::1]:")
    assert sp.http_url is not None and sp.http_url.startswith("http://[::1]:")
    # /metrics stays on --metrics-host (loopback IPv4 by default), and its URL says so.
    assert sp.metrics_url is not None and sp.metrics_url.startswith("http://127.0.0.1:")
    with NextCharClient(sp.address, timeout_s=10) as c:
        assert c.health() == "SERVING"
        assert c.predict(["abc"], top_k=1)[0].top
    assert call(sp.http_url, "GET", "/v2/health/ready").status == 200
    with urllib.request.urlopen(sp.metrics_url, timeout=10) as r:
        assert b"nextchar_requests_total" in r.read()
    assert f"listening on {sp.address} " in sp.log()


@needs_ipv6
@pytest.mark.parametrize("host", ["[::1]", "::"])
def test_an_ipv6_host_in_brackets_or_the_ipv6_wildcard_binds(start_server, tiny_artifact,
                                                              host: str) -> None:
    st = start_server(model=tiny_artifact, host=host)
    with NextCharClient(f"[::1]:{st.port}", timeout_s=10) as c:
        assert c.health() == "SERVING"
    assert call(f"http://[::1]:{st.server.http_port}", "GET", "/v2/health/live").status == 200


# 3. Health has a status for every service the server registers.

def _registered_services(channel: grpc.Channel) -> list[str]:
    """The services reflection lists, less health and reflection themselves."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (answer,) = stub.ServerReflectionInfo(iter([request]), timeout=10)
    names = [s.name for s in answer.list_services_response.service]
    return [n for n in names if not n.startswith(("grpc.health.", "grpc.reflection."))]


def _statuses(health: health_pb2_grpc.HealthStub, names: list[str]) -> dict[str, str]:
    return {n: health_pb2.HealthCheckResponse.ServingStatus.Name(
        health.Check(health_pb2.HealthCheckRequest(service=n), timeout=10).status) for n in names}


def test_every_service_name_has_a_health_status_serving_and_draining(start_server,
                                                                     tiny_artifact) -> None:
    st = start_server(model=tiny_artifact, http=False)
    with grpc.insecure_channel(st.address) as ch:
        services = _registered_services(ch)
        assert {"nextchar.v1.NextChar", "nextchar.v1.Admin",
                "inference.GRPCInferenceService"} <= set(services)
        names = ["", *services]
        health = health_pb2_grpc.HealthStub(ch)
        assert _statuses(health, names) == dict.fromkeys(names, "SERVING")
        # During the pre-stop wait the port still answers, with NOT_SERVING for every name.
        drain = asyncio.run_coroutine_threadsafe(st.server.stop(grace_s=1.0, prestop_s=3.0),
                                                 st.loop)
        try:
            assert _statuses(health, names) == dict.fromkeys(names, "NOT_SERVING")
            # KServe's readiness says the same as health (as V2 REST's does), or a Triton-style
            # balancer keeps sending calls to a draining server.
            k = kpb_grpc.GRPCInferenceServiceStub(ch)
            assert k.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready is False
            assert k.ModelReady(kpb.ModelReadyRequest(name=MODEL), timeout=10).ready is False
            assert k.ServerLive(kpb.ServerLiveRequest(), timeout=10).live is True
        finally:
            drain.result(30)


# 4. With tokens on, the gRPC methods open without one are HTTP's open routes' twins.

def test_only_kserve_liveness_and_readiness_open_with_health() -> None:
    opened, closed = ServerSettings(), ServerSettings(auth_open_health=False)
    methods = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    open_now = {m for m in methods if open_method(f"/inference.GRPCInferenceService/{m}", opened)}
    assert open_now == {"ServerLive", "ServerReady"}  # as /v2/health/live and /v2/health/ready
    assert not any(open_method(f"/inference.GRPCInferenceService/{m}", closed) for m in methods)


def _code(fn, request, **kw) -> grpc.StatusCode:
    try:
        fn(request, timeout=10, **kw)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_kserve_health_needs_a_token_on_grpc_exactly_where_http_does(start_server,
                                                                     tiny_artifact) -> None:
    st = start_server(model=tiny_artifact, auth_tokens=TOKEN)
    bearer = f"Bearer {TOKEN}"
    with grpc.insecure_channel(st.address) as ch:
        k = kpb_grpc.GRPCInferenceServiceStub(ch)
        assert k.ServerLive(kpb.ServerLiveRequest(), timeout=10).live is True
        assert k.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready is True
        model_ready = kpb.ModelReadyRequest(name=MODEL)
        infer = kpb.ModelInferRequest(model_name=MODEL, inputs=[
            kpb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1],
                                                   contents=kpb.InferTensorContents(
                                                       bytes_contents=[b"abc"]))])
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        assert _code(k.ModelReady, model_ready) == unauthenticated
        assert _code(k.ModelInfer, infer) == unauthenticated
        assert _code(pb_grpc.NextCharStub(ch).Predict, pb.PredictRequest(texts=["abc"])) == \
            unauthenticated
        md = (("authorization", bearer),)
        assert _code(k.ModelReady, model_ready, metadata=md) == grpc.StatusCode.OK
        assert _code(k.ModelInfer, infer, metadata=md) == grpc.StatusCode.OK
    url = f"http://127.0.0.1:{st.server.http_port}"
    assert call(url, "GET", "/v2/health/live").status == 200
    assert call(url, "GET", "/v2/health/ready").status == 200
    assert call(url, "GET", f"/v2/models/{MODEL}/ready").status == 401
    assert call(url, "GET", f"/v2/models/{MODEL}/ready",
                headers={"authorization": bearer}).status == 200


def test_closed_health_closes_kserve_liveness_too(start_server, tiny_artifact) -> None:
    st = start_server(model=tiny_artifact, auth_tokens=TOKEN, auth_open_health=False)
    with grpc.insecure_channel(st.address) as ch:
        k = kpb_grpc.GRPCInferenceServiceStub(ch)
        assert _code(k.ServerLive, kpb.ServerLiveRequest()) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(k.ServerReady, kpb.ServerReadyRequest()) == grpc.StatusCode.UNAUTHENTICATED
    url = f"http://127.0.0.1:{st.server.http_port}"
    assert call(url, "GET", "/v2/health/live").status == 401


# 5. The metrics URL names the host /metrics is bound to.

def test_the_printed_metrics_url_names_the_metrics_host() -> None:
    s = ServerSettings(host="127.0.0.3", http=False)
    assert cli.serving_lines(s, 50051, 9100, None) == [
        "nextchar serving on 127.0.0.3:50051", "nextchar metrics on http://127.0.0.1:9100/metrics"]
    s = ServerSettings(host="::1", metrics_host="::1", tls_cert=Path("cert.pem"))
    assert cli.serving_lines(s, 50051, 9100, 8000) == [
        "nextchar serving on [::1]:50051", "nextchar metrics on http://[::1]:9100/metrics",
        "nextchar http on https://[::1]:8000"]


# 6. Configuration errors name the variable or the flag, whichever the user set.

def test_a_bad_value_names_the_variable_or_the_flag_it_came_from(monkeypatch, capsys,
                                                                 tiny_artifact) -> None:
    monkeypatch.setenv("NEXTCHAR_PORT", "abc")
    assert cli.main(["--model", str(tiny_artifact)]) == 2
    assert capsys.readouterr().err == ("nextchar serve: invalid NEXTCHAR_PORT: Input should be "
                                       "a valid integer, unable to parse string as an integer\n")
    assert cli.main(["--model", str(tiny_artifact), "--port", "70000"]) == 2  # the flag wins
    assert capsys.readouterr().err == ("nextchar serve: invalid --port: Input should be less "
                                       "than or equal to 65535\n")
    monkeypatch.setenv("NEXTCHAR_PORT", "0")
    monkeypatch.setenv("NEXTCHAR_LOG_LEVEL", "loud")
    assert cli.main(["--model", str(tiny_artifact), "--no-http"]) == 2
    assert capsys.readouterr().err.startswith("nextchar serve: invalid NEXTCHAR_LOG_LEVEL 'loud': ")


def test_an_empty_variable_counts_as_unset(monkeypatch) -> None:
    """Compose and Kubernetes blank a variable (`NEXTCHAR_METRICS_PORT=`) to unset it."""
    for name in ("NEXTCHAR_METRICS_PORT", "NEXTCHAR_PORT", "NEXTCHAR_HOST", "NEXTCHAR_BATCHING"):
        monkeypatch.setenv(name, "")
    s = cli.settings_from_args([])
    assert (s.metrics_port, s.port, s.host, s.batching) == (None, 50051, "127.0.0.1", True)
    assert cli.settings_from_args(["--port", "0"]).port == 0  # a flag still wins


# 7. A metrics address that cannot work fails before the model loads, naming its flag.

def test_an_unresolvable_host_is_named_with_its_flag() -> None:
    with pytest.raises(OSError) as e:
        cli.check_ports_free(ServerSettings(port=0, http=False, metrics_port=18577,
                                            metrics_host="nosuchhost.invalid"))
    assert str(e.value).startswith("cannot bind metrics nosuchhost.invalid:18577: --metrics-host "
                                   "nosuchhost.invalid does not resolve (")
    with pytest.raises(OSError) as e:
        cli.check_ports_free(ServerSettings(host="nosuchhost.invalid", port=18578, http=False))
    assert str(e.value).startswith("cannot bind nosuchhost.invalid:18578: --host "
                                   "nosuchhost.invalid does not resolve (")


def test_one_port_under_two_names_of_one_address_is_refused() -> None:
    """`localhost` and `127.0.0.1` are one address: the same port for both listeners failed
    only after the model loaded, as a bare "[Errno 98] Address already in use"."""
    s = ServerSettings(host="127.0.0.1", port=0, http_port=18579, metrics_host="localhost",
                       metrics_port=18579)
    with pytest.raises(OSError) as e:
        cli.check_ports_free(s)
    assert str(e.value) == "--http-port and --metrics-port are both 18579: give each its own port"


# 8. A misspelled variable is named at start (settings ignore unknown NEXTCHAR_* variables).

def test_a_misspelled_variable_is_named_and_the_projects_own_are_not() -> None:
    env = {"NEXTCHAR_METRIC_PORT": "9100", "NEXTCHAR_MAX_BATCH_DELAY": "2",
           # the client's and the deploy scripts' own variables are not settings, and no typo
           "NEXTCHAR_SERVER": "a:1", "NEXTCHAR_TLS_CA": "ca.pem", "NEXTCHAR_HOST_PORTS": "50051",
           "NEXTCHAR_GRACE_SECONDS": "30", "NEXTCHAR_BATCH_DIR": "/data", "PATH": "/bin"}
    assert cli.misspelled_variables(env) == [
        "NEXTCHAR_MAX_BATCH_DELAY is not a setting and is ignored: did you mean "
        "NEXTCHAR_MAX_BATCH_DELAY_MS?",
        "NEXTCHAR_METRIC_PORT is not a setting and is ignored: did you mean "
        "NEXTCHAR_METRICS_PORT?"]


# 9. --max-connection-age-s ends connections, so clients re-resolve and find new replicas.

def test_a_connection_past_its_max_age_is_closed_and_the_client_reconnects(start_server,
                                                                            tiny_artifact) -> None:
    import time

    st = start_server(model=tiny_artifact, max_connection_age_s=0.5,
                      max_connection_age_grace_s=1)
    states: list[grpc.ChannelConnectivity] = []
    with grpc.insecure_channel(st.address) as ch:
        ch.subscribe(states.append)
        stub = pb_grpc.NextCharStub(ch)
        stub.Predict(pb.PredictRequest(texts=["abc"]), timeout=10)
        ready = grpc.ChannelConnectivity.READY

        def after_ready() -> list[grpc.ChannelConnectivity]:
            # The states come on gRPC's own thread: READY may be reported after the answer.
            return states[states.index(ready):] if ready in states else []

        deadline = time.monotonic() + 10
        while grpc.ChannelConnectivity.IDLE not in after_ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert grpc.ChannelConnectivity.IDLE in after_ready(), states  # the server sent GOAWAY
        assert stub.Predict(pb.PredictRequest(texts=["abc"]), timeout=10).predictions
