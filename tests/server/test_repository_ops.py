"""What an operator does to a model repository while it serves, and what the server makes of it:
load calls that name a path instead of a model, folders that hold no model (lost+found),
models whose folder goes away, a version copied in file by file, and config.json edits."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from nextchar.client import NextCharClient, NextCharError
from nextchar.v1 import nextchar_pb2 as pb

VOCAB = "abcdefgh "


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from nextchar.training.export import build_random_artifact

    base = tmp_path_factory.mktemp("repo-src")
    return {name: build_random_artifact(base / name, vocab=VOCAB, embed_dim=8, hidden_size=16,
                                        num_layers=1, seed=i, name=name)
            for i, name in enumerate(("alpha", "beta", "elsewhere"))}


@pytest.fixture
def repo(tmp_path: Path, sources: dict[str, Path]) -> Path:
    root = tmp_path / "models"
    shutil.copytree(sources["alpha"], root / "alpha" / "1")
    shutil.copytree(sources["beta"], root / "beta" / "1")
    return root


def _poll(st: Any) -> None:
    st.call(st.server.registry.poll_once())


def _models(c: NextCharClient) -> dict[str, str]:
    return {m.name: m.version for m in c.list_models().models}


def _health_becomes(c: NextCharClient, want: str, timeout_s: float = 10) -> str:
    deadline = time.monotonic() + timeout_s
    while (got := c.health()) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def _error(fn: Callable[..., Any], *args: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(NextCharError) as e:
        fn(*args)
    return e.value.code, e.value.details


# -- load names a model, never a path ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["{elsewhere}", "alpha/../../elsewhere", "alpha/1", "/etc", "..",
                                  ".", "alpha/", ".hidden", "nope"])
def test_load_takes_a_folder_name_of_the_repository_only(start_server, repo: Path,
                                                         sources: dict[str, Path],
                                                         name: str) -> None:
    (repo / ".hidden").mkdir()
    name = name.format(elsewhere=sources["elsewhere"])
    if name == "alpha/../../elsewhere":  # a path that climbs out to a real artifact
        shutil.copytree(sources["elsewhere"], repo.parent / "elsewhere")
    st = start_server(model_repository=repo)
    with NextCharClient(st.address) as c:
        code, details = _error(c.load_model, name)
        assert code == grpc.StatusCode.NOT_FOUND
        assert details == (f"model '{name}' is not in the repository: a model is a folder "
                           f"directly under {repo} holding an artifact or <version>/ artifacts; "
                           f"models: alpha, beta")
        assert _models(c) == {"alpha": "1", "beta": "1"}
        assert c.health() == "SERVING"  # an unknown name leaves readiness alone


def test_a_model_folder_added_later_loads_by_name(start_server, repo: Path,
                                                  sources: dict[str, Path]) -> None:
    st = start_server(model_repository=repo)
    shutil.copytree(sources["elsewhere"], repo / "gamma" / "3")
    with NextCharClient(st.address) as c:
        assert c.load_model("gamma").version == "3"
        assert _models(c) == {"alpha": "1", "beta": "1", "gamma": "3"}


# -- folders that hold no model ---------------------------------------------------------------------
def test_folders_without_a_model_are_ignored_at_start_and_by_polling(start_server,
                                                                     repo: Path) -> None:
    (repo / "lost+found").mkdir()
    st = start_server(model_repository=repo)
    with NextCharClient(st.address) as c:
        assert _models(c) == {"alpha": "1", "beta": "1"}
        (repo / "copying").mkdir()  # a model's folder before its first manifest arrives
        (repo / "copying" / "1").mkdir()
        _poll(st)
        assert _models(c) == {"alpha": "1", "beta": "1"}
        assert c.health() == "SERVING"


def test_a_failed_model_whose_folder_goes_is_forgotten(start_server, repo: Path) -> None:
    broken = repo / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{not json")
    st = start_server(model_repository=repo)
    with NextCharClient(st.address) as c:
        assert _health_becomes(c, "NOT_SERVING") == "NOT_SERVING"  # strict readiness
        shutil.rmtree(repo / "broken")
        _poll(st)
        assert _models(c) == {"alpha": "1", "beta": "1"}
        assert _health_becomes(c, "SERVING") == "SERVING"


def test_polling_unloads_a_served_model_whose_folder_goes(start_server, repo: Path) -> None:
    st = start_server(model_repository=repo)
    with NextCharClient(st.address) as c:
        shutil.rmtree(repo / "beta")
        _poll(st)
        assert _models(c) == {"alpha": "1"}
        code, details = _error(c.predict, ["abc"], 0, False, None, (), False, "beta")
        assert code == grpc.StatusCode.NOT_FOUND
        assert details == "model 'beta' is not served here; models: alpha"
        assert c.health() == "SERVING"


# -- a version copied in file by file ---------------------------------------------------------------
def test_a_version_failed_mid_copy_loads_once_its_files_are_there(start_server, repo: Path,
                                                                   sources: dict[str, Path]) -> None:
    st = start_server(model_repository=repo)
    v2 = repo / "alpha" / "2"
    v2.mkdir()
    shutil.copy(sources["alpha"] / "manifest.json", v2)  # the manifest first, as `cp -r` may
    with NextCharClient(st.address) as c:
        _poll(st)
        assert _models(c)["alpha"] == "1"  # version 2 failed: its model files are missing
        _poll(st)
        assert _models(c)["alpha"] == "1"  # unchanged files: not re-verified
        for f in sources["alpha"].iterdir():
            if f.name != "manifest.json":
                shutil.copy(f, v2)
        _poll(st)
        assert _models(c)["alpha"] == "2"


# -- config.json ------------------------------------------------------------------------------------
def test_a_config_change_is_applied_by_load_and_by_polling(start_server, repo: Path) -> None:
    st = start_server(model_repository=repo)
    with NextCharClient(st.address) as c:
        assert c.model_info("alpha").limits.max_top_k == len(VOCAB)
        (repo / "alpha" / "config.json").write_text(json.dumps({"max_top_k": 4}))
        loaded = c.load_model("alpha")
        assert loaded.version == "1"
        assert c.model_info("alpha").limits.max_top_k == 4
        assert len(c.predict(["abc"], top_k=4, model="alpha")[0].top) == 4
        (repo / "alpha" / "config.json").write_text(json.dumps({"max_top_k": 2}))
        _poll(st)
        assert c.model_info("alpha").limits.max_top_k == 2


def test_a_bad_config_fails_the_load_and_the_served_version_stays(start_server,
                                                                  repo: Path) -> None:
    st = start_server(model_repository=repo)
    config = repo / "alpha" / "config.json"
    with NextCharClient(st.address) as c:
        config.write_text(json.dumps({"max_top_k": -1}))
        code, details = _error(c.load_model, "alpha")
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert details.startswith(f"model alpha: {config}: max_top_k: ")
        assert details.endswith("; still serving version 1")
        config.write_text(json.dumps({"bogus": 1}))
        code, details = _error(c.reload_model, "alpha")
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"{config}: unknown setting(s) bogus" in details
        assert [len(p.top) for p in c.predict(["abc"], top_k=3, model="alpha")] == [3]
        assert c.health() == "SERVING"
        # Polling finds it too: the served model's reason says why its settings did not change
        # (it was only in the log).
        config.write_text("{nope")
        _poll(st)
        _poll(st)
        alpha = {m.name: m for m in c.list_models().models}["alpha"]
        assert (alpha.version, alpha.state) == ("1", pb.MODEL_STATE_READY)
        assert alpha.reason.startswith(f"{config}: ") and alpha.reason.endswith(
            "; still serving version 1")
        config.unlink()
        _poll(st)
        assert {m.name: m for m in c.list_models().models}["alpha"].reason == ""


def test_load_of_a_served_model_whose_folder_went_says_so(start_server, repo: Path) -> None:
    st = start_server(model_repository=repo)
    with NextCharClient(st.address) as c:
        shutil.rmtree(repo / "beta")
        code, details = _error(c.load_model, "beta")
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert details == (f"model beta: {repo / 'beta'}: no such directory (an artifact "
                           f"directory or a directory of <version>/ artifact directories); "
                           f"still serving version 1")


def test_a_start_that_falls_back_to_an_older_version_says_why(start_server, repo: Path) -> None:
    """docs/models.md: READY on the older version, its reason naming the one that failed (at
    start-up the reason was empty; only a later reload call said why)."""
    (repo / "alpha" / "2").mkdir()
    (repo / "alpha" / "2" / "manifest.json").write_text("{not json")
    st = start_server(model_repository=repo)
    with NextCharClient(st.address) as c:
        alpha = {m.name: m for m in c.list_models().models}["alpha"]
        assert (alpha.version, alpha.state) == ("1", pb.MODEL_STATE_READY)
        assert alpha.reason.startswith("version 2 not loaded (")
        _poll(st)  # polling leaves the unchanged failure alone, and the reason with it
        assert {m.name: m for m in c.list_models().models}["alpha"].reason == alpha.reason


def test_the_index_says_why_a_newer_version_is_not_served(start_server, repo: Path) -> None:
    st = start_server(model_repository=repo)
    (repo / "alpha" / "2").mkdir()
    (repo / "alpha" / "2" / "manifest.json").write_text("{not json")
    with NextCharClient(st.address) as c:
        _poll(st)
        alpha = {m.name: m for m in c.list_models().models}["alpha"]
        assert (alpha.version, alpha.state) == ("1", pb.MODEL_STATE_READY)
        assert alpha.reason.startswith("version 2 not loaded (")
        shutil.rmtree(repo / "alpha" / "2")
        shutil.copytree(repo / "alpha" / "1", repo / "alpha" / "3")
        _poll(st)
        alpha = {m.name: m for m in c.list_models().models}["alpha"]
        assert (alpha.version, alpha.reason) == ("3", "")
        # A failed newer version that is then deleted leaves nothing to explain.
        (repo / "alpha" / "4").mkdir()
        (repo / "alpha" / "4" / "manifest.json").write_text("{not json")
        _poll(st)
        assert {m.name: m for m in c.list_models().models}["alpha"].reason.startswith(
            "version 4 not loaded (")
        shutil.rmtree(repo / "alpha" / "4")
        _poll(st)
        alpha = {m.name: m for m in c.list_models().models}["alpha"]
        assert (alpha.version, alpha.reason) == ("3", "")


@pytest.mark.parametrize("strict", [True, False])
def test_a_server_with_every_model_unloaded_is_not_ready(start_server, repo: Path,
                                                         strict: bool) -> None:
    """Nothing to serve is not ready, strict or not: a probe must not route calls that can only
    answer NOT_FOUND (with strict readiness, "every wanted model" was vacuously true)."""
    from http_util import call

    st = start_server(model_repository=repo, poll_s=0, strict_readiness=strict)
    with NextCharClient(st.address) as c:
        c.unload_model("alpha")
        assert _health_becomes(c, "SERVING") == "SERVING"  # beta still serves
        c.unload_model("beta")
        assert _health_becomes(c, "NOT_SERVING") == "NOT_SERVING"
        assert call(st.http_url, "GET", "/v2/health/ready").status == 503
        c.load_model("beta")
        assert _health_becomes(c, "SERVING") == "SERVING"


def test_a_failed_models_reason_stays_put_across_polls(start_server, repo: Path) -> None:
    """The reason changes only with a new attempt: it used to become "version 1 failed 2s ago
    ...", a new text at every poll (and a change notification to every watcher)."""
    (repo / "gamma" / "1").mkdir(parents=True)
    (repo / "gamma" / "1" / "manifest.json").write_text("{not json")
    st = start_server(model_repository=repo, strict_readiness=False)
    with NextCharClient(st.address) as c:
        first = {m.name: m for m in c.list_models().models}["gamma"]
        assert first.state == pb.MODEL_STATE_FAILED and "no version loads" in first.reason
        time.sleep(1.1)
        _poll(st)
        _poll(st)
        assert {m.name: m for m in c.list_models().models}["gamma"].reason == first.reason


def test_a_load_of_a_name_no_filesystem_holds_is_not_found(start_server, repo: Path) -> None:
    """Over 255 bytes the folder check raised ENAMETOOLONG: the call answered INTERNAL."""
    st = start_server(model_repository=repo)
    with NextCharClient(st.address) as c:
        code, details = _error(c.load_model, "x" * 300)
    assert code == grpc.StatusCode.NOT_FOUND
    assert details.startswith(f"model '{'x' * 300}' is not in the repository")


def test_reload_does_not_undo_an_unload(start_server, repo: Path) -> None:
    """ReloadModel on an unloaded model loaded it again (reloaded: true), undoing the unload."""
    st = start_server(model_repository=repo, poll_s=0)
    with NextCharClient(st.address) as c:
        c.unload_model("alpha")
        code, details = _error(c.reload_model, "alpha")
        assert code == grpc.StatusCode.NOT_FOUND
        assert details == ("model 'alpha' is unloaded: reload takes the newest version of a "
                           "loaded model; load it with LoadModel (nextchar load alpha)")
        assert {m.name: m.state for m in c.list_models().models}["alpha"] != pb.MODEL_STATE_READY
        assert c.load_model("alpha").version == "1"
        assert c.reload_model("alpha").reloaded is False  # loaded again: reload answers


def test_statistics_are_per_version_and_go_with_an_unload(start_server, repo: Path,
                                                         sources: dict[str, Path]) -> None:
    """As Triton keeps them: a new version starts at 0 (its predecessor's calls are not its),
    the old version is no longer asked for, and an unloaded model has none."""
    from nextchar.kserve import grpc_predict_v2_pb2 as kpb
    from nextchar.kserve import grpc_predict_v2_pb2_grpc as kpb_grpc

    st = start_server(model_repository=repo)
    with NextCharClient(st.address) as c, grpc.insecure_channel(st.address) as ch:
        stub = kpb_grpc.GRPCInferenceServiceStub(ch)

        def stats(version: str = "") -> Any:
            (s,) = stub.ModelStatistics(kpb.ModelStatisticsRequest(name="alpha",
                                                                   version=version)).model_stats
            return s.version, s.inference_stats.success.count, s.inference_count

        c.predict(["abc", "ab"], model="alpha")
        assert stats() == ("1", 1, 2)
        shutil.copytree(sources["alpha"], repo / "alpha" / "2")
        c.load_model("alpha")
        assert stats() == stats("2") == ("2", 0, 0)
        c.predict(["abc"], model="alpha")
        assert stats() == ("2", 1, 1)
        with pytest.raises(grpc.RpcError) as e:
            stats("1")
        assert (e.value.code(), e.value.details()) == (
            grpc.StatusCode.NOT_FOUND, "model 'alpha' has no version '1' loaded")
        c.unload_model("alpha")
        with pytest.raises(grpc.RpcError) as e:
            stats()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "model 'alpha' is not loaded" in e.value.details()
        every = stub.ModelStatistics(kpb.ModelStatisticsRequest()).model_stats
        assert [(s.name, s.version) for s in every] == [("beta", "1")]
