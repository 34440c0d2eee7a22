"""NextCharClient and the CLI against a recording stub server: request fields checked before
sending, model names and priorities on the wire, ListModels and the Admin model calls, the
CLI's JSON (proto field names, numbers as numbers) and the `nextchar models` table.

The stub answers what a multi-model server would, so these run without the serving core.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from nextchar.client import NextCharClient, NextCharError
from nextchar.client.batch import JobOptions, RemoteTarget, run_job
from nextchar.client.cli import main as cli_main
from nextchar.client.client import message_to_dict, priority_value, with_default_port
from nextchar.v1 import admin_pb2, admin_pb2_grpc
from nextchar.v1 import nextchar_pb2 as pb
from nextchar.v1 import nextchar_pb2_grpc as pb_grpc

VOCAB = list("abcdefghijklmnopqrstuvwxyz ")


class Recorder(pb_grpc.NextCharServicer, admin_pb2_grpc.AdminServicer):
    """Keeps every request; answers like a server with models 'small' (default) and 'big'."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def Predict(self, request, context):  # noqa: N802 (gRPC's method names)
        self.requests.append(request)
        top = [pb.CharProb(char="a", prob=0.5)]
        return pb.PredictResponse(predictions=[pb.Prediction(top=top) for _ in request.texts],
                                  model_version="1", model_name=request.model or "small")

    def GetModelInfo(self, request, context):  # noqa: N802
        self.requests.append(request)
        if request.model not in ("", "small", "big"):
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model!r}; "
                                                     f"models: big, small")
        return pb.GetModelInfoResponse(
            name=request.model or "small", version="1", artifact_sha256="ab" * 32, vocab=VOCAB,
            limits=pb.ServerLimits(max_texts_per_request=64, max_chars_per_text=4096,
                                   max_message_bytes=16 * 1024 * 1024, max_top_k=27,
                                   default_top_k=5))

    def Generate(self, request, context):  # noqa: N802
        self.requests.append(request)
        yield pb.GenerateResponse(text="ab")
        yield pb.GenerateResponse(text="c", stop_reason=pb.STOP_REASON_MAX_CHARS)

    def ListModels(self, request, context):  # noqa: N802
        return pb.ListModelsResponse(default_model="small", models=[
            pb.ModelStatus(name="small", version="3", state=pb.MODEL_STATE_READY,
                           is_default=True, artifact_version="20261201-120000"),
            pb.ModelStatus(name="big", state=pb.MODEL_STATE_FAILED,
                           reason="manifest.json: checksum mismatch\nmore"),
        ])

    def ReloadModel(self, request, context):  # noqa: N802
        self.requests.append(request)
        return admin_pb2.ReloadModelResponse(reloaded=False, version="3", model=request.model,
                                             reason="version 3 is already served")

    def LoadModel(self, request, context):  # noqa: N802
        self.requests.append(request)
        return admin_pb2.LoadModelResponse(model=request.model, version="2")

    def UnloadModel(self, request, context):  # noqa: N802
        self.requests.append(request)
        if request.model != "big":
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model!r}")
        return admin_pb2.UnloadModelResponse(model=request.model, version="2")


@pytest.fixture
def stub() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_NextCharServicer_to_server(recorder, server)
    admin_pb2_grpc.add_AdminServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", recorder
    server.stop(0)


# -- request fields are checked before anything is sent ------------------------------------------
@pytest.mark.parametrize(("kwargs", "field"), [
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2**32}, "top_k"),
    ({"top_k": 99999999999}, "top_k"),
    ({"top_k": "3"}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"priority": "urgent"}, "priority"),
    ({"priority": 7}, "priority"),
    ({"model": 3}, "model"),
    ({"states": [b"", "x"]}, "states[1]"),
    ({"timeout_s": -1}, "timeout_s"),
])
def test_predict_bad_arguments_are_invalid_argument(stub, kwargs, field) -> None:
    address, recorder = stub
    with NextCharClient(address) as c, pytest.raises(NextCharError) as e:
        c.predict(["ab"], **kwargs)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details
    assert recorder.requests == []  # nothing was sent


def test_predict_texts_must_be_a_list(stub) -> None:
    with NextCharClient(stub[0]) as c, pytest.raises(NextCharError) as e:
        c.predict("hello")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "texts" in e.value.details


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_chars": -1}, "max_chars"),
    ({"max_chars": 2**32}, "max_chars"),
    ({"top_k": -3}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"temperature": "hot"}, "temperature"),
    ({"stop": "\n"}, "stop"),
    ({"priority": "HIGHEST"}, "priority"),
])
def test_generate_bad_arguments_fail_at_the_call(stub, kwargs, field) -> None:
    address, recorder = stub
    with NextCharClient(address) as c, pytest.raises(NextCharError) as e:
        c.generate("ab", **kwargs)  # raised here, not at the first next()
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details
    assert recorder.requests == []


def test_client_refuses_a_non_positive_timeout() -> None:
    for bad in (0, -1, "5"):
        with pytest.raises(NextCharError) as e:
            NextCharClient("127.0.0.1:1", timeout_s=bad)  # type: ignore[arg-type]
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


# -- model names and priorities reach the server -------------------------------------------------
def test_priorities_map_to_the_enum() -> None:
    assert priority_value("high") == pb.PRIORITY_HIGH
    assert priority_value("LOW") == pb.PRIORITY_LOW
    assert priority_value(None) == priority_value("") == pb.PRIORITY_UNSPECIFIED
    assert priority_value(pb.PRIORITY_LOW) == pb.PRIORITY_LOW


def test_model_and_priority_on_the_wire(stub) -> None:
    address, recorder = stub
    with NextCharClient(address) as c:
        c.predict(["ab"], model="big", priority="low")
        assert "".join(c.generate("ab", max_chars=3, model="big", priority="high")) == "abc"
        assert c.model_info(model="big").name == "big"
        with pytest.raises(NextCharError) as e:
            c.model_info(model="nope")
        assert e.value.code == grpc.StatusCode.NOT_FOUND
    predict, generate, info = recorder.requests[:3]
    assert (predict.model, predict.priority) == ("big", pb.PRIORITY_LOW)
    assert (generate.model, generate.priority) == ("big", pb.PRIORITY_HIGH)
    assert info.model == "big"


def test_list_load_unload_reload(stub) -> None:
    address, recorder = stub
    with NextCharClient(address) as c:
        listing = c.list_models()
        assert [m.name for m in listing.models] == ["small", "big"]
        assert c.load_model("big").version == "2"
        assert c.unload_model("big").model == "big"
        outcome = c.reload_model(model="small")
        assert (outcome.reloaded, outcome.reason) == (False, "version 3 is already served")
        with pytest.raises(NextCharError) as e:
            c.load_model("")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [type(r).__name__ for r in recorder.requests] == [
        "LoadModelRequest", "UnloadModelRequest", "ReloadModelRequest"]
    assert recorder.requests[-1].model == "small"


def test_batch_goes_in_the_low_lane_by_default(stub, tmp_path: Path) -> None:
    address, recorder = stub
    (tmp_path / "in.txt").write_text("ab\ncd\n")
    with NextCharClient(address) as c:
        run_job(tmp_path / "in.txt", tmp_path / "out.jsonl", RemoteTarget(c, model="big"),
                JobOptions(progress=False))
    predicts = [r for r in recorder.requests if isinstance(r, pb.PredictRequest)]
    assert predicts and all((r.model, r.priority) == ("big", pb.PRIORITY_LOW) for r in predicts)
    infos = [r for r in recorder.requests if isinstance(r, pb.GetModelInfoRequest)]
    assert [r.model for r in infos] == ["big"]
    meta = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    assert meta["model"]["name"] == "big"


def test_batch_cli_model_and_priority(stub, tmp_path: Path) -> None:
    address, recorder = stub
    (tmp_path / "in.txt").write_text("ab\n")
    code = cli_main(["batch", str(tmp_path / "in.txt"), "-o", str(tmp_path / "out.jsonl"),
                     "--server", address, "--model", "big", "--priority", "high",
                     "--no-progress"])
    assert code == 0
    (predict,) = [r for r in recorder.requests if isinstance(r, pb.PredictRequest)]
    assert (predict.model, predict.priority) == ("big", pb.PRIORITY_HIGH)


def test_batch_unknown_model_is_a_refusal(stub, tmp_path: Path, capsys) -> None:
    (tmp_path / "in.txt").write_text("ab\n")
    code = cli_main(["batch", str(tmp_path / "in.txt"), "-o", str(tmp_path / "out.jsonl"),
                     "--server", stub[0], "--model", "nope", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "NOT_FOUND" in err and "rerun" not in err
    assert not (tmp_path / "out.jsonl").exists()


# -- CLI output ----------------------------------------------------------------------------------
def test_cli_predict_and_generate_send_model_and_priority(stub, capsys) -> None:
    address, recorder = stub
    assert cli_main(["predict", "--server", address, "--model", "big", "--priority", "low",
                     "ab"]) == 0
    assert cli_main(["generate", "--server", address, "--model", "big", "ab"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "abc"
    predict, generate = recorder.requests
    assert (predict.model, predict.priority) == ("big", pb.PRIORITY_LOW)
    assert (generate.model, generate.priority) == ("big", pb.PRIORITY_UNSPECIFIED)


def test_cli_info_is_snake_case_with_numbers(stub, capsys) -> None:
    assert cli_main(["info", "--server", stub[0], "--model", "big"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out)
    assert info["artifact_sha256"] == "ab" * 32 and "artifactSha256" not in out
    assert info["limits"]["max_message_bytes"] == 16 * 1024 * 1024  # a number, not "16777216"
    assert info["has_unknown_token"] is False  # defaults are printed too
    assert '"vocab": ["a", "b",' in out  # the vocabulary on one line, not 27


def test_cli_models_table_and_json(stub, capsys) -> None:
    assert cli_main(["models", "--server", stub[0]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "STATE", "DEFAULT", "REASON"]
    assert lines[1].split() == ["small", "3", "READY", "yes"]
    assert lines[2].split()[:3] == ["big", "-", "FAILED"]
    assert lines[2].endswith("manifest.json: checksum mismatch")  # first line of the reason
    assert cli_main(["models", "--server", stub[0], "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["default_model"] == "small"
    assert listing["models"][0] == {
        "name": "small", "version": "3", "state": "MODEL_STATE_READY", "reason": "",
        "is_default": True, "artifact_version": "20261201-120000", "backend": "", "device": ""}


def test_cli_load_unload_reload(stub, capsys) -> None:
    address, recorder = stub
    assert cli_main(["load", "--server", address, "big"]) == 0
    assert json.loads(capsys.readouterr().out) == {"model": "big", "version": "2",
                                                   "artifact_sha256": ""}
    assert cli_main(["unload", "--server", address, "small"]) == 1
    assert capsys.readouterr().err.strip() == "nextchar unload: NOT_FOUND: no model 'small'"
    assert cli_main(["reload", "--server", address, "--model", "small"]) == 0
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["reloaded"] is False and outcome["reason"] == "version 3 is already served"


def test_message_to_dict_keeps_uint64_as_numbers() -> None:
    d = message_to_dict(pb.ServerLimits(max_message_bytes=2**40))
    assert d["max_message_bytes"] == 2**40
    assert json.loads(json.dumps(d))["max_message_bytes"] == 2**40


@pytest.mark.parametrize(("given", "dialled"), [
    ("127.0.0.1", "127.0.0.1:50051"),
    ("127.0.0.1:7000", "127.0.0.1:7000"),
    ("localhost", "localhost:50051"),
    ("dns:///nextchar-headless", "dns:///nextchar-headless:50051"),
    ("dns:///nextchar-headless:9000", "dns:///nextchar-headless:9000"),
    ("::1", "[::1]:50051"),
    ("[::1]", "[::1]:50051"),
    ("[::1]:7000", "[::1]:7000"),
    ("unix:/tmp/nextchar.sock", "unix:/tmp/nextchar.sock"),
    ("ipv4:10.0.0.1:1,10.0.0.2:1", "ipv4:10.0.0.1:1,10.0.0.2:1"),
    ("127.0.0.1:", "127.0.0.1:50051"),  # an empty port: the default, not gRPC's 443
    ("localhost:", "localhost:50051"),
    ("[::1]:", "[::1]:50051"),
    ("dns:///nextchar-headless:", "dns:///nextchar-headless:50051"),
    ("127.0.0.1:65535", "127.0.0.1:65535"),
    ("127.0.0.1:1", "127.0.0.1:1"),
    ("unix-abstract:nextchar", "unix-abstract:nextchar"),
    ("IPv6:[::1]:7000", "IPv6:[::1]:7000"),
    # One ipv4:/ipv6: address gets the default port too (gRPC: "target uri is not valid").
    ("ipv4:127.0.0.1", "ipv4:127.0.0.1:50051"),
    ("ipv6:[::1]", "ipv6:[::1]:50051"),
    ("ipv4:127.0.0.1:7000", "ipv4:127.0.0.1:7000"),
])
def test_a_server_without_port_is_50051(given: str, dialled: str) -> None:
    assert with_default_port(given) == dialled


@pytest.mark.parametrize("given", ["127.0.0.1:84067", "127.0.0.1:99999", "127.0.0.1:65536",
                                   "127.0.0.1:0", "127.0.0.1:-1", "[::1]:70000",
                                   "dns:///nextchar-headless:123456"])
def test_a_port_outside_1_to_65535_is_refused(given: str) -> None:
    """gRPC would wrap it: 127.0.0.1:84067 dials port 18531."""
    port = given.rpartition(":")[2]
    with pytest.raises(NextCharError) as e:
        with_default_port(given)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details == (f"server address {given!r}: port {port} is not between 1 and "
                               f"65535")
    with pytest.raises(NextCharError):
        NextCharClient(given)


@pytest.mark.parametrize(("given", "port"), [("localhost:5005l", "5005l"), ("a:b:c", "b:c"),
                                              ("nextchar:grpc", "grpc")])
def test_a_port_that_is_no_number_is_refused(given: str, port: str) -> None:
    """Without a scheme gRPC knows, the text after the colon is a mistyped port; gRPC would
    answer UNAVAILABLE, failing to resolve the whole address as a host name."""
    with pytest.raises(NextCharError) as e:
        with_default_port(given)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details == (f"server address {given!r}: port {port!r} is not a number (give "
                               f"host:port, or a gRPC URI: dns:///, ipv4:, unix:, ...)")


@pytest.mark.parametrize("uri", ["dns:localhost:7000", "unix:/tmp/nextchar.sock",
                                 "ipv4:10.0.0.1:1,10.0.0.2:1"])
def test_a_grpc_uri_of_its_own_is_refused_in_a_list(uri: str) -> None:
    """Each works alone; in a list they were passed to the resolver and failed UNAVAILABLE
    ("cannot resolve unix:/tmp/..."), as if the server were down."""
    from nextchar.client.client import target_for

    with pytest.raises(NextCharError) as e:
        target_for([uri, "127.0.0.1:7001"])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details.startswith(f"server address {uri!r} is a gRPC URI of its own: give "
                                      f"it alone"), e.value.details
    assert target_for(["ipv4:127.0.0.1:7000", "127.0.0.1:7001"]) == \
        "ipv4:127.0.0.1:7000,127.0.0.1:7001"


def test_client_refuses_a_timeout_beyond_grpc_deadlines(stub) -> None:
    """gRPC's deadlines end near 9.2e9 s: a longer timeout failed DEADLINE_EXCEEDED at once."""
    with pytest.raises(NextCharError) as e:
        NextCharClient(stub[0], timeout_s=1e10)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details == ("timeout_s must be at most 1000000000 seconds (about 31 years), "
                               "got 10000000000.0")
    with NextCharClient(stub[0]) as c, pytest.raises(NextCharError) as e:
        c.predict(["ab"], timeout_s=float("inf"))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert stub[1].requests == []


@pytest.mark.parametrize("token", ["tok\r", "tok\n", "to ken", "tök", "\x00", "a\udcffb"])
def test_client_refuses_a_token_that_is_not_printable_ascii(token: str) -> None:
    """It would go out as a header gRPC refuses: core log lines and INTERNAL 'Invalid
    metadata'."""
    with pytest.raises(NextCharError) as e:
        NextCharClient("127.0.0.1:1", token=token)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details.startswith("token must be printable ASCII without spaces; character ")
    assert token not in e.value.details


def test_server_without_port_dials_50051(stub, capsys) -> None:
    """`--server 127.0.0.1` goes to :50051 (gRPC alone would dial :443)."""
    assert cli_main(["health", "--server", "127.0.0.1", "--timeout-s", "2"]) == 1
    assert "127.0.0.1:50051" in capsys.readouterr().err


def test_health_unknown_service_says_so(tiny_server, capsys) -> None:
    assert cli_main(["health", "--server", tiny_server.address, "--service", "bogus"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("nextchar health: NOT_FOUND: no health status for service 'bogus'")


def test_health_of_several_servers_answers_for_each(tiny_server, capsys) -> None:
    """One call on the balanced channel reported whichever replica round_robin picked: with
    one replica draining, SERVING half the time. Each replica now answers for itself, and the
    exit is 0 only when every one is SERVING."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        down = f"127.0.0.1:{s.getsockname()[1]}"
    assert cli_main(["health", "--server", tiny_server.address, "--server", tiny_server.address,
                     "--timeout-s", "2"]) == 0
    assert capsys.readouterr().out == (f"{tiny_server.address} SERVING\n"
                                       f"{tiny_server.address} SERVING\n")
    assert cli_main(["health", "--server", tiny_server.address, "--server", down,
                     "--timeout-s", "2"]) == 1
    first, second = capsys.readouterr().out.splitlines()
    assert first == f"{tiny_server.address} SERVING"
    assert second.startswith(f"{down} UNAVAILABLE: "), second
