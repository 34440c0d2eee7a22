"""Batch jobs against real servers: order, resume after kill -9, server restart, bad lines,
several replicas, shards, --local.

Exact line-for-line comparisons use `det_server` (batching off) with one text per request: every
text is then computed alone, so results are bitwise repeatable. With batching, a row's float32
result depends on its batch neighbours in the last bit (about 1 line in 150 differs in the 6th
decimal), which would make "equal to an uninterrupted run" a matter of luck.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from nextchar.client import NextCharClient, NextCharError, prediction_to_dict
from nextchar.client.batch import (
    Answerer,
    JobAborted,
    JobOptions,
    LocalTarget,
    ModelSpec,
    RemoteTarget,
    run_job,
)
from nextchar.client.batch_io import JobError, NotYet, cannot_write, count_lines, output_lock
from nextchar.client.cli import main as cli_main
from nextchar.v1 import nextchar_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
# The tiny artifact's vocabulary (tests/conftest.py TINY_VOCAB) without the newline: the
# characters a text-per-line input can hold.
TEXT_CHARS = " !',.?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def write_texts(path: Path, n: int, seed: int = 0, max_len: int = 40) -> list[str]:
    rng = random.Random(seed)
    texts = ["".join(rng.choice(TEXT_CHARS) for _ in range(rng.randint(1, max_len)))
             for _ in range(n)]
    path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    return texts


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def exact_opts(**kw: Any) -> JobOptions:
    """One text per request: with batching off, each text is computed alone (bitwise repeatable)."""
    base: dict[str, Any] = dict(texts_per_request=1, concurrency=2, top_k=3, progress=False)
    base.update(kw)
    return JobOptions(**base)


@pytest.fixture(scope="module")
def server_thread(tiny_server: Any) -> Any:
    """tests/conftest.py's Any class. It cannot be imported: tests/ is no package, so
    `conftest` names whichever conftest module pytest loaded last (tests/training has one)."""
    return type(tiny_server)


@pytest.fixture(scope="module")
def det_server(tiny_artifact: Path, server_thread: Any) -> Iterator[Any]:
    with server_thread(model=tiny_artifact, backend="onnx", batching=False) as st:
        yield st


def test_text_chars_are_the_tiny_vocabulary(tiny_artifact: Path) -> None:
    vocab = json.loads((tiny_artifact / "manifest.json").read_text())["vocab"]
    assert sorted(TEXT_CHARS + "\n") == sorted(vocab)


def remote(address: str | list[str]) -> RemoteTarget:
    return RemoteTarget(NextCharClient(address, timeout_s=10))


def run_remote(address: str | list[str], inp: Path, out: Path, opts: JobOptions) -> Any:
    target = remote(address)
    try:
        return run_job(inp, out, target, opts)
    finally:
        target.close()


class Wrapped:
    """A real RemoteTarget with a hook before each Predict: delay, fail, or fake a spec."""

    def __init__(self, inner: RemoteTarget, spec_vocab_off: bool = False) -> None:
        self.inner = inner
        self.spec_vocab_off = spec_vocab_off
        self.calls = 0
        self.completed: list[str] = []  # first text of each completed call, in completion order
        self.lock = threading.Lock()

    def model_spec(self) -> ModelSpec:
        spec = self.inner.model_spec()
        if self.spec_vocab_off:  # the client skips its own vocabulary check: the server's counts
            spec = ModelSpec(**{**spec.__dict__, "vocab": None})
        return spec

    def before(self, call: int, texts: list[str]) -> None:
        pass

    def predict(self, texts: list[str], top_k: int, per_position: bool, timeout_s: float
                ) -> tuple[list[pb.Prediction], Answerer]:
        with self.lock:
            call = self.calls
            self.calls += 1
        self.before(call, texts)
        result: tuple[list[pb.Prediction], Answerer] = self.inner.predict(
            texts, top_k, per_position, timeout_s)
        with self.lock:
            self.completed.append(texts[0])
        return result

    def close(self) -> None:
        self.inner.close()


# -- order -------------------------------------------------------------------------------------
def test_order_kept_with_concurrency(tmp_path: Path, tiny_server: Any,
                                     client: NextCharClient) -> None:
    texts = write_texts(tmp_path / "in.txt", 300, seed=1)

    class SlowFirst(Wrapped):
        def before(self, call: int, chunk: list[str]) -> None:
            if chunk[0] == texts[0]:  # the first chunk answers last: the writer holds the rest
                deadline = time.monotonic() + 30  # however slow the machine: 10 others first
                while len(self.completed) < 10 and time.monotonic() < deadline:
                    time.sleep(0.01)

    target = SlowFirst(remote(tiny_server.address))
    summary = run_job(tmp_path / "in.txt", tmp_path / "out.jsonl", target,
                      JobOptions(concurrency=4, texts_per_request=7, top_k=3, progress=False))
    target.close()
    # Later chunks completed before the first one: the writer had to restore the order.
    assert target.completed.index(texts[0]) >= 10
    assert (summary.written, summary.errors, summary.resumed) == (300, 0, 0)
    records = read_records(tmp_path / "out.jsonl")
    assert [r["index"] for r in records] == list(range(300))
    assert [r["text"] for r in records] == texts
    for text, rec in zip(texts, records, strict=True):
        want = prediction_to_dict(text, client.predict([text], top_k=3)[0])
        assert [c["char"] for c in rec["top"]] == [c["char"] for c in want["top"]]
        assert [c["prob"] for c in rec["top"]] == pytest.approx(
            [c["prob"] for c in want["top"]], abs=2e-6)
        assert rec["id"] is None


# -- resume ------------------------------------------------------------------------------------
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nextchar.client.cli", "batch", *args]


def test_kill_9_mid_job_then_rerun_equals_uninterrupted_run(tmp_path: Path,
                                                            det_server: Any) -> None:
    inp = tmp_path / "in.txt"
    texts = write_texts(inp, 1500, seed=2)
    ref = tmp_path / "ref.jsonl"
    run_remote(det_server.address, inp, ref, exact_opts())

    out = tmp_path / "out.jsonl"
    args = _cli(str(inp), "-o", str(out), "--server", det_server.address, "--top-k", "3",
                "--texts-per-request", "1", "--concurrency", "2", "--no-progress")
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= 200:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the job ended before it was killed"
    partial = out.read_bytes()
    assert 200 <= partial.count(b"\n") < len(texts)

    rerun = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    assert out.read_bytes() == ref.read_bytes()
    assert out.read_bytes().startswith(partial[: partial.rfind(b"\n") + 1])


@pytest.mark.parametrize("cut", ["mid_line", "line_end"])
def test_torn_last_line_is_dropped_and_redone(tmp_path: Path, det_server: Any,
                                              cut: str) -> None:
    inp = tmp_path / "in.txt"
    write_texts(inp, 200, seed=3)
    ref = tmp_path / "ref.jsonl"
    run_remote(det_server.address, inp, ref, exact_opts())
    out = tmp_path / "out.jsonl"
    run_remote(det_server.address, inp, out, exact_opts())
    data = out.read_bytes()
    line_end = [i for i, b in enumerate(data) if b == ord("\n")][120]
    out.write_bytes(data[: line_end - 10] if cut == "mid_line" else data[: line_end + 1])

    summary = run_remote(det_server.address, inp, out, exact_opts())
    assert summary.resumed == (120 if cut == "mid_line" else 121)
    assert summary.written == 200 - summary.resumed
    assert out.read_bytes() == ref.read_bytes()


def test_server_stopped_and_restarted_mid_job(tmp_path: Path, tiny_artifact: Path,
                                              det_server: Any, server_thread: Any) -> None:
    inp = tmp_path / "in.txt"
    write_texts(inp, 1200, seed=4)
    ref = tmp_path / "ref.jsonl"
    run_remote(det_server.address, inp, ref, exact_opts())

    out = tmp_path / "out.jsonl"
    first = server_thread(model=tiny_artifact, backend="onnx", batching=False).__enter__()
    port = first.port
    result: dict[str, Any] = {}
    opts = exact_opts(backoff_base_s=0.05, backoff_max_s=0.5, max_retries=50)

    def job() -> None:
        try:
            result["summary"] = run_remote(first.address, inp, out, opts)
        except BaseException as e:  # noqa: BLE001 - reported by the assertions below
            result["error"] = e

    t = threading.Thread(target=job)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_bytes().count(b"\n") >= 200):
            assert time.monotonic() < deadline and t.is_alive(), result
            time.sleep(0.005)
    finally:
        first.__exit__(None, None, None)  # stopped mid-job: calls fail UNAVAILABLE
    time.sleep(0.5)
    assert t.is_alive(), "the job ended while the server was down"
    with server_thread(model=tiny_artifact, backend="onnx", batching=False, port=port) as second:
        assert second.port == port
        t.join(120)
        assert not t.is_alive()
    assert "error" not in result, result
    summary = result["summary"]
    assert summary.retries >= 1 and summary.errors == 0
    assert not any("error" in r for r in read_records(out))
    assert out.read_bytes() == ref.read_bytes()


def test_retries_exhausted_stop_the_job_and_a_rerun_resumes(tmp_path: Path,
                                                            det_server: Any) -> None:
    inp = tmp_path / "in.txt"
    write_texts(inp, 100, seed=5)
    ref = tmp_path / "ref.jsonl"
    run_remote(det_server.address, inp, ref, exact_opts())

    class DownAfter40(Wrapped):
        def before(self, call: int, texts: list[str]) -> None:
            if call >= 40:
                raise NextCharError(grpc.StatusCode.UNAVAILABLE, "replica gone")

    out = tmp_path / "out.jsonl"
    target = DownAfter40(remote(det_server.address))
    with pytest.raises(JobAborted, match=r"UNAVAILABLE after 2 retries: replica gone; stopped "
                                         r"after \d+/100 items: rerun the same command"):
        run_job(inp, out, target, exact_opts(concurrency=1, max_retries=2, backoff_base_s=0.01))
    target.close()
    assert count_lines(out) == 40
    assert out.read_bytes() == ref.read_bytes()[: len(out.read_bytes())]
    summary = run_remote(det_server.address, inp, out, exact_opts())
    assert (summary.resumed, summary.written) == (40, 60)
    assert out.read_bytes() == ref.read_bytes()


# -- bad input -----------------------------------------------------------------------------------
BAD_JSONL = (
    b'{"id": "a", "text": "hello"}\n'
    b'{"id": "b", "text": \n'
    b'{"id": "c", "text": ""}\n'
    b'{"id": "d", "text": "bad \xc3\xa9 char"}\n'
    b'{"id": "e"}\n'
    b'\xff\xfe not utf-8\n'
    b'{"id": 7, "text": "world"}\n'
    b'{"id": "\\ud801", "text": "a\\ud800b"}\n'
    b'{"id": 1e400, "text": "hi"}\n'
    b'{"id": NaN, "text": "yo"}\n'
)
BAD_ERRORS = {
    1: (None, None, "line is not valid JSON: Expecting value (column 21)"),
    2: ("c", "", "empty text: every text needs at least one character"),
    3: ("d", "bad é char", "character 'é' (U+00E9) at position 4 is not in the model's "
                           "vocabulary (59 characters; see GetModelInfo)"),
    4: ("e", None, 'expected a JSON object with a string "text" field'),
    5: (None, None, "line is not valid UTF-8 (byte 0)"),
    7: ("\ud801", "a\ud800b", "text is not valid Unicode: lone surrogate U+D800 at position 1"),
    # Python's json reads both; echoed back, they would not be JSON (Infinity, NaN).
    8: (None, None, "line is not valid JSON: the number 1e400 is out of range for a double"),
    9: (None, None, "line is not valid JSON: NaN is not a JSON value"),
}


@pytest.mark.parametrize("checked_by", ["client", "server"])
def test_bad_lines_become_error_records_and_the_job_goes_on(
    tmp_path: Path, tiny_server: Any, checked_by: str
) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(BAD_JSONL)
    target = Wrapped(remote(tiny_server.address), spec_vocab_off=checked_by == "server")
    summary = run_job(inp, tmp_path / "out.jsonl", target,
                      JobOptions(texts_per_request=8, top_k=2, progress=False))
    target.close()
    assert (summary.written, summary.errors) == (10, 8)
    records = read_records(tmp_path / "out.jsonl")
    assert [r["index"] for r in records] == list(range(10))
    for line in (tmp_path / "out.jsonl").read_text().splitlines():  # strict JSON throughout
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the output"))
    for i, rec in enumerate(records):
        if i in (0, 6):
            assert (rec["id"], rec["text"], len(rec["top"])) == (("a", "hello", 2) if i == 0
                                                                  else (7, "world", 2))
            continue
        rid, text, message = BAD_ERRORS[i]
        assert rec == {"index": i, "id": rid, "text": text,
                       "error": {"code": "INVALID_ARGUMENT", "message": message}}
    if checked_by == "server":
        # 'hello', 'bad é char' and 'world' went in one request; the server refused it, the job
        # split it and only the bad text became an error record.
        assert target.calls == 4


def test_other_errors_become_error_records_at_once(tmp_path: Path,
                                                   det_server: Any) -> None:
    inp = tmp_path / "in.txt"
    texts = write_texts(inp, 10, seed=6)

    class InternalOnSecond(Wrapped):
        def before(self, call: int, texts: list[str]) -> None:
            if call == 1:
                raise NextCharError(grpc.StatusCode.INTERNAL, "internal server error")

    target = InternalOnSecond(remote(det_server.address))
    summary = run_job(inp, tmp_path / "out.jsonl", target,
                      exact_opts(concurrency=1, texts_per_request=4))
    target.close()
    assert (summary.errors, summary.retries, target.calls) == (4, 0, 3)
    records = read_records(tmp_path / "out.jsonl")
    assert [("error" in r) for r in records] == [False] * 4 + [True] * 4 + [False] * 2
    assert records[5] == {"index": 5, "id": None, "text": texts[5],
                          "error": {"code": "INTERNAL", "message": "internal server error"}}


@pytest.mark.parametrize(("code", "details", "hint"), [
    (grpc.StatusCode.UNAUTHENTICATED, "bearer token not accepted",
     "check --token or NEXTCHAR_TOKEN"),
    (grpc.StatusCode.PERMISSION_DENIED, "this token may not call Predict",
     "use a token that may call Predict"),
    (grpc.StatusCode.UNIMPLEMENTED, "Method not found!",
     "the server has no nextchar.v1 Predict; check --server"),
    (grpc.StatusCode.FAILED_PRECONDITION, "model 'tiny' failed to load: bad checksum",
     "the model cannot be served now; nextchar models says why"),
])
def test_codes_about_the_call_stop_the_job_and_a_rerun_resumes(
        tmp_path: Path, det_server: Any, code: grpc.StatusCode, details: str, hint: str) -> None:
    """A rotated token, a revoked permission, a server without Predict: every later item would
    get the same answer. They became error records for every item with exit 0, and a rerun
    (with the right token) took the job as done."""
    inp = tmp_path / "in.txt"
    write_texts(inp, 10, seed=6)
    ref = tmp_path / "ref.jsonl"
    run_remote(det_server.address, inp, ref, exact_opts())

    class RefusedFromThird(Wrapped):
        def before(self, call: int, texts: list[str]) -> None:
            if call >= 2:
                raise NextCharError(code, details)

    out = tmp_path / "out.jsonl"
    target = RefusedFromThird(remote(det_server.address))
    with pytest.raises(JobAborted) as e:
        run_job(inp, out, target, exact_opts(concurrency=1))
    target.close()
    assert str(e.value) == (f"{code.name}: {details} ({hint}); stopped after 2/10 items: rerun "
                            f"the same command to resume")
    assert target.calls == 3
    assert out.read_bytes() == ref.read_bytes()[: len(out.read_bytes())] and count_lines(out) == 2
    summary = run_remote(det_server.address, inp, out, exact_opts())
    assert (summary.resumed, summary.written) == (2, 8)
    assert out.read_bytes() == ref.read_bytes()


def test_a_replica_with_another_model_version_stops_the_job(tmp_path: Path,
                                                            det_server: Any) -> None:
    inp = tmp_path / "in.txt"
    write_texts(inp, 10, seed=7)

    class Upgraded(Wrapped):
        def predict(self, texts: list[str], top_k: int, per_position: bool, timeout_s: float
                    ) -> tuple[list[pb.Prediction], Answerer]:
            preds, _ = super().predict(texts, top_k, per_position, timeout_s)
            return preds, Answerer("v-next")  # a server that does not send the sha256

    target = Upgraded(remote(det_server.address))
    with pytest.raises(JobAborted, match="a server answered with model version 'v-next'"):
        run_job(inp, tmp_path / "out.jsonl", target, exact_opts())
    target.close()


def test_a_replica_with_another_model_under_the_same_version_stops_the_job(
        tmp_path: Path, det_server: Any) -> None:
    """Version labels are the exporter's to choose: the artifact's sha256 tells models apart."""
    inp = tmp_path / "in.txt"
    write_texts(inp, 10, seed=7)

    class Relabelled(Wrapped):
        def predict(self, texts: list[str], top_k: int, per_position: bool, timeout_s: float
                    ) -> tuple[list[pb.Prediction], Answerer]:
            preds, served = super().predict(texts, top_k, per_position, timeout_s)
            assert len(served.artifact_sha256) == 64  # the server says which artifact answered
            return preds, Answerer(served.version, "f" * 64)

    target = Relabelled(remote(det_server.address))
    with pytest.raises(JobAborted, match=r"a server answered with another model \(artifact "
                                         r"sha256 ffffffffffff\.\.\., version "):
        run_job(inp, tmp_path / "out.jsonl", target, exact_opts())
    target.close()


# -- several servers, shards, local --------------------------------------------------------------
def test_two_servers_both_receive_requests(tmp_path: Path, tiny_artifact: Path,
                                           start_server: Any) -> None:
    a = start_server(model=tiny_artifact, backend="onnx")
    b = start_server(model=tiny_artifact, backend="onnx")
    inp = tmp_path / "in.txt"
    write_texts(inp, 400, seed=8)
    summary = run_remote([a.address, b.address], inp, tmp_path / "out.jsonl",
                         JobOptions(texts_per_request=4, concurrency=2, progress=False))
    assert (summary.written, summary.errors) == (400, 0)
    texts_a, texts_b = a.server.runtime().batcher.stats.texts, b.server.runtime().batcher.stats.texts
    assert texts_a > 0 and texts_b > 0
    assert texts_a + texts_b == 400


def test_shards_partition_the_input(tmp_path: Path, det_server: Any) -> None:
    inp = tmp_path / "in.txt"
    write_texts(inp, 100, seed=9)
    run_remote(det_server.address, inp, tmp_path / "all.jsonl", exact_opts())
    shards = []
    for i in range(3):
        out = tmp_path / f"out.{i}.jsonl"
        summary = run_remote(det_server.address, inp, out, exact_opts(shard=(i, 3)))
        assert summary.total == len(range(i, 100, 3))
        recs = read_records(out)
        assert [r["index"] for r in recs] == list(range(i, 100, 3))
        shards.extend(recs)
    assert sorted(shards, key=lambda r: r["index"]) == read_records(tmp_path / "all.jsonl")


def test_local_runs_the_same_job_in_process(tmp_path: Path, tiny_artifact: Path,
                                            det_server: Any) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"".join(json.dumps({"id": i, "text": t}).encode() + b"\n"
                             for i, t in enumerate(write_texts(tmp_path / "t.txt", 50, seed=10)))
                    + b'{"id": 50, "text": "bad \xc3\xa9 char"}\n')
    run_remote(det_server.address, inp, tmp_path / "remote.jsonl",
               exact_opts(per_position=True))
    local = LocalTarget(tiny_artifact)
    try:
        # concurrency 1: the local batcher then computes each text alone, like det_server.
        summary = run_job(inp, tmp_path / "local.jsonl", local,
                          exact_opts(per_position=True, concurrency=1))
    finally:
        local.close()
    assert (summary.written, summary.errors) == (51, 1)
    assert (tmp_path / "local.jsonl").read_bytes() == (tmp_path / "remote.jsonl").read_bytes()
    # Same artifact, so a job started remotely may be resumed locally and vice versa.
    meta_local = json.loads((tmp_path / "local.jsonl.meta.json").read_text())
    meta_remote = json.loads((tmp_path / "remote.jsonl.meta.json").read_text())
    assert meta_local["model"] == meta_remote["model"]


def test_local_serves_only_the_model_it_was_given(tmp_path: Path, tiny_artifact: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A NEXTCHAR_MODEL_REPOSITORY or NEXTCHAR_MODEL in the environment (a server's pod) adds
    no model to the artifact or the repository given."""
    repo, other = tmp_path / "repo", tmp_path / "other-repo"
    shutil.copytree(tiny_artifact, repo / "mine")
    (repo / "mine" / "config.json").write_text('{"max_batch_size": 8}')
    shutil.copytree(tiny_artifact, other / "theirs")
    monkeypatch.setenv("NEXTCHAR_MODEL_REPOSITORY", str(other))
    local = LocalTarget(tiny_artifact)
    try:
        assert sorted(local.registry.slots) == [local.model_spec().name]
    finally:
        local.close()
    monkeypatch.setenv("NEXTCHAR_MODEL", str(other / "theirs"))
    local = LocalTarget(repo, model="mine")
    try:
        assert sorted(local.registry.slots) == ["mine"] and local.model_spec().name == "mine"
    finally:
        local.close()


# -- refusing another job's output ---------------------------------------------------------------
def test_rerun_with_other_options_or_input_refuses_unless_restart(
    tmp_path: Path, det_server: Any
) -> None:
    inp = tmp_path / "in.txt"
    write_texts(inp, 20, seed=11)
    out = tmp_path / "out.jsonl"
    run_remote(det_server.address, inp, out, exact_opts())
    with pytest.raises(JobError, match=r"holds another job's results \(top_k 3 -> 2\); rerun "
                                       r"the original command to resume it, or pass --restart"):
        run_remote(det_server.address, inp, out, exact_opts(top_k=2))
    with pytest.raises(JobError, match=r"shard 0/1 -> 1/2"):
        run_remote(det_server.address, inp, out, exact_opts(shard=(1, 2)))

    moved = tmp_path / "moved.txt"
    moved.write_bytes(inp.read_bytes())  # same content, new path and mtime: still this job
    summary = run_remote(det_server.address, moved, out, exact_opts())
    assert (summary.resumed, summary.written) == (20, 0)

    write_texts(inp, 20, seed=12)
    with pytest.raises(JobError, match=r"other content"):
        run_remote(det_server.address, inp, out, exact_opts())
    summary = run_remote(det_server.address, inp, out, exact_opts(restart=True, top_k=2))
    assert (summary.resumed, summary.written) == (0, 20)
    assert len(read_records(out)[0]["top"]) == 2


def test_cli_refuses_a_foreign_output_with_one_line(tmp_path: Path, det_server: Any,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    inp = tmp_path / "in.txt"
    write_texts(inp, 5, seed=13)
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    rc = cli_main(["batch", str(inp), "-o", str(out), "--server", det_server.address,
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == (f"nextchar batch: {out} exists and has no out.jsonl.meta.json, so 'nextchar "
                   f"batch' did not write it; pass --restart to overwrite it\n")
    assert out.read_text() == "precious\n"

    rc = cli_main(["batch", str(inp), "-o", str(out), "--server", det_server.address,
                   "--no-progress", "--restart", "--top-k", "2"])
    err = capsys.readouterr().err
    assert rc == 0
    assert err.startswith("nextchar batch: 5 items (0 errors, 0 retries) in ")
    assert count_lines(out) == 5


def test_cli_bad_top_k_and_shard_are_refused(tmp_path: Path, det_server: Any,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    inp = tmp_path / "in.txt"
    write_texts(inp, 5, seed=14)
    rc = cli_main(["batch", str(inp), "-o", str(tmp_path / "o.jsonl"), "--server",
                   det_server.address, "--top-k", "500"])
    assert rc == 2
    assert capsys.readouterr().err == ("nextchar batch: --top-k 500: the server allows 1..59 (0: "
                                       "its default, 5)\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["batch", str(inp), "-o", str(tmp_path / "o.jsonl"), "--shard", "3/3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "nextchar batch: error: argument --shard: '3/3': need 0 <= I < N")


def test_cli_negative_top_k_is_a_usage_error(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """It reached the server's check (exit 2 there too, but only once a server answered)."""
    inp = tmp_path / "in.txt"
    write_texts(inp, 2, seed=14)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["batch", str(inp), "-o", str(tmp_path / "o.jsonl"), "--server", "127.0.0.1:1",
                  "--top-k", "-5"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "nextchar batch: error: argument --top-k: must be between 0 and 4294967295, got -5")
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_bad_tls_options_are_refused_with_exit_2(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Bad options, as docs/batch.md says: exit 2 and one line (they were exit 1, 'a rerun may',
    with an 'INVALID_ARGUMENT:' prefix)."""
    inp, out = tmp_path / "in.txt", tmp_path / "o.jsonl"
    write_texts(inp, 2, seed=14)
    missing, not_pem = tmp_path / "nope.pem", inp
    cases = [
        (["--tls-ca", str(missing)], f"--tls-ca {missing}: cannot read (No such file or "
                                     f"directory)"),
        (["--tls-ca", str(not_pem)], f"--tls-ca {not_pem}: not a PEM file (no -----BEGIN line)"),
        (["--tls", "--tls-cert", str(not_pem)], "--tls-cert and --tls-key go together (the "
                                                "client certificate and its key)"),
        (["--tls-server-name", "nextchar.internal"], "tls_server_name (--tls-server-name) is the "
                                                     "name to verify in the server's "
                                                     "certificate: it needs TLS (tls=True or "
                                                     "tls_ca)"),
    ]
    for flags, line in cases:
        rc = cli_main(["batch", str(inp), "-o", str(out), "--server", "127.0.0.1:1",
                       "--no-progress", *flags])
        assert (rc, capsys.readouterr().err) == (2, f"nextchar batch: {line}\n"), flags
    assert not out.exists()


def test_cli_local_refusals_are_one_line(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    inp = tmp_path / "in.txt"
    write_texts(inp, 5, seed=15)
    nope = tmp_path / "nope"
    rc = cli_main(["batch", str(inp), "-o", str(tmp_path / "o.jsonl"), "--local", str(nope)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"nextchar batch: --local {nope}: ") and err.count("\n") == 1
    rc = cli_main(["batch", str(inp), "-o", str(tmp_path / "o.jsonl"), "--local", str(nope),
                   "--server", "127.0.0.1:1"])
    assert rc == 2
    assert capsys.readouterr().err == ("nextchar batch: --local runs in this process: it takes "
                                       "no --server\n")
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_local_names_what_the_user_gave(tmp_path: Path, tiny_artifact: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The variable at fault, not pydantic's summary; an artifact with --model is that artifact
    (its name checked), and a folder that is neither says so, naming no `serve` flags."""
    inp = tmp_path / "in.txt"
    write_texts(inp, 3, seed=16)
    out = tmp_path / "o.jsonl"

    def refusal(*extra: str) -> str:
        assert cli_main(["batch", str(inp), "-o", str(out), *extra]) == 2
        return capsys.readouterr().err

    with monkeypatch.context() as m:
        m.setenv("NEXTCHAR_MAX_TOP_K", "abc")
        assert refusal("--local", str(tiny_artifact)) == (
            f"nextchar batch: --local {tiny_artifact}: invalid NEXTCHAR_MAX_TOP_K: Input should "
            f"be a valid integer, unable to parse string as an integer\n")
    name = json.loads((tiny_artifact / "manifest.json").read_text())["name"]
    assert refusal("--local", str(tiny_artifact), "--model", "nope") == (
        f"nextchar batch: --local {tiny_artifact}: NOT_FOUND: model 'nope' is not served here; "
        f"models: {name}\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert refusal("--local", str(empty), "--model", "nope") == (
        f"nextchar batch: --local {empty}: neither an artifact (manifest.json) nor a repository "
        f"of model folders (DIR/<model>/)\n")
    assert cli_main(["batch", str(inp), "-o", str(out), "--local", str(tiny_artifact),
                     "--model", name, "--no-progress"]) == 0
    assert count_lines(out) == 3
    # A repository of plain artifacts (DIR/<model>/manifest.json) stays a repository.
    repo = tmp_path / "models"
    for folder in ("alpha", "beta"):
        shutil.copytree(tiny_artifact, repo / folder)
    out.unlink()
    assert cli_main(["batch", str(inp), "-o", str(out), "--local", str(repo), "--model", "alpha",
                     "--no-progress"]) == 0
    assert count_lines(out) == 3
    capsys.readouterr()
    assert refusal("--local", str(repo), "--model", "nope").startswith(
        f"nextchar batch: --local {repo}: NOT_FOUND: ")


def test_thin_client_imports_no_numpy() -> None:
    code = ("import sys, nextchar.client.cli, nextchar.client.batch; "
            "bad = {'numpy', 'onnxruntime', 'torch'} & set(sys.modules); "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# -- the server's character budget per request --------------------------------------------------
def test_chunks_keep_to_the_servers_characters_per_request(tmp_path: Path, tiny_artifact: Path,
                                                          server_thread: Any) -> None:
    """GetModelInfo advertises max_chars_per_request; chunks close before it (texts of 30
    characters, 100 per request: 3 a chunk), so no valid line is refused and split again, and a
    line longer than the budget is an error record without a call."""
    texts = ["abcdefghij" * 3] * 20
    (tmp_path / "in.txt").write_text("".join(t + "\n" for t in texts[:10]) + "x" * 150 + "\n"
                                     + "".join(t + "\n" for t in texts[10:]), encoding="utf-8")
    with server_thread(model=tiny_artifact, backend="onnx", max_chars_per_request=100) as st:
        target = Wrapped(remote(st.address))
        assert target.model_spec().max_chars_per_request == 100
        summary = run_job(tmp_path / "in.txt", tmp_path / "out.jsonl", target,
                          JobOptions(texts_per_request=64, top_k=2, progress=False))
        target.close()
    assert (summary.written, summary.errors, summary.retries) == (21, 1, 0)
    assert target.calls == 7  # 3+3+3+1 before the long line (a chunk boundary), 3+3+3+1 after
    records = read_records(tmp_path / "out.jsonl")
    assert records[10]["error"] == {"code": "INVALID_ARGUMENT", "message": (
        "text has 150 characters > the server's max_chars_per_request 100")}
    assert all(len(r["top"]) == 2 for i, r in enumerate(records) if i != 10)


@pytest.mark.parametrize(("priority", "concurrency"), [("low", 1), ("high", 1), ("low", 4)])
def test_chunks_keep_to_the_queue_bound_of_the_jobs_lane(tmp_path: Path, tiny_artifact: Path,
                                                         server_thread: Any, priority: str,
                                                         concurrency: int) -> None:
    """A lane that queues fewer texts than a job's requests hold (--low-max-queue-texts 16,
    64 texts per request) refused every request, at every rerun, until the retries ran out.
    GetModelInfo advertises both lanes' bounds; the job packs to its own lane's, shared by
    the requests it has in flight (else one at the bound is refused while another waits)."""
    (tmp_path / "in.txt").write_text("abc\n" * 40, encoding="utf-8")
    with server_thread(model=tiny_artifact, backend="onnx", low_max_queue_texts=16,
                       max_queue_texts=8) as st:
        target = Wrapped(RemoteTarget(NextCharClient(st.address, timeout_s=10),
                                      priority=priority))
        bound = 16 if priority == "low" else 8
        assert target.model_spec().max_queue_texts == bound
        summary = run_job(tmp_path / "in.txt", tmp_path / "out.jsonl", target,
                          JobOptions(texts_per_request=64, top_k=2, progress=False,
                                     concurrency=concurrency, max_retries=0))
        target.close()
    assert (summary.written, summary.errors, summary.retries) == (40, 0, 0)
    assert target.calls == -(-40 // (bound // concurrency))


def test_ctrl_c_once_every_item_is_queued_stops_with_the_message_and_exit_130(
        tmp_path: Path, tiny_artifact: Path, start_server: Any) -> None:
    """With 4 items and 1 request at a time, the producer has queued everything at once and the
    CLI waits in the joins; Ctrl-C there is reported as one anywhere else is (it used to end
    with exit 130 and no word). The server waits ~1 s per request (batch delay)."""
    st = start_server(model=tiny_artifact, backend="onnx", max_batch_delay_ms=1000)
    inp, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    write_texts(inp, 4, seed=3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nextchar", "batch", str(inp), "-o", str(out), "--server",
         st.address, "--concurrency", "1", "--texts-per-request", "1", "--no-progress"],
        stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out.exists() and out.read_bytes().count(b"\n") >= 1):  # the first answer is in
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    done = out.read_bytes().count(b"\n")
    assert proc.returncode == 130 and 1 <= done < 4, (proc.returncode, done, err)
    assert err.strip().splitlines()[-1] == (
        f"nextchar batch: interrupted; stopped after {done}/4 items: rerun the same command to "
        f"resume")


def test_a_rerun_after_the_servers_model_changed_says_so(tmp_path: Path, det_server: Any) -> None:
    """A rolling update under the same name and version stamp: the rerun is the very command
    that wrote OUTPUT, so "rerun the original command" would not help; it names the artifacts."""
    inp, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    write_texts(inp, 5, seed=21)
    run_remote(det_server.address, inp, out, exact_opts())
    meta_path = tmp_path / "out.jsonl.meta.json"
    meta = json.loads(meta_path.read_text())
    served = meta["model"]["artifact_sha256"]
    meta["model"]["artifact_sha256"] = "f" * 64  # what an earlier model wrote
    meta_path.write_text(json.dumps(meta))
    m = f"{meta['model']['name']} {meta['model']['version']}"
    with pytest.raises(JobError) as e:
        run_remote(det_server.address, inp, out, exact_opts())
    assert str(e.value) == (
        f"{out} holds results of another model (model {m} (artifact ffffffffffff) -> {m} "
        f"(artifact {served[:12]})): the server serves another artifact now; resume against the "
        f"original one (the same artifact with --local DIR, or its server), or pass --restart "
        f"to start over")


def test_a_link_to_another_jobs_output_takes_that_jobs_lock(tmp_path: Path,
                                                            det_server: Any) -> None:
    """Without it, a job on the link took its own lock beside the link and (with --restart)
    truncated and appended to the file the other job was writing."""
    inp, out, link = tmp_path / "in.txt", tmp_path / "Y.jsonl", tmp_path / "Ysym.jsonl"
    write_texts(inp, 5, seed=22)
    run_remote(det_server.address, inp, out, exact_opts())
    link.symlink_to(out.name)
    before = out.read_bytes()
    with output_lock(out):  # the other job, still running
        with pytest.raises(NotYet, match=r"another nextchar batch is writing it \(host "):
            run_remote(det_server.address, inp, link, exact_opts(restart=True))
    assert out.read_bytes() == before
    assert not (tmp_path / "Ysym.jsonl.lock").exists()
    # Free again, the link resumes the job its target holds (meta beside the target).
    assert run_remote(det_server.address, inp, link, exact_opts()).resumed == 5


def test_a_full_disk_at_the_start_is_exit_1_as_it_is_mid_job() -> None:
    """Freeing space and rerunning works: exit 1 (NotYet), not 2 (a rerun cannot help)."""
    e = cannot_write(Path("out.jsonl"), OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(e, NotYet) and str(e) == "-o out.jsonl: cannot write (No space left on device)"
    assert type(cannot_write(Path("out.jsonl"), OSError(errno.EACCES, "Permission denied"))) \
        is JobError


def test_progress_off_a_terminal_is_newline_ended_lines(tmp_path: Path, det_server: Any,
                                                        capfd: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Container logs split on newlines; tqdm's redraws are '\\r'-joined even off a terminal,
    so they showed nothing until the job ended. (A line every 30 s; every update here.)"""
    from nextchar.client import progress

    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    inp = tmp_path / "in.txt"
    write_texts(inp, 6, seed=23)
    run_remote(det_server.address, inp, tmp_path / "out.jsonl", exact_opts(progress=True))
    err = capfd.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("out.jsonl: ")]
    assert len(lines) >= 2 and lines[-1].startswith("out.jsonl: 100%")
    assert all("/6 [" in line for line in lines), lines


def test_tls_against_a_plaintext_server_is_refused_at_once(tmp_path: Path,
                                                           det_server: Any) -> None:
    """A handshake the server's protocol refuses is a setting to fix, not an outage: exit 2 at
    the first answer (it was retried for a minute, then exit 1, "a rerun may")."""
    inp = tmp_path / "in.txt"
    write_texts(inp, 3, seed=24)
    r = subprocess.run([sys.executable, "-m", "nextchar", "batch", str(inp), "-o",
                        str(tmp_path / "out.jsonl"), "--server", det_server.address, "--tls",
                        "--max-retries", "2", "--no-progress"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"nextchar batch: cannot start: TLS with {det_server.address} failed "
        f"(WRONG_VERSION_NUMBER): check --tls / --tls-ca / --tls-server-name against the "
        f"server's TLS settings (a plaintext server takes no --tls)")
    assert "retrying" not in r.stderr and not (tmp_path / "out.jsonl").exists()


def test_an_output_in_a_folder_not_made_yet_is_locked_too(tmp_path: Path, det_server: Any,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """docs/batch.md's shard loop writes out/part-I.jsonl into a folder that does not exist:
    the lock file could not be opened there, and the job ran unprotected with a warning."""
    inp, out = tmp_path / "in.txt", tmp_path / "out" / "deeper" / "part-0.jsonl"
    write_texts(inp, 3, seed=25)
    with caplog.at_level("WARNING"):
        run_remote(det_server.address, inp, out, exact_opts())
    assert (tmp_path / "out" / "deeper" / "part-0.jsonl.lock").is_file()
    assert "nothing stops a second job" not in caplog.text
    assert count_lines(out) == 3


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and a server certificate it signs for localhost and 127.0.0.1 (as
    tests/server/test_security.py makes them)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())

    def cert(subject: str, key: Any, ca: bool, san: list[Any]) -> bytes:
        b = (x509.CertificateBuilder().subject_name(name(subject))
             .issuer_name(name("nextchar test CA")).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    d = tmp_path_factory.mktemp("tls")
    files = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}
    files["ca"].write_bytes(cert("nextchar test CA", ca_key, True, []))
    files["cert"].write_bytes(cert("localhost", server_key, False, [
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    files["key"].write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return files


def test_tls_with_a_name_the_certificate_lacks_is_refused_at_once(
        tmp_path: Path, tiny_artifact: Path, start_server: Any, tls_files: dict[str, Path]) -> None:
    """A hostname check that fails is a setting to fix, as a CA that does not verify is: it was
    retried as UNAVAILABLE for the whole budget, then "check that the server runs" (exit 1)."""
    st = start_server(model=tiny_artifact, backend="onnx", tls_cert=tls_files["cert"],
                      tls_key=tls_files["key"])
    inp, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    write_texts(inp, 3, seed=24)
    base = [sys.executable, "-m", "nextchar", "batch", str(inp), "-o", str(out), "--server",
            st.address, "--tls-ca", str(tls_files["ca"]), "--max-retries", "2", "--no-progress"]
    r = subprocess.run([*base, "--tls-server-name", "not-the-server.example"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"nextchar batch: cannot start: TLS with {st.address} failed (the certificate does not "
        f"hold the name checked: --tls-server-name, else the host): check --tls / --tls-ca / "
        f"--tls-server-name against the server's TLS settings (a plaintext server takes no "
        f"--tls)"]
    assert not out.exists()
    r = subprocess.run([*base, "--tls-server-name", "localhost"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert count_lines(out) == 3
