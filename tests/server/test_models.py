"""Multi-model serving from a repository: three models (rnn, gru, lstm, each its own vocabulary)
at once, asked by name over nextchar.v1, KServe V2 (ours and tritonclient's repository,
load/unload and statistics calls) and the CLI; unknown names, a broken model, per-model
config.json, unloading under load, and the memory of retired versions."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import weakref
from pathlib import Path

import grpc
import pytest

from nextchar.client import NextCharClient, NextCharError
from nextchar.kserve import grpc_predict_v2_pb2 as kpb
from nextchar.kserve import grpc_predict_v2_pb2_grpc as kpb_grpc
from nextchar.v1 import nextchar_pb2 as pb

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCABS = {"rnn-en": "\n !',.?abcdefghijklmnopqrstuvwxyz", "gru-digits": "0123456789+-= \n",
          "lstm-dna": "ACGT"}
CELLS = {"rnn-en": "rnn", "gru-digits": "gru", "lstm-dna": "lstm"}
PROMPTS = {"rnn-en": "hello", "gru-digits": "12+3=", "lstm-dna": "GATTACA"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from nextchar.training.export import build_random_artifact

    base = tmp_path_factory.mktemp("models-src")
    return {name: build_random_artifact(base / name, vocab=vocab, cell=CELLS[name], embed_dim=8,
                                        hidden_size=16, num_layers=1, seed=i, name=name)
            for i, (name, vocab) in enumerate(VOCABS.items())}


def make_repository(root: Path, artifacts: dict[str, Path]) -> Path:
    """rnn-en and gru-digits as DIR/<model>/1/, lstm-dna as one plain artifact directory."""
    root.mkdir()
    for name, src in artifacts.items():
        dest = root / name if name == "lstm-dna" else root / name / "1"
        shutil.copytree(src, dest)
    (root / "gru-digits" / "config.json").write_text(json.dumps({"max_top_k": 3}))
    return root


@pytest.fixture
def repository(tmp_path: Path, artifacts: dict[str, Path]) -> Path:
    return make_repository(tmp_path / "models", artifacts)


@pytest.fixture
def multi_server(start_server, repository: Path):
    return start_server(model_repository=repository)


def _code(fn, *args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(NextCharError) as e:
        fn(*args, **kw)
    return e.value.code, e.value.details


def test_every_model_answers_by_name_with_its_own_vocabulary(multi_server) -> None:
    with NextCharClient(multi_server.address) as c:
        listed = c.list_models()
        assert [(m.name, m.version, m.state) for m in listed.models] == [
            ("gru-digits", "1", pb.MODEL_STATE_READY),
            ("lstm-dna", c.model_info("lstm-dna").artifact_version, pb.MODEL_STATE_READY),
            ("rnn-en", "1", pb.MODEL_STATE_READY)]
        assert listed.default_model == ""  # three models, none named the default
        for name, vocab in VOCABS.items():
            info = c.model_info(name)
            assert (info.name, list(info.vocab)) == (name, list(vocab))
            assert info.config.cell == CELLS[name]
            resp = c.predict_response(pb.PredictRequest(texts=[PROMPTS[name]], top_k=3, model=name))
            assert resp.model_name == name
            assert {cp.char for cp in resp.predictions[0].top} <= set(vocab)
        # Generate goes to the named model too.
        text = "".join(c.generate("AC", max_chars=20, seed=1, model="lstm-dna"))
        assert len(text) == 20 and set(text) <= set("ACGT")


def test_unknown_or_missing_names_say_which_models_exist(multi_server) -> None:
    with NextCharClient(multi_server.address) as c:
        code, details = _code(c.predict, ["abc"], model="nope")
        assert code == grpc.StatusCode.NOT_FOUND
        assert details == "model 'nope' is not served here; models: gru-digits, lstm-dna, rnn-en"
        code, details = _code(c.predict, ["abc"])
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "no model named and this server has no default model" in details
        assert "gru-digits, lstm-dna, rnn-en" in details
        # Characters outside the named model's vocabulary are refused as for one model.
        code, details = _code(c.predict, ["hello"], model="lstm-dna")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "'h'" in details


def test_config_json_overrides_settings_for_its_model_only(multi_server) -> None:
    with NextCharClient(multi_server.address) as c:
        assert c.model_info("gru-digits").limits.max_top_k == 3
        assert c.model_info("rnn-en").limits.max_top_k == 33  # min(64, vocabulary)
        code, details = _code(c.predict, ["12"], top_k=4, model="gru-digits")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "between 1 and 3" in details


def test_kserve_asks_each_model_by_name(multi_server) -> None:
    with grpc.insecure_channel(multi_server.address) as ch, \
            NextCharClient(multi_server.address) as c:
        stub = kpb_grpc.GRPCInferenceServiceStub(ch)
        for name in VOCABS:
            req = kpb.ModelInferRequest(model_name=name, inputs=[
                kpb.ModelInferRequest.InferInputTensor(
                    name="text", datatype="BYTES", shape=[1],
                    contents=kpb.InferTensorContents(bytes_contents=[PROMPTS[name].encode()]))])
            req.parameters["top_k"].int64_param = 2
            resp = stub.ModelInfer(req)
            want = c.predict([PROMPTS[name]], top_k=2, model=name)[0]
            assert resp.model_name == name
            assert list(resp.outputs[1].contents.int64_contents) == [cp.id for cp in want.top]
        index = stub.RepositoryIndex(kpb.RepositoryIndexRequest())
        assert sorted((m.name, m.state) for m in index.models) == [
            ("gru-digits", "READY"), ("lstm-dna", "READY"), ("rnn-en", "READY")]
        stats = stub.ModelStatistics(kpb.ModelStatisticsRequest(name="rnn-en"))
        (s,) = stats.model_stats
        assert s.name == "rnn-en" and s.inference_count >= 1 and s.execution_count >= 1
        assert s.inference_stats.success.count >= 1 and s.inference_stats.success.ns > 0
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelMetadata(kpb.ModelMetadataRequest(name="nope"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_cli_asks_a_model_by_name(multi_server) -> None:
    out = subprocess.run([sys.executable, "-m", "nextchar", "predict", "--server",
                          multi_server.address, "--model", "gru-digits", "--json", "--top-k", "2",
                          "12+"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    assert len(json.loads(line)["top"]) == 2
    models = subprocess.run([sys.executable, "-m", "nextchar", "models", "--server",
                             multi_server.address], capture_output=True, text=True, timeout=60)
    assert models.returncode == 0, models.stderr
    for name in VOCABS:
        assert name in models.stdout


def test_tritonclient_repository_load_unload_and_statistics(start_server, repository: Path,
                                                            tmp_path: Path) -> None:
    from test_kserve import _triton_python

    st = start_server(model_repository=repository)
    script = REPO_ROOT / "tests" / "compat" / "triton_repository_check.py"
    proc = subprocess.run([str(_triton_python()), str(script), "--url", st.address,
                           "--models", *sorted(VOCABS), "--unload", "gru-digits"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "repository checks passed" in proc.stdout, proc.stdout


def test_a_broken_model_is_reported_and_the_others_serve(start_server, repository: Path) -> None:
    (repository / "rnn-en" / "1" / "model_loop.onnx").write_bytes(b"broken")
    (repository / "rnn-en" / "1" / "model.onnx").write_bytes(b"broken")
    st = start_server(model_repository=repository)
    with NextCharClient(st.address) as c:
        models = {m.name: m for m in c.list_models().models}
        assert models["rnn-en"].state == pb.MODEL_STATE_FAILED
        assert "does not match the manifest" in models["rnn-en"].reason
        assert models["gru-digits"].state == models["lstm-dna"].state == pb.MODEL_STATE_READY
        assert len(c.predict(["12"], model="gru-digits")[0].top) == 3
        code, details = _code(c.predict, ["abc"], model="rnn-en")
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert details.startswith("model 'rnn-en' failed to load:")
        # Strict readiness (Triton's default): a model that should serve and does not makes the
        # server NOT_SERVING; unloading it (an operator's decision) makes the server ready.
        assert c.health() == "NOT_SERVING"
        c.unload_model("rnn-en")
        deadline = time.monotonic() + 10
        while c.health() != "SERVING":
            assert time.monotonic() < deadline, "never SERVING after the unload"
            time.sleep(0.05)


def test_without_strict_readiness_a_broken_model_leaves_the_server_serving(
        start_server, repository: Path) -> None:
    shutil.rmtree(repository / "lstm-dna")
    (repository / "lstm-dna" / "1").mkdir(parents=True)  # a version with nothing loadable in it
    (repository / "lstm-dna" / "1" / "manifest.json").write_text("{}")
    st = start_server(model_repository=repository, strict_readiness=False)
    with NextCharClient(st.address) as c:
        assert c.health() == "SERVING"
        models = {m.name: m for m in c.list_models().models}
        assert models["lstm-dna"].state == pb.MODEL_STATE_FAILED
        assert models["lstm-dna"].reason.startswith(
            f"{repository / 'lstm-dna'}: no version loads (newest: ")


class PredictLoad:
    """Threads calling one model back to back; records every outcome."""

    def __init__(self, address: str, model: str, threads: int = 3) -> None:
        self.address, self.model = address, model
        self.stop = threading.Event()
        self.ok = 0
        self.refused: list[tuple[grpc.StatusCode, str]] = []
        self.failed: list[str] = []
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        with NextCharClient(self.address, timeout_s=30) as c:
            while not self.stop.is_set():
                try:
                    c.predict(["1234567890+"] * 4, model=self.model)
                    self.ok += 1
                except NextCharError as e:
                    if e.code == grpc.StatusCode.NOT_FOUND and "is not loaded" in e.details:
                        self.refused.append((e.code, e.details))  # refused, never accepted
                    else:
                        self.failed.append(f"{e.code.name}: {e.details}")

    def __enter__(self) -> PredictLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(60)


def test_unloading_under_load_fails_no_accepted_call_and_frees_the_version(
        start_server, repository: Path) -> None:
    st = start_server(model_repository=repository)
    rt = st.server.runtime("gru-digits")
    runtime_ref, backend_ref = weakref.ref(rt), weakref.ref(rt.backend)
    del rt
    with NextCharClient(st.address) as c, PredictLoad(st.address, "gru-digits") as load:
        stream = c.generate_responses(pb.GenerateRequest(prompt="1+", max_chars=400, seed=2,
                                                         model="gru-digits"))
        first = next(stream)
        deadline = time.monotonic() + 30
        while load.ok < 20:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert c.unload_model("gru-digits").version == "1"
        *_, last = stream  # the accepted stream finishes on its version
        assert last.stop_reason == pb.STOP_REASON_MAX_CHARS and last.model_version == "1"
        assert len(first.text + "".join(r.text for r in _)) + len(last.text) > 0
        refused_by = time.monotonic() + 30
        while not load.refused:
            assert time.monotonic() < refused_by, "no call was refused after the unload"
            time.sleep(0.01)
    assert load.failed == []
    assert load.ok >= 20 and load.refused
    # Reference counted: once the last call ended, the version is closed and freed.
    deadline = time.monotonic() + 10
    while st.server.old_versions:
        assert time.monotonic() < deadline, "the unloaded version was never closed"
        time.sleep(0.05)
    gc.collect()
    assert runtime_ref() is None and backend_ref() is None, "the unloaded version is still alive"
    with NextCharClient(st.address) as c:
        assert {m.name: m.state for m in c.list_models().models}["gru-digits"] == \
            pb.MODEL_STATE_UNAVAILABLE
        assert c.load_model("gru-digits").version == "1"
        assert len(c.predict(["12"], model="gru-digits")[0].top) == 3


def test_reloaded_versions_are_freed_even_while_another_stream_runs(
        start_server, repository: Path, artifacts) -> None:
    """A long stream on model A pins A's version only: B's replaced version is freed."""
    st = start_server(model_repository=repository)
    old = weakref.ref(st.server.runtime("rnn-en"))
    with NextCharClient(st.address) as c:
        stream = c.generate_responses(pb.GenerateRequest(prompt="AC", max_chars=2000, seed=1,
                                                         model="lstm-dna"))
        next(stream)
        shutil.copytree(artifacts["rnn-en"], repository / "rnn-en" / "2")
        assert c.reload_model("rnn-en").version == "2"
        deadline = time.monotonic() + 10
        while st.server.old_versions != []:
            assert time.monotonic() < deadline, st.server.old_versions
            time.sleep(0.05)
        gc.collect()
        assert old() is None
        stream.close()


def test_a_version_is_its_folder_and_the_artifact_stamp_is_its_own_field(
        start_server, tmp_path: Path, artifacts) -> None:
    """Issue 18 item 11: folder 2 is version 2 everywhere, whatever stamp its manifest has."""
    src = artifacts["rnn-en"]
    stamp = json.loads((src / "manifest.json").read_text())["version"]
    repo = tmp_path / "rnn"
    shutil.copytree(src, repo / "1")
    st = start_server(model=repo, metrics_port=0)
    shutil.copytree(src, repo / "2")  # the same stamp as folder 1
    with NextCharClient(st.address) as c, grpc.insecure_channel(st.address) as ch:
        assert c.reload_model().version == "2"
        info = c.model_info()
        assert (info.version, info.artifact_version) == ("2", stamp)
        meta = kpb_grpc.GRPCInferenceServiceStub(ch).ModelMetadata(
            kpb.ModelMetadataRequest(name="rnn-en"))
        assert list(meta.versions) == ["2"]
        assert c.predict_response(pb.PredictRequest(texts=["abc"])).model_version == "2"
        shutil.copytree(src, repo / "3")
        (repo / "3" / "model_loop.onnx").write_bytes(b"broken")
        code, details = _code(c.reload_model)
        assert "version 3 not loaded" in details and details.endswith("still serving version 2")

    body = urllib.request.urlopen(f"http://127.0.0.1:{st.server.metrics_port}/metrics").read()
    assert f'artifact_version="{stamp}"' in body.decode() and 'version="2"' in body.decode()
    single = start_server(model=src)  # a plain artifact folder: nothing newer, and it says why
    with NextCharClient(single.address) as c:
        outcome = c.reload_model()
        assert outcome.reloaded is False
        assert outcome.reason == f"version {stamp} is already the newest"
