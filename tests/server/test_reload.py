"""Hot reload from a model repository: under load, broken versions, polling, SIGHUP, parity."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import TINY_VOCAB
from prometheus_client.parser import text_string_to_metric_families

from nextchar.client import NextCharClient, NextCharError
from nextchar.server.registry import ReloadFailed
from nextchar.server.repository import ModelSource, version_key
from nextchar.server.runtime import open_model


# -- building versions -------------------------------------------------------------------------
def add_version(repo: Path, version: str, source: Path,
                prepare: Callable[[Path], None] | None = None) -> Path:
    """Copies `source` in as repo/<version>/ the safe way: a hidden name, then one rename;
    `prepare` changes the copy before the rename (a poll never sees it half done)."""
    tmp = repo / f".tmp-{version}"
    shutil.copytree(source, tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest["version"] = version
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    if prepare is not None:
        prepare(tmp)
    return tmp.rename(repo / version)


ONNX_FILES = ("model.onnx", "model_loop.onnx")  # the onnx backend runs either


def rewrite_model(version_dir: Path, make: Callable[[Path], bytes], fix_checksum: bool) -> None:
    """Replaces every ONNX file of a version with make(old file)."""
    manifest = json.loads((version_dir / "manifest.json").read_text())
    for name in ONNX_FILES:
        if name not in manifest["files"]:
            continue
        data = make(version_dir / name)
        (version_dir / name).write_bytes(data)
        if fix_checksum:
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(),
                                       "bytes": len(data)}
    (version_dir / "manifest.json").write_text(json.dumps(manifest))


def nan_weights(onnx_path: Path) -> bytes:
    """The same graph with every float weight NaN: loads, runs, answers NaN."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array(np.full_like(w, np.nan), init.name))
    return model.SerializeToString()


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same shape and vocabulary as tiny_artifact, other weights."""
    from nextchar.training.export import build_random_artifact

    return build_random_artifact(tmp_path_factory.mktemp("art") / "other", vocab=TINY_VOCAB,
                                 cell="rnn", embed_dim=8, hidden_size=16, num_layers=2, seed=5)


@pytest.fixture
def repo(tmp_path: Path, tiny_artifact: Path) -> Path:
    r = tmp_path / "models"
    r.mkdir()
    add_version(r, "1", tiny_artifact)
    return r


def reload_metric(st, result: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{st.server.metrics_port}/metrics").read()
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if s.name == "nextchar_model_reloads_total" and s.labels.get("result") == result:
                return s.value
    raise AssertionError("no nextchar_model_reloads_total sample")


def eventually(check: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


class Load:
    """Threads sending Predict back to back; every answer is recorded with its model version."""

    TEXTS = ["To be, or not to be", "hello", "abc"]

    def __init__(self, address: str, threads: int = 3) -> None:
        self.address = address
        self.stop = threading.Event()
        self.answers: list[list[tuple[str, tuple[float, ...]]]] = [[] for _ in range(threads)]
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, i: int) -> None:
        with NextCharClient(self.address, timeout_s=30) as c:
            while not self.stop.is_set():
                try:
                    resp = c.predict_response(_request(self.TEXTS))
                except NextCharError as e:
                    self.errors.append(f"{e.code.name}: {e.details}")
                    continue
                probs = tuple(p.prob for pred in resp.predictions for p in pred.top)
                self.answers[i].append((resp.model_version, probs))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def wait_for_answers(self, n: int) -> None:
        eventually(lambda: sum(map(len, self.answers)) >= n, f"{n} answers")

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(60)


def _request(texts: list[str]):
    from nextchar.v1 import nextchar_pb2 as pb

    return pb.PredictRequest(texts=texts, top_k=5)


# -- unit ----------------------------------------------------------------------------------------
def test_version_order_is_natural() -> None:
    names = ["10", "2", "1", "20261127-101500", "1.10", "1.9"]
    assert sorted(names, key=version_key) == ["1", "1.9", "1.10", "2", "10", "20261127-101500"]


def test_repository_ignores_hidden_and_incomplete_versions(repo: Path, tiny_artifact: Path) -> None:
    shutil.copytree(tiny_artifact, repo / ".tmp-3")  # still being copied in
    (repo / "4").mkdir()  # no manifest yet
    add_version(repo, "2", tiny_artifact)
    r = ModelSource(repo)
    assert r.versioned
    assert [p.name for p in r.candidates()] == ["2", "1"]
    assert ModelSource(tiny_artifact).candidates() == [tiny_artifact]
    assert not ModelSource(tiny_artifact).versioned


# -- reload --------------------------------------------------------------------------------------
def test_reload_under_load_fails_nothing_and_same_weights_answer_the_same(
        start_server, repo: Path, tiny_artifact: Path) -> None:
    st = start_server(model=repo, metrics_port=0)
    with Load(st.address) as load:
        load.wait_for_answers(30)
        add_version(repo, "2", tiny_artifact)  # same weights, new version name
        with NextCharClient(st.address) as admin:
            outcome = admin.reload_model()
        assert (outcome.reloaded, outcome.previous_version, outcome.version) == (True, "1", "2")
        n = sum(map(len, load.answers))
        load.wait_for_answers(n + 30)
    assert load.errors == []
    by_version: dict[str, set[tuple[float, ...]]] = {}
    for answers in load.answers:
        versions = [v for v, _ in answers]
        assert versions == sorted(versions), "a thread saw version 1 after version 2"
        for v, probs in answers:
            by_version.setdefault(v, set()).add(probs)
    assert set(by_version) == {"1", "2"}
    assert by_version["1"] == by_version["2"] and len(by_version["1"]) == 1  # parity
    assert reload_metric(st, "success") == 2  # the first load, then the reload
    with NextCharClient(st.address) as c:
        assert c.model_info().version == "2"
    eventually(lambda: st.server.old_versions == [], "version 1 closed")


def test_broken_versions_are_refused_counted_and_the_old_one_keeps_serving(
        start_server, repo: Path, tiny_artifact: Path) -> None:
    st = start_server(model=repo, metrics_port=0)
    bad_sum = add_version(repo, "2", tiny_artifact)
    rewrite_model(bad_sum, lambda _: b"not the model the manifest pins", fix_checksum=False)
    with NextCharClient(st.address) as c:
        with pytest.raises(NextCharError) as e:
            c.reload_model()
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "does not match the manifest" in e.value.details
        assert e.value.details.endswith("still serving version 1")

        garbage = add_version(repo, "3", tiny_artifact)  # checksums right, not an ONNX model
        rewrite_model(garbage, lambda _: b"\x08\x07garbage", fix_checksum=True)
        with pytest.raises(NextCharError) as e:
            c.reload_model()
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "version 3 not loaded" in e.value.details

        nan = add_version(repo, "4", tiny_artifact)  # loads and runs, answers NaN
        rewrite_model(nan, nan_weights, fix_checksum=True)
        with pytest.raises(NextCharError) as e:
            c.reload_model()
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "non-finite" in e.value.details

        assert c.model_info().version == "1"
        assert len(c.predict(["abc"])[0].top) == 5
        assert reload_metric(st, "failure") == 3
        assert reload_metric(st, "success") == 1  # the first load only
        for v in ("4", "3", "2"):
            shutil.rmtree(repo / v)
        assert c.reload_model().reloaded is False


def test_polling_loads_new_versions_rolls_back_and_skips_a_failed_one(
        start_server, repo: Path, other_weights: Path, tiny_artifact: Path) -> None:
    st = start_server(model=repo, metrics_port=0, poll_s=0.05)
    with NextCharClient(st.address) as c:
        before = c.predict(["hello"])[0].top[0].prob
        add_version(repo, "2", other_weights)
        eventually(lambda: c.model_info().version == "2", "version 2 served")
        assert c.predict(["hello"])[0].top[0].prob != before
        shutil.rmtree(repo / "2")  # rollback: the highest version left is 1
        eventually(lambda: c.model_info().version == "1", "rolled back to 1")
        assert c.predict(["hello"])[0].top[0].prob == before

        # Broken before it appears: broken file by file under the poll, each change would
        # (rightly) count as a new attempt.
        add_version(repo, "3", tiny_artifact,
                    lambda v: rewrite_model(v, lambda _: b"broken", fix_checksum=False))
        eventually(lambda: reload_metric(st, "failure") == 1, "the failure counted")
        time.sleep(0.5)  # ~10 more polls: a version that failed is not retried
        assert reload_metric(st, "failure") == 1
        assert c.model_info().version == "1"
        assert reload_metric(st, "success") == 3  # the first load, then two


def test_a_stream_finishes_on_the_version_it_started_on(start_server, repo: Path,
                                                        other_weights: Path) -> None:
    from nextchar.v1 import nextchar_pb2 as pb
    from nextchar.v1 import nextchar_pb2_grpc as pb_grpc

    st = start_server(model=repo, max_chars_per_text=1_000_000)
    # A small HTTP/2 window keeps the server from sending the whole stream before the reload.
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(st.address, options=options) as ch, \
            NextCharClient(st.address) as c:
        stream = pb_grpc.NextCharStub(ch).Generate(
            pb.GenerateRequest(prompt="hello", max_chars=5_000, seed=3), timeout=120)
        first = next(stream)
        assert first.text
        add_version(repo, "2", other_weights)
        assert c.reload_model().version == "2"
        assert c.predict_response(_request(["abc"])).model_version == "2"
        assert st.server.old_versions == ["1"]  # kept open for the stream
        *_, last = stream
        assert last.stop_reason == pb.STOP_REASON_MAX_CHARS and last.model_version == "1"
    eventually(lambda: st.server.old_versions == [], "version 1 closed after its stream")


def test_start_falls_back_to_an_older_version_when_the_newest_is_broken(
        start_server, repo: Path, tiny_artifact: Path) -> None:
    rewrite_model(add_version(repo, "2", tiny_artifact), lambda _: b"broken", fix_checksum=False)
    st = start_server(model=repo, metrics_port=0)
    with NextCharClient(st.address) as c:
        assert c.model_info().version == "1"
    assert reload_metric(st, "failure") == 1


def test_parity_check_refuses_same_weights_with_other_answers(start_server, tiny_artifact) -> None:
    import dataclasses

    st = start_server(model=tiny_artifact)
    slot = st.server.registry.slot("")
    served = slot.current
    assert served is not None and served.probe_logits is not None
    liar = dataclasses.replace(served, probe_logits=served.probe_logits + 1e-3)

    async def candidate(against):
        artifact, backend = open_model(tiny_artifact, st.settings)
        rt = await slot._start(tiny_artifact, artifact, backend, against)
        await rt.close()

    with pytest.raises(ReloadFailed, match="parity: same weights"):
        st.call(candidate(liar))
    st.call(candidate(served))  # equal answers pass


def test_sighup_reloads_a_subprocess_server(server_process, repo: Path, other_weights: Path) -> None:
    sp = server_process(["--model", str(repo)])
    with NextCharClient(sp.address) as c:
        assert c.model_info().version == "1"
        add_version(repo, "2", other_weights)
        sp.proc.send_signal(signal.SIGHUP)
        eventually(lambda: c.model_info().version == "2", "SIGHUP loaded version 2")
    sp.proc.send_signal(signal.SIGTERM)
    assert sp.proc.wait(30) == 0
    assert "SIGHUP: now serving" in sp.log()
