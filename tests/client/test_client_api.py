"""NextCharClient as a library: what it refuses at construction (TLS settings that would end in
plaintext, a bad message size), errors a caller can keep (pickled through a process pool, with
the server's request id), a closed client, a partial OpenTelemetry install, and streams that
cancel their call when closed.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from nextchar.client import NextCharClient, NextCharError
from nextchar.v1 import nextchar_pb2 as pb
from nextchar.v1 import nextchar_pb2_grpc as pb_grpc

THIN_VENV = __import__("os").environ.get("NEXTCHAR_CLIENT_VENV")


class EndlessGenerate(pb_grpc.NextCharServicer):
    """Generate sends a chunk every 10 ms until the client cancels; `ended` is set then."""

    def __init__(self) -> None:
        self.ended = threading.Event()

    def Generate(self, request, context):  # noqa: N802 (gRPC's method names)
        context.add_callback(self.ended.set)
        while context.is_active():
            yield pb.GenerateResponse(text="a")
            time.sleep(0.01)

    def Predict(self, request, context):  # noqa: N802
        context.set_trailing_metadata((("x-request-id", "req-7"),))
        context.abort(grpc.StatusCode.NOT_FOUND, "no model 'nope'")

    def GetModelInfo(self, request, context):  # noqa: N802 (answers only once cancelled)
        while context.is_active():
            time.sleep(0.01)
        return pb.GetModelInfoResponse()


@pytest.fixture
def endless() -> Iterator[tuple[str, EndlessGenerate]]:
    servicer = EndlessGenerate()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_NextCharServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


def _invalid(**kwargs: Any) -> str:
    with pytest.raises(NextCharError) as e:
        NextCharClient("127.0.0.1:1", **kwargs)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return e.value.details


# -- TLS settings never end in plaintext ----------------------------------------------------------
def test_a_key_without_its_certificate_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    assert _invalid(tls_key=key) == ("--tls-cert and --tls-key go together (the client "
                                     "certificate and its key)")


def test_a_server_name_without_tls_is_refused() -> None:
    assert _invalid(tls_server_name="nextchar.internal").startswith(
        "tls_server_name (--tls-server-name) is the name to verify in the server's certificate: "
        "it needs TLS")


def test_the_cli_refuses_a_lone_tls_key(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    r = subprocess.run([sys.executable, "-m", "nextchar.client.cli", "predict", "--server",
                        "127.0.0.1:1", "--tls-key", str(key), "hi"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stdout == ""
    assert "--tls-cert and --tls-key go together" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("size", [0, -5, "big", 2**31])
def test_max_message_bytes_is_checked(size: Any) -> None:
    assert _invalid(max_message_bytes=size).startswith("max_message_bytes must be")


# -- errors ---------------------------------------------------------------------------------------
def test_an_error_carries_the_servers_request_id(endless) -> None:
    address, _ = endless
    with NextCharClient(address, timeout_s=10) as c, pytest.raises(NextCharError) as e:
        c.predict(["x"])
    assert (e.value.code, e.value.details, e.value.request_id) == (
        grpc.StatusCode.NOT_FOUND, "no model 'nope'", "req-7")


def test_a_refusal_before_any_call_has_no_request_id() -> None:
    with NextCharClient("127.0.0.1:1") as c, pytest.raises(NextCharError) as e:
        c.predict(["x"], top_k=-1)
    assert e.value.request_id is None


def _raise_in_worker() -> None:
    raise NextCharError(grpc.StatusCode.UNAVAILABLE, "server went away", "req-9")


def test_an_error_pickles_through_a_process_pool() -> None:
    err = pickle.loads(pickle.dumps(NextCharError(grpc.StatusCode.UNAVAILABLE, "x", "req-1")))
    assert (err.code, err.details, err.request_id, str(err)) == (
        grpc.StatusCode.UNAVAILABLE, "x", "req-1", "UNAVAILABLE: x")
    with futures.ProcessPoolExecutor(1) as pool, pytest.raises(NextCharError) as e:
        pool.submit(_raise_in_worker).result(timeout=60)
    assert (e.value.code, e.value.details, e.value.request_id) == (
        grpc.StatusCode.UNAVAILABLE, "server went away", "req-9")


@pytest.mark.parametrize("call", ["predict", "health", "generate", "model_info"])
def test_a_closed_client_says_so(endless, call: str) -> None:
    c = NextCharClient(endless[0])
    c.close()
    with pytest.raises(NextCharError) as e:
        if call == "predict":
            c.predict(["x"])
        elif call == "generate":
            c.generate("x")
        else:
            getattr(c, call)()
    assert (e.value.code, e.value.details) == (grpc.StatusCode.FAILED_PRECONDITION,
                                               "this NextCharClient is closed; make a new one")


def test_a_client_closed_by_another_thread_mid_call_says_so(endless) -> None:
    """The call in flight ends as every later one does, not with gRPC's bare CANCELLED."""
    c = NextCharClient(endless[0], timeout_s=30)
    errors: list[NextCharError] = []

    def call() -> None:
        try:
            c.model_info()
        except NextCharError as e:
            errors.append(e)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.3)  # the call is in flight: the server answers only once it is cancelled
    c.close()
    caller.join(10)
    assert [(e.code, e.details) for e in errors] == [
        (grpc.StatusCode.FAILED_PRECONDITION, "this NextCharClient is closed; make a new one")]


def test_generate_responses_checks_its_timeout_at_the_call(endless) -> None:
    with NextCharClient(endless[0]) as c, pytest.raises(NextCharError) as e:
        c.generate_responses(pb.GenerateRequest(prompt="x"), timeout_s=-1)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_partial_opentelemetry_install_is_ignored(endless, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """opentelemetry-proto without opentelemetry-api: the package is there, its propagator not."""
    (tmp_path / "opentelemetry" / "proto").mkdir(parents=True)
    (tmp_path / "opentelemetry" / "proto" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "opentelemetry.propagate", None)  # import fails
    with NextCharClient(endless[0], timeout_s=10) as c:
        assert c.generate("x", max_chars=1).__next__() == "a"


# -- streams cancel their call when closed --------------------------------------------------------
def test_closing_a_kept_stream_cancels_the_call(endless) -> None:
    address, servicer = endless
    with NextCharClient(address) as c:
        chunks = c.generate("x")
        for i, _ in enumerate(chunks):
            if i == 2:
                break
        assert not servicer.ended.wait(0.3)  # a kept iterator lives on after break...
        chunks.close()  # ...until closed
        assert servicer.ended.wait(5)
        with pytest.raises(StopIteration):
            next(chunks)


def test_closing_a_stream_from_another_thread_ends_the_loop_and_the_call(endless) -> None:
    address, servicer = endless
    with NextCharClient(address) as c:
        for ask in (lambda: c.generate("x"),
                    lambda: c.generate_responses(pb.GenerateRequest(prompt="x"))):
            servicer.ended.clear()
            chunks = ask()
            next(chunks)
            closer = threading.Timer(0.2, chunks.close)  # while this thread waits in next()
            closer.start()
            n = sum(1 for _ in chunks)  # ends, without an error: the cancel was asked for
            closer.join()
            assert 0 < n < 1000 and servicer.ended.wait(5)


def test_a_stream_of_a_client_closed_since_says_so(endless) -> None:
    c = NextCharClient(endless[0])
    chunks = c.generate("x")
    c.close()
    with pytest.raises(NextCharError) as e:
        next(chunks)
    assert (e.value.code, e.value.details) == (grpc.StatusCode.FAILED_PRECONDITION,
                                               "this NextCharClient is closed; make a new one")


def test_a_stream_used_with_with_cancels_at_its_end(endless) -> None:
    address, servicer = endless
    with NextCharClient(address) as c:
        with c.generate("x") as chunks:
            assert next(chunks) == "a"
        assert servicer.ended.wait(5)


def test_breaking_out_of_a_loop_over_the_call_cancels_it(endless) -> None:
    address, servicer = endless
    with NextCharClient(address) as c:
        for _ in c.generate("x"):
            break
        assert servicer.ended.wait(5)


def test_generate_responses_closes_too(endless) -> None:
    address, servicer = endless
    with NextCharClient(address) as c:
        with c.generate_responses(pb.GenerateRequest(prompt="x")) as responses:
            assert next(responses).text == "a"
        assert servicer.ended.wait(5)


@pytest.mark.skipif(not THIN_VENV, reason="NEXTCHAR_CLIENT_VENV unset: `make test` builds it")
def test_local_target_in_the_thin_install_names_the_extra(tmp_path: Path) -> None:
    code = ("from nextchar.client.batch import LocalTarget\n"
            "try:\n    LocalTarget('x')\nexcept ImportError as e:\n    print(e)\n")
    r = subprocess.run([str(Path(str(THIN_VENV)) / "bin" / "python"), "-c", code],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("LocalTarget runs the server's core in this process: it needs "
                               "'pip install nextchar[serve]' (No module named '")


@pytest.mark.parametrize(("call", "name"), [
    (lambda c: c.predict(["a\ud800"]), "texts[0]"),
    (lambda c: c.model_info("\udc80"), "model"),
    (lambda c: c.load_model("x\udc80"), "model"),
    (lambda c: list(c.generate("hi", stop=["\ud800"])), "stop[0]"),
    (lambda c: list(c.generate("h\ud800i")), "prompt"),
])
def test_a_lone_surrogate_is_invalid_argument_not_a_unicode_error(call: Any, name: str) -> None:
    """os.fsdecode and argv make lone surrogates of bytes that are not UTF-8; protobuf raised a
    bare UnicodeEncodeError building the request."""
    with NextCharClient("127.0.0.1:1") as c, pytest.raises(NextCharError) as e:
        call(c)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details.startswith(f"{name}: character U+D")
    assert e.value.details.endswith("is a lone surrogate, not valid Unicode")
