"""Graceful drain: SIGTERM/SIGINT on a real `nextchar serve` under load, and stop() in-process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from nextchar.client import NextCharClient, NextCharError
from nextchar.v1 import nextchar_pb2 as pb
from nextchar.v1 import nextchar_pb2_grpc as pb_grpc

# Slow enough that several are in the model when the signal arrives.
HEAVY = [("To be, or not to be, that is the question. " * 4)[:160]] * 48
SMALL_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]


@dataclass
class Outcome:
    sent_at: float
    code: str
    details: str = ""


@dataclass
class Load:
    """Threads sending Predict back to back until stopped; each outcome has its send time."""

    address: str
    threads: int = 4
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._threads = [threading.Thread(target=self._run) for _ in range(self.threads)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        with NextCharClient(self.address, timeout_s=60) as c:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    c.predict(HEAVY, top_k=3)
                    self.outcomes.append(Outcome(sent, "OK"))
                except NextCharError as e:
                    self.outcomes.append(Outcome(sent, e.code.name, e.details))
                    if e.code == grpc.StatusCode.UNAVAILABLE:
                        return  # the replica is gone: a client with others would use those
                    time.sleep(0.01)

    def ok(self) -> int:
        return sum(o.code == "OK" for o in self.outcomes)

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(60)


def _eventually(check, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def _health(c: NextCharClient) -> str:
    try:
        return c.health(timeout_s=2)
    except NextCharError as e:
        return e.code.name


def test_sigterm_under_load_fails_no_accepted_request(server_process, tiny_artifact: Path) -> None:
    # A 3 s pre-stop wait: on a loaded machine, health's flip and a call's trip to the server
    # may take a good part of a second, and both must still land inside it.
    prestop_s, grace_s = 3.0, 20.0
    sp = server_process(["--model", str(tiny_artifact), "--prestop-s", str(prestop_s),
                         "--grace-s", str(grace_s), "--max-chars-per-text", "100000"])
    # A stream in flight across the signal, read slowly so it is still running at the drain.
    stream_channel = grpc.insecure_channel(sp.address, options=SMALL_WINDOW)
    stream = pb_grpc.NextCharStub(stream_channel).Generate(
        pb.GenerateRequest(prompt="hello", max_chars=5_000, seed=1), timeout=120)
    first = next(stream)
    load = Load(sp.address)
    try:
        _eventually(lambda: load.ok() >= 20, "20 answers before the signal")
        with NextCharClient(sp.address, timeout_s=10) as probe:
            signalled_at = time.monotonic()
            sp.proc.send_signal(signal.SIGTERM)
            _eventually(lambda: _health(probe) == "NOT_SERVING", "health NOT_SERVING", prestop_s)
            # Still inside the pre-stop wait: work is still accepted.
            assert len(probe.predict(["abc"])) == 1
        *_, last = stream  # the stream finishes within grace, cleanly
        assert sp.proc.wait(prestop_s + grace_s + 15) == 0
    finally:
        load.join()
        stream_channel.close()
    assert len(first.text) + len(last.text) > 0
    assert last.stop_reason == pb.STOP_REASON_MAX_CHARS
    before = [o for o in load.outcomes if o.sent_at < signalled_at]
    after = [o for o in load.outcomes if o.sent_at >= signalled_at]
    assert len(before) >= 20 and {o.code for o in before} == {"OK"}
    # Accepted calls all succeed. After the pre-stop wait the server sent GOAWAY and closed its
    # port, so a call sent then meets no server (UNAVAILABLE: the client retried it and had no
    # other replica); every call sent well inside the pre-stop wait succeeded.
    refused = [o for o in after if o.code != "OK"]
    assert {o.code for o in refused} == {"UNAVAILABLE"}, refused
    assert all(o.sent_at >= signalled_at + prestop_s - 0.5 for o in refused), refused
    assert any(o.code == "OK" for o in after)  # the pre-stop wait kept serving
    assert len(refused) == load.threads  # each thread was refused once, after the pre-stop wait
    log = sp.log()
    assert "SIGTERM: draining" in log and "all finished" in log


def test_sigint_drains_and_exits_zero_with_json_logs(server_process, tiny_artifact: Path) -> None:
    sp = server_process(["--model", str(tiny_artifact), "--log-format", "json"])
    with NextCharClient(sp.address) as c:
        c.predict(["abc"])
    sp.proc.send_signal(signal.SIGINT)
    assert sp.proc.wait(30) == 0
    lines = [json.loads(line) for line in sp.log().splitlines()]  # every line is one object
    messages = [line["msg"] for line in lines]
    assert any(m.startswith("SIGINT: draining") for m in messages)
    assert any(m.startswith("stopped: ") for m in messages)
    assert {"ts", "level", "logger", "msg"} <= set(lines[0])


def test_a_stream_longer_than_grace_ends_with_unavailable(server_process, tiny_artifact) -> None:
    sp = server_process(["--model", str(tiny_artifact), "--grace-s", "1",
                         "--max-chars-per-text", "100000000"])
    with NextCharClient(sp.address, timeout_s=120) as c:
        chunks = c.generate("hello", max_chars=100_000_000, seed=1)
        next(chunks)
        sp.proc.send_signal(signal.SIGTERM)
        with pytest.raises(NextCharError) as e:
            for _ in chunks:
                pass
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert "stream ended early" in e.value.details
    assert sp.proc.wait(30) == 0
    assert "grace exceeded" in sp.log()
    # The one stream is counted as still running (it was counted after being ended: 0).
    assert "draining: 1 call(s) still running after grace 1.0s: streams ended with " \
        "UNAVAILABLE, 0 left cancelled" in sp.log()


def _endless_http_generations(sp, tiny_artifact: Path, stream_completion: bool
                              ) -> tuple[list[threading.Thread], dict[str, Any]]:
    """Threads (not started) asking a native generation and a completion that never end by
    themselves; `replies` gets each one's answer by path."""
    from http_util import call

    name = json.loads((tiny_artifact / "manifest.json").read_text())["name"]
    replies: dict[str, Any] = {}

    def ask(path: str, body: dict) -> None:
        replies[path] = call(sp.http_url, "POST", path, body, timeout_s=60)

    return [threading.Thread(target=ask, args=a) for a in (
        ("/nextchar/v1/generate", {"prompt": "hello", "max_chars": 100_000_000}),
        ("/v1/completions", {"model": name, "prompt": "hello", "max_tokens": 100_000_000,
                             "stream": stream_completion}))], replies


def test_non_streaming_http_generations_past_the_grace_get_503_in_their_shape(
        server_process, tiny_artifact) -> None:
    """An answer that sends nothing until it is whole cannot end at its next message: its
    streams fail with NotReady, answered 503 with the route's error body (not a 500)."""

    sp = server_process(["--model", str(tiny_artifact), "--grace-s", "0.5", "--http-port", "0",
                         "--max-chars-per-text", "100000000", "--metrics-port", "0"])
    askers, replies = _endless_http_generations(sp, tiny_artifact, stream_completion=False)
    for t in askers:
        t.start()
    _eventually(lambda: _active_streams(sp.metrics_url) == 2, "both generations running")
    sp.proc.send_signal(signal.SIGTERM)
    for t in askers:
        t.join(60)
    native, openai = replies["/nextchar/v1/generate"], replies["/v1/completions"]
    assert (native.status, openai.status) == (503, 503), (native, openai)
    assert native.json() == {"error": "server is shutting down; retry on another replica"}
    err = openai.json()["error"]
    assert (err["message"], err["type"]) == ("server is shutting down; retry on another replica",
                                             "service_unavailable")
    assert sp.proc.wait(30) == 0


def test_an_http_call_cancelled_by_the_stop_logs_no_error(server_process, tiny_artifact) -> None:
    """A call still running when the stop cancels it (here: its body stalled mid-upload) is
    an expected end: one INFO line, not uvicorn's ERROR with a CancelledError traceback."""
    import socket
    from urllib.parse import urlsplit

    sp = server_process(["--model", str(tiny_artifact), "--grace-s", "0.5", "--http-port", "0"])
    url = urlsplit(sp.http_url)
    name = json.loads((tiny_artifact / "manifest.json").read_text())["name"]
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                     f'{{"inputs": ['.encode())
        time.sleep(0.3)  # the call is running, awaiting the rest of its body
        sp.proc.send_signal(signal.SIGTERM)
        assert sp.proc.wait(30) == 0
    log = sp.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log
    assert "an HTTP call still running when the server stopped was cancelled" in log, log


def _active_streams(metrics_url: str | None) -> float:
    import urllib.request

    assert metrics_url is not None
    body = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in body.splitlines()
               if line.startswith("nextchar_active_streams"))


def test_a_second_signal_stops_at_once_and_every_call_ends_in_its_shape(
        server_process, tiny_artifact: Path) -> None:
    """The second signal skips the grace, but the calls still end as at the grace's end: a
    gRPC stream UNAVAILABLE with the stream-ended text, a non-streaming HTTP generation a 503
    in its route's body, an SSE stream an in-band error then [DONE]. They were cancelled:
    uvicorn answered a bare "Internal Server Error" 500 and cut the streams mid-body, and the
    log said "all finished"."""

    sp = server_process(["--model", str(tiny_artifact), "--grace-s", "600", "--http-port", "0",
                         "--max-chars-per-text", "100000000", "--metrics-port", "0"])
    askers, replies = _endless_http_generations(sp, tiny_artifact, stream_completion=True)
    with NextCharClient(sp.address, timeout_s=120) as c:
        chunks = c.generate("hello", max_chars=100_000_000, seed=1)
        next(chunks)
        for t in askers:
            t.start()
        _eventually(lambda: _active_streams(sp.metrics_url) == 3, "all three generations")
        sp.proc.send_signal(signal.SIGTERM)
        _eventually(lambda: "SIGTERM: draining" in sp.log(), "the first signal handled")
        sp.proc.send_signal(signal.SIGTERM)
        with pytest.raises(NextCharError) as e:
            for _ in chunks:
                pass
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert "stream ended early" in e.value.details
        for t in askers:
            t.join(60)
    assert sp.proc.wait(30) == 0  # far less than the 600 s grace
    native, openai = replies["/nextchar/v1/generate"], replies["/v1/completions"]
    assert native.status == 503, native
    assert native.json() == {"error": "server is shutting down; retry on another replica"}
    events = openai.events()
    assert openai.status == 200 and events[-1] == "[DONE]", openai
    assert events[-2]["error"]["type"] == "service_unavailable", events[-2]
    assert "SIGTERM again: stopping now" in sp.log()
    assert "3 ended by a second signal" in sp.log()


def test_stop_refuses_new_work_while_accepted_work_finishes(start_server, tiny_artifact) -> None:
    st = start_server(model=tiny_artifact, max_chars_per_text=100_000)
    with grpc.insecure_channel(st.address, options=SMALL_WINDOW) as ch, \
            NextCharClient(st.address) as c:
        stream = pb_grpc.NextCharStub(ch).Generate(
            pb.GenerateRequest(prompt="hello", max_chars=5_000, seed=2), timeout=120)
        next(stream)
        assert c.health() == "SERVING"  # the client's connection is up before the drain
        stopping = asyncio.run_coroutine_threadsafe(st.server.stop(grace_s=60), st.loop)
        _eventually(lambda: st.server.gate.closed, "the gate closed")
        # GOAWAY: the client's connection is closed for new calls and the port with it, so
        # every new call, health checks included, finds no server.
        assert _health(c) == "UNAVAILABLE"
        with pytest.raises(NextCharError) as e:
            c.predict(["abc"])
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(NextCharError) as e:
            c.reload_model()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert not stopping.done()  # waiting for the stream
        *_, last = stream
        assert last.stop_reason == pb.STOP_REASON_MAX_CHARS
        stopping.result(60)


def _threads_and_fds() -> tuple[set[threading.Thread], set[str]]:
    return set(threading.enumerate()), set(os.listdir("/proc/self/fd"))


def test_an_in_process_server_leaves_no_thread_or_descriptor_behind(
        tiny_artifact: Path, tmp_path: Path) -> None:
    """tests/conftest.py's ServerThread, which hundreds of tests start: stopping one also shuts
    down its loop's default executor and closes the loop (else a thread and three descriptors
    stay per server); a start that fails cleans up the same."""
    from http_util import root_conftest

    ServerThread = root_conftest().ServerThread
    with ServerThread(model=tiny_artifact, backend="onnx") as st:  # gRPC's own, made once
        st.call(asyncio.to_thread(int))
    threads, fds = _threads_and_fds()
    with ServerThread(model=tiny_artifact, backend="onnx") as st:
        st.call(asyncio.to_thread(int))  # the loop's default executor has a thread
        assert _threads_and_fds() != (threads, fds)
    after_threads, after_fds = _threads_and_fds()
    assert after_threads - threads == set() and after_fds - fds == set()
    assert st.loop.is_closed()
    failed = ServerThread(model=tmp_path / "no-such-artifact", backend="onnx")
    with pytest.raises(Exception, match="no such directory"):
        failed.__enter__()
    assert failed.loop.is_closed() and not failed._thread.is_alive()
    failed.__exit__(None, None, None)  # a second exit (start_server's) is a no-op
    assert _threads_and_fds()[0] - threads == set()
