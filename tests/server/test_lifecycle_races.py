"""Load, unload, reload and polls that overlap each other or a call in flight: an operator's
unload sticks, a load its caller abandoned still ends, every protocol's readiness agrees, and a
call finishes on the version it started on, its OpenAI logprobs included."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest
from http_util import call

from nextchar.client import NextCharClient, NextCharError
from nextchar.server.errors import ArtifactError, NotFound, NotReady
from nextchar.server.registry import ModelState
from nextchar.server.repository import ModelSource
from nextchar.v1 import nextchar_pb2 as pb

VOCAB = "abcdefgh "


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from nextchar.training.export import build_random_artifact

    base = tmp_path_factory.mktemp("race-src")
    return {name: build_random_artifact(base / name, vocab=VOCAB, embed_dim=8, hidden_size=16,
                                        num_layers=1, seed=i, name=name)
            for i, name in enumerate(("alpha", "beta"))}


@pytest.fixture
def repo(tmp_path: Path, sources: dict[str, Path]) -> Path:
    root = tmp_path / "models"
    shutil.copytree(sources["alpha"], root / "alpha" / "1")
    shutil.copytree(sources["beta"], root / "beta" / "1")
    return root


def _state(st: Any, name: str) -> ModelState:
    return st.server.registry.slot(name).state


def _unload_at_the_first_score(st: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the first logprobs Predict of a completion unloads alpha just before it
    runs; the list gets the unloaded version."""
    from nextchar.server.http import openai

    original = openai._Scorer.score
    unloaded: list[str] = []

    async def score_after_an_unload(self: Any, piece: str) -> dict[str, Any]:
        if not unloaded:
            unloaded.append(await st.server.plane.unload_model("alpha"))
        return await original(self, piece)

    monkeypatch.setattr(openai._Scorer, "score", score_after_an_unload)
    return unloaded


# -- an unload queued behind a load is not undone ----------------------------------------------------
@pytest.mark.parametrize("then", ["reload", "poll"])
def test_an_unload_queued_before_a_reload_or_poll_sticks(start_server, repo: Path,
                                                         then: str) -> None:
    """Unload, then ReloadModel (or a poll), both waiting on the model's lock behind a load in
    progress: the unload ran first, so the reload is NOT_FOUND and the poll leaves the model
    alone. Both checked `wanted` before waiting on the lock and loaded the model again."""
    st = start_server(model_repository=repo, poll_s=0)
    reg, plane = st.server.registry, st.server.plane

    async def race() -> BaseException | None:
        slot = reg.slot("alpha")
        async with slot._lock:  # a load (a config.json change, a new version) in progress
            unload = asyncio.ensure_future(plane.unload_model("alpha"))
            await asyncio.sleep(0)  # the unload waits on the lock first
            later = asyncio.ensure_future(plane.reload_model("alpha") if then == "reload"
                                          else reg.poll_once())
            await asyncio.sleep(0)
        assert await unload == "1"
        try:
            await later
        except NotFound as e:
            return e
        return None

    error = st.call(race())
    if then == "reload":
        assert isinstance(error, NotFound)
        assert error.message == ("model 'alpha' is unloaded: reload takes the newest version of "
                                 "a loaded model; load it with LoadModel (nextchar load alpha)")
    else:
        assert error is None
    assert st.server.registry.slot("alpha").current is None
    with NextCharClient(st.address) as c:
        with pytest.raises(NextCharError) as e:
            c.predict(["abc"], model="alpha")
        assert e.value.code == grpc.StatusCode.NOT_FOUND


# -- a load its caller abandons ----------------------------------------------------------------------
def test_a_load_whose_caller_goes_away_still_ends_ready(start_server, repo: Path) -> None:
    """A client's deadline cancels its handler mid-load: the model stayed LOADING ("retry
    shortly") for good, and ServerReady false, until another load. The load now runs to its
    end, and every readiness answer says so."""
    st = start_server(model_repository=repo, poll_s=0)
    reg, plane = st.server.registry, st.server.plane
    st.call(plane.unload_model("alpha"))

    async def abandoned_load() -> ModelState:
        slot = reg.slot("alpha")
        while slot.state is not ModelState.UNAVAILABLE:  # the unloaded version closed
            await asyncio.sleep(0.01)
        caller = asyncio.ensure_future(plane.load_model("alpha"))
        while slot.state is not ModelState.LOADING:  # the load began
            await asyncio.sleep(0)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        async with slot._lock:  # the load's end
            return slot.state

    assert st.call(abandoned_load()) is ModelState.READY
    with NextCharClient(st.address) as c:
        assert len(c.predict(["abc"], model="alpha")) == 1
        assert c.health() == "SERVING"
    assert call(st.http_url, "GET", "/v2/health/ready").status == 200


# -- a refused load of an unloaded model -------------------------------------------------------------
def test_a_refused_load_of_an_unloaded_model_is_failed_everywhere(start_server,
                                                                  repo: Path) -> None:
    """A broken model, unloaded (the server turns ready), then loaded again within 30 s: the
    load is refused without re-verifying it. The index kept saying UNAVAILABLE "not loaded",
    and gRPC health SERVING while ServerReady and /v2/health/ready said not ready."""
    broken = repo / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{not json")
    st = start_server(model_repository=repo, poll_s=0)  # strict readiness: the default
    with NextCharClient(st.address) as c:
        assert c.health() == "NOT_SERVING"
        c.unload_model("broken")
        assert c.health() == "SERVING"
        with pytest.raises(NextCharError) as e:
            c.load_model("broken")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "not re-verified before 30s" in e.value.details
        (model,) = [m for m in c.list_models().models if m.name == "broken"]
        assert model.state == pb.MODEL_STATE_FAILED
        assert model.reason.startswith("version 1 failed ")
        assert c.health() == "NOT_SERVING"
    assert call(st.http_url, "GET", "/v2/health/ready").status == 503


# -- which folders are versions ----------------------------------------------------------------------
def test_only_folders_named_by_a_number_are_versions(start_server, repo: Path,
                                                     sources: dict[str, Path],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """`backup/` beside `3/` outranked every number in natural order and was served (a call
    for version 3 was NOT_FOUND); `1` and `01` were served in directory listing order."""
    alpha = repo / "alpha"
    shutil.copytree(sources["alpha"], alpha / "3")
    shutil.copytree(sources["beta"], alpha / "backup")
    shutil.copytree(sources["beta"], alpha / "v10")
    shutil.copytree(sources["alpha"], alpha / "01")
    shutil.copytree(sources["alpha"], alpha / "\u00b2")  # a digit to str.isdigit(), not to int()
    assert [p.name for p in ModelSource(alpha).candidates()] == ["3", "1", "01"]
    only_named = repo / "named"
    shutil.copytree(sources["alpha"], only_named / "v1")
    with pytest.raises(ArtifactError) as e:
        ModelSource(only_named).candidates()
    assert str(e.value).endswith("; v1: not versions, a version folder's name starts with a "
                                 "digit (1, 2, 20261127-1015)")
    archive = repo / "archive" / "beta-old"  # old artifacts kept in the repository
    shutil.copytree(sources["beta"], archive)
    with caplog.at_level("WARNING", logger="nextchar.server.repository"):
        st = start_server(model_repository=repo, poll_s=0)
    with NextCharClient(st.address) as c:
        # Neither is a model, so neither holds readiness back (strict by default) ...
        assert {m.name: m.version for m in c.list_models().models} == {"alpha": "3", "beta": "1"}
        assert c.health() == "SERVING"
    # ... and neither is skipped without a word.
    said = [r.getMessage() for r in caplog.records]
    assert f"{repo / 'named'}: not a model: v1 hold a manifest but are not versions (a version " \
           "folder's name starts with a digit: 1, 2, 20261127-1015)" in said, said
    assert any(m.startswith(f"{repo / 'archive'}: not a model: beta-old") for m in said), said


# -- OpenAI logprobs: the version that wrote the text scores it -------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_stay_on_their_version_across_an_unload(
        start_server, repo: Path, monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    """The model unloaded between a completion's text and its logprobs: the logprobs looked the
    model up by name again (404 after a whole completion was made, or an in-band error in a
    stream; after a reload, another version's scores). They come from the stream's version."""
    st = start_server(model_repository=repo, poll_s=0)
    body = {"model": "alpha", "prompt": "abc", "max_tokens": 40, "logprobs": 2, "seed": 5,
            "stream": stream}

    def scored(reply: Any) -> tuple[str, list[Any], list[Any]]:
        assert reply.status == 200, reply.body
        docs = [e for e in reply.events() if e != "[DONE]"] if stream else [reply.json()]
        pieces = [ch for d in docs for ch in d["choices"]]
        assert all("error" not in d for d in docs), docs
        return ("".join(p["text"] for p in pieces),
                [x for p in pieces if p["logprobs"] for x in p["logprobs"]["token_logprobs"]],
                [x for p in pieces if p["logprobs"] for x in p["logprobs"]["top_logprobs"]])

    before = scored(call(st.http_url, "POST", "/v1/completions", body))
    unloaded = _unload_at_the_first_score(st, monkeypatch)
    after = scored(call(st.http_url, "POST", "/v1/completions", body))
    assert unloaded == ["1"]
    assert after == before and len(after[0]) == 40

    async def closed() -> ModelState:  # the version closes after its last call
        while _state(st, "alpha") is ModelState.UNLOADING:
            await asyncio.sleep(0.01)
        return _state(st, "alpha")

    assert st.call(closed(), timeout_s=10) is ModelState.UNAVAILABLE


def test_a_poll_forgets_a_gone_model_only_after_a_load_in_progress_ends(start_server,
                                                                        repo: Path) -> None:
    """Polling deleted the slot of a model whose folder went while a load of it ran: the load
    then finished into a slot nobody could reach, its runtime never closed. The poll now waits
    for the load and unloads what it served; a load queued behind the poll is NOT_FOUND."""
    st = start_server(model_repository=repo, poll_s=0)
    reg = st.server.registry

    async def race() -> tuple[bool, str]:
        slot = reg.slot("beta")
        async with slot._lock:  # a load of beta in progress
            shutil.rmtree(repo / "beta")
            poll = asyncio.ensure_future(reg.poll_once())
            await asyncio.sleep(0.05)
            kept_during_load = "beta" in reg.slots
            queued = asyncio.ensure_future(slot.load())
            await asyncio.sleep(0)
        await poll
        try:
            await queued
        except NotFound as e:
            return kept_during_load, e.message
        return kept_during_load, ""

    kept, message = st.call(race())
    assert kept
    assert message.startswith("model 'beta' is no longer in the repository")
    assert "beta" not in reg.slots
    assert all(rt.name != "beta" or rt.retired for rt in reg.runtimes())


def test_a_stop_ends_a_load_in_progress_rather_than_wait_for_it(
        start_server, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load runs to its end when its caller goes away, but not past a stop: a second signal
    waited out a whole load (warm-up and probe) of a version about to be closed, seconds of
    a model's load under a pod's termination grace."""
    import threading
    import time

    import nextchar.server.registry as registry_module

    st = start_server(model_repository=repo, poll_s=0)
    plane = st.server.plane
    st.call(plane.unload_model("alpha"))
    real_open = registry_module.open_model
    opened = threading.Event()

    def slow_open(*args: Any) -> Any:
        opened.wait(30)  # on asyncio.to_thread's thread: a wait no cancel ends
        return real_open(*args)

    async def stop_mid_load() -> tuple[float, BaseException | None]:
        slot = st.server.registry.slot("alpha")
        while slot.state is not ModelState.UNAVAILABLE:
            await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(plane.load_model("alpha"))
        while slot.state is not ModelState.LOADING:
            await asyncio.sleep(0)
        gone.cancel()  # the client went away; the load goes on
        await asyncio.gather(gone, return_exceptions=True)
        waiting = asyncio.ensure_future(plane.load_model("alpha"))  # queued behind it
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await st.server.stop_now()
        took = time.monotonic() - started
        (outcome,) = await asyncio.gather(waiting, return_exceptions=True)
        return took, outcome

    monkeypatch.setattr(registry_module, "open_model", slow_open)
    try:
        took, outcome = st.call(stop_mid_load())
    finally:
        opened.set()
    assert took < 15, took  # the load would have taken 30 s
    # A caller still waiting gets the drain's answer, not a cancelled call (a bare HTTP 500).
    assert isinstance(outcome, NotReady), outcome
    assert outcome.message.startswith("server is shutting down: the load was stopped")
    assert st.server.registry.slot("alpha").state is ModelState.UNAVAILABLE


def test_a_poll_does_not_forget_a_folder_back_by_the_time_it_may(start_server, repo: Path,
                                                                 sources: dict[str, Path]) -> None:
    """The scan is taken before the poll waits for a load in progress; a folder restored
    meanwhile (a copy replaced by a rename) stays served."""
    st = start_server(model_repository=repo, poll_s=0)
    reg = st.server.registry

    async def race() -> None:
        slot = reg.slot("beta")
        async with slot._lock:  # a load of beta in progress
            shutil.move(repo / "beta", repo / ".beta-old")
            poll = asyncio.ensure_future(reg.poll_once())
            await asyncio.sleep(0.05)  # the poll scanned: beta gone; it waits on the lock
            shutil.move(repo / ".beta-old", repo / "beta")
        await poll

    st.call(race())
    assert reg.slot("beta").current is not None


def test_logprobs_without_tokens_stay_on_one_version_across_an_unload(
        start_server, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """max_tokens 0 opens no stream: the prompt's logprobs looked the model up by name at each
    Predict (404 after an unload; another version's after a reload). A lease of the version
    served when the request began now holds them."""
    st = start_server(model_repository=repo, poll_s=0)
    body = {"model": "alpha", "prompt": ["abc", "cab"], "max_tokens": 0, "logprobs": 2,
            "echo": True}
    before = call(st.http_url, "POST", "/v1/completions", body)
    assert before.status == 200, before.body
    unloaded = _unload_at_the_first_score(st, monkeypatch)
    after = call(st.http_url, "POST", "/v1/completions", body)
    assert unloaded == ["1"]
    assert after.status == 200, after.body
    assert after.json()["choices"] == before.json()["choices"]
