"""Generate over real gRPC: exact text, seeded determinism under concurrency, stop strings,
continuation state, cancellation that frees the slot, admission and validation."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from nextchar.client import NextCharClient, NextCharError
from nextchar.client.client import generate_request
from nextchar.v1 import nextchar_pb2 as pb

BACKENDS = ["onnx", "torchscript"]
PROMPT = "To be, or not to be"


def _collect(c: NextCharClient, request: pb.GenerateRequest) -> tuple[str, pb.GenerateResponse]:
    """The whole text and the last response; asserts only the last one carries a stop reason."""
    responses = list(c.generate_responses(request))
    assert all(r.stop_reason == pb.STOP_REASON_UNSPECIFIED and not r.state for r in responses[:-1])
    assert responses[-1].stop_reason != pb.STOP_REASON_UNSPECIFIED
    return "".join(r.text for r in responses), responses[-1]


def _wait_for(condition, what: str, limit_s: float = 30.0) -> None:
    """Waits for an event of the server (not a timing assertion: the bound only ends a hang)."""
    end = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"still waiting for {what} after {limit_s:.0f}s")
        time.sleep(0.01)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_text_equals_argmax_of_growing_prefix(
    start_server, tiny_artifact: Path, backend: str
) -> None:
    """Step batching ingests the prompt and every generated character exactly: greedy
    generation equals asking Predict for the argmax after each growing prefix."""
    st = start_server(model=tiny_artifact, backend=backend)
    with NextCharClient(st.address) as c:
        text, last = _collect(c, generate_request(PROMPT, max_chars=40, temperature=0.0))
        expected = ""
        for _ in range(40):
            (pred,) = c.predict([PROMPT + expected], top_k=1)
            expected += pred.top[0].char
        version = c.model_info().version
    assert text == expected
    assert last.stop_reason == pb.STOP_REASON_MAX_CHARS
    assert last.model_version == version


def test_top_k_1_and_tiny_top_p_are_greedy(client: NextCharClient) -> None:
    greedy = "".join(client.generate(PROMPT, max_chars=30, temperature=0.0))
    assert "".join(client.generate(PROMPT, max_chars=30, top_k=1, seed=1)) == greedy
    assert "".join(client.generate(PROMPT, max_chars=30, top_p=1e-9, seed=2)) == greedy
    assert len(greedy) == 30


def test_same_seed_same_text_even_with_other_streams_running(
    start_server, tiny_artifact: Path
) -> None:
    st = start_server(model=tiny_artifact, backend="onnx")
    settings = dict(max_chars=300, temperature=0.9, top_k=20, top_p=0.95)
    with NextCharClient(st.address) as c:
        alone = "".join(c.generate(PROMPT, seed=1234, **settings))
        again = "".join(c.generate(PROMPT, seed=1234, **settings))
        other_seed = "".join(c.generate(PROMPT, seed=1235, **settings))

        def one(i: int) -> str:
            # Seed 1234 three times among streams of other seeds, prompts and settings.
            if i % 3 == 0:
                return "".join(c.generate(PROMPT, seed=1234, **settings))
            return "".join(c.generate(PROMPT + "abcdefgh"[:i], max_chars=300 + i, seed=i,
                                      temperature=1.0 + i / 10))

        with ThreadPoolExecutor(9) as pool:
            crowd = list(pool.map(one, range(9)))
    gen = st.server.runtime().generator
    assert alone == again and len(alone) == 300
    assert other_seed != alone
    assert crowd[0] == crowd[3] == crowd[6] == alone
    # The streams really shared model calls: some steps advanced several streams at once.
    assert gen.stats.step_rows > gen.stats.steps


def test_step_batching_off_gives_the_same_text(start_server, tiny_artifact: Path) -> None:
    on = start_server(model=tiny_artifact, backend="onnx")
    off = start_server(model=tiny_artifact, backend="onnx", step_batching=False)
    texts = []
    for st in (on, off):
        with NextCharClient(st.address) as c:
            texts.append("".join(c.generate(PROMPT, max_chars=80, seed=5, temperature=0.8)))
    assert texts[0] == texts[1]
    # Off: one model call per stream per character (the last one is never fed to the model).
    stats = off.server.runtime().generator.stats
    assert (stats.chars, stats.steps, stats.step_rows) == (80, 79, 79)


def test_stop_string_ends_before_it_and_the_state_excludes_it(client: NextCharClient) -> None:
    full = "".join(client.generate(PROMPT, max_chars=120, temperature=0.0))
    stop = full[50:53]
    cut = full.index(stop)
    text, last = _collect(client, generate_request(PROMPT, max_chars=120, temperature=0.0,
                                                   stop=["zzzzzz", stop], return_state=True))
    assert text == full[:cut]
    assert last.stop_reason == pb.STOP_REASON_STOP_STRING
    # The state is the one after prompt + returned text, not after the stop string.
    k = client.model_info().limits.max_top_k
    (cont,) = client.predict(["Q"], top_k=k, states=[last.state])
    (whole,) = client.predict([PROMPT + text + "Q"], top_k=k)
    assert [c.id for c in cont.top] == [c.id for c in whole.top]
    np.testing.assert_allclose([c.prob for c in cont.top], [c.prob for c in whole.top],
                               atol=1e-5, rtol=0)


def test_stop_string_at_the_first_character_returns_no_text(client: NextCharClient) -> None:
    first = "".join(client.generate(PROMPT, max_chars=1, temperature=0.0))
    text, last = _collect(client, generate_request(PROMPT, max_chars=50, temperature=0.0,
                                                   stop=[first]))
    assert text == "" and last.stop_reason == pb.STOP_REASON_STOP_STRING


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_continues_a_state_exactly(
    start_server, tiny_lstm_artifact: Path, backend: str
) -> None:
    st = start_server(model=tiny_lstm_artifact, backend=backend)
    with NextCharClient(st.address) as c:
        k = c.model_info().limits.max_top_k
        # Predict's state continued by Generate == generating from the whole prompt.
        (head,) = c.predict([PROMPT[:7]], return_state=True)
        whole = "".join(c.generate(PROMPT, max_chars=60, seed=9))
        cont = "".join(c.generate(PROMPT[7:], max_chars=60, seed=9, state=head.state))
        assert cont == whole
        # Generate's state (max_chars) continued by Predict == predicting the whole text.
        text, last = _collect(c, generate_request(PROMPT, max_chars=25, seed=3,
                                                  return_state=True))
        (a,) = c.predict(["e"], top_k=k, states=[last.state])
        (b,) = c.predict([PROMPT + text + "e"], top_k=k)
    np.testing.assert_allclose([x.prob for x in a.top], [x.prob for x in b.top], atol=1e-5, rtol=0)
    assert [x.id for x in a.top] == [x.id for x in b.top]


def test_cancel_mid_stream_frees_the_slot(start_server, tiny_artifact: Path) -> None:
    st = start_server(model=tiny_artifact, backend="onnx", max_streams=1,
                      max_chars_per_text=1_000_000)
    gen = st.server.runtime().generator
    with NextCharClient(st.address, timeout_s=60) as c:
        stream = c.generate(PROMPT, max_chars=1_000_000, seed=1)
        assert next(stream)  # generating now
        assert gen.active_streams == 1
        with pytest.raises(NextCharError) as e:
            next(c.generate(PROMPT, max_chars=5))
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.value.details == ("server busy: 1 Generate streams active, limit max_streams 1; "
                                   "retry with backoff")
        stream.close()  # leaves the loop early: the client cancels the call
        _wait_for(lambda: gen.active_streams == 0, "the cancelled stream to free its slot")
        _wait_for(lambda: gen.stepping_streams == 0, "the step loop to drop the stream")
        chars = gen.stats.chars
        assert chars < 1_000_000  # its work stopped
        assert gen.stats.closed_early == 1 and gen.stats.rejected == 1
        # The freed slot takes a new stream, and the cancelled one made no further steps.
        assert len("".join(c.generate(PROMPT, max_chars=5))) == 5
        assert gen.stats.chars == chars + 5
        assert gen.active_streams == 0 and gen.stats.finished == 1


def test_client_deadline_ends_the_stream_and_frees_the_slot(
    start_server, tiny_artifact: Path
) -> None:
    st = start_server(model=tiny_artifact, backend="onnx", max_chars_per_text=1_000_000)
    gen = st.server.runtime().generator
    with NextCharClient(st.address) as c:
        with pytest.raises(NextCharError) as e:
            "".join(c.generate(PROMPT, max_chars=1_000_000, timeout_s=0.5))
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_for(lambda: gen.active_streams == 0, "the expired stream to free its slot")


def test_model_info_advertises_max_streams(start_server, tiny_artifact: Path) -> None:
    st = start_server(model=tiny_artifact, backend="onnx", max_streams=7)
    with NextCharClient(st.address) as c:
        assert c.model_info().limits.max_streams == 7


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="ab\u00e9"), "prompt: character '\u00e9' (U+00E9) at position 2 is not in"),
    (dict(max_chars=0), "max_chars must be between 1 and 4096"),
    (dict(max_chars=4097), "max_chars must be between 1 and 4096"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_k=60), "top_k must be between 0 (all) and the vocabulary size 59"),
    (dict(top_p=1.5), "top_p must be between 0 and 1"),
    (dict(stop=["a"] * 9), "9 stop strings > 8"),
    (dict(stop=["ok", ""]), "stop[1] has 0 characters"),
    (dict(stop=["x" * 65]), "stop[0] has 65 characters"),
    (dict(state=b"garbage"), "state is not a nextchar state"),
])
def test_bad_generate_requests_are_invalid_argument(client: NextCharClient, kwargs, message) -> None:
    args = dict(prompt=PROMPT, max_chars=10) | kwargs
    with pytest.raises(NextCharError) as e:
        list(client.generate_responses(generate_request(**args)))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details.startswith(message)


def test_foreign_state_in_generate_is_failed_precondition(
    start_server, client: NextCharClient, tiny_lstm_artifact: Path
) -> None:
    other = start_server(model=tiny_lstm_artifact, backend="onnx")
    with NextCharClient(other.address) as oc:
        (pred,) = oc.predict(["hello"], return_state=True)
    with pytest.raises(NextCharError) as e:
        list(client.generate("abc", max_chars=5, state=pred.state))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.details.startswith("state was produced by another model")


def test_server_stop_ends_open_streams_cleanly(start_server, tiny_artifact: Path) -> None:
    st = start_server(model=tiny_artifact, backend="onnx", max_chars_per_text=1_000_000)
    errors: list[NextCharError] = []
    started = threading.Event()

    def consume() -> None:
        with NextCharClient(st.address, timeout_s=60) as c:
            try:
                for _ in c.generate(PROMPT, max_chars=1_000_000):
                    started.set()
            except NextCharError as e:
                errors.append(e)

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(30)
    st.call(st.server.stop(grace_s=0.2))
    t.join(30)
    assert len(errors) == 1
    assert errors[0].code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert st.server.runtime().generator.active_streams == 0


def test_cli_prints_the_generated_text(client: NextCharClient, tiny_server) -> None:
    expected = "".join(client.generate(PROMPT, max_chars=30, seed=11))
    cli = [sys.executable, "-m", "nextchar.client.cli", "generate", "--server", tiny_server.address]
    ok = subprocess.run([*cli, "--seed", "11", "--max-chars", "30", "--echo", PROMPT],
                        capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, PROMPT + expected + "\n", "")
    # A limit only the server knows (its max_chars_per_text) comes back as the server's error.
    bad = subprocess.run([*cli, "--max-chars", "5000", PROMPT], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr == ("nextchar generate: INVALID_ARGUMENT: max_chars must be between 1 and "
                          "4096 (max_chars_per_text), got 5000\n")


# -- the sampler -------------------------------------------------------------------------------
def _logits_of(probs: list[float]) -> np.ndarray:
    return np.log(np.array(probs, dtype=np.float32))[None, :]


def test_sampler_follows_the_probabilities_exactly() -> None:
    from nextchar.server.generator import sample_ids

    probs = [0.1, 0.5, 0.15, 0.25]
    n = 10_000
    u = (np.arange(n) + 0.5) / n  # evenly spread draws: counts are the probabilities x n
    ids = sample_ids(np.repeat(_logits_of(probs), n, axis=0), u, 1.0, 0, 0.0)
    np.testing.assert_allclose(np.bincount(ids, minlength=4) / n, probs, atol=2 / n)
    # Temperature 0.5 squares the probabilities (then renormalises).
    ids = sample_ids(np.repeat(_logits_of(probs), n, axis=0), u, 0.5, 0, 0.0)
    sq = np.square(probs) / np.square(probs).sum()
    np.testing.assert_allclose(np.bincount(ids, minlength=4) / n, sq, atol=2 / n)


@pytest.mark.parametrize("top_k, top_p, allowed", [
    (1, 0.0, {1}), (2, 0.0, {1, 3}), (3, 0.0, {1, 3, 2}),
    (0, 0.5, {1}), (0, 0.7, {1, 3}), (0, 0.75, {1, 3}), (0, 0.76, {1, 3, 2}),
    (2, 0.9, {1, 3}), (0, 1.0, {0, 1, 2, 3}),
])
def test_sampler_top_k_and_top_p_restrict_the_candidates(top_k, top_p, allowed) -> None:
    from nextchar.server.generator import sample_ids

    n = 1000
    u = (np.arange(n) + 0.5) / n
    ids = sample_ids(np.repeat(_logits_of([0.1, 0.5, 0.15, 0.25]), n, axis=0), u, 1.0, top_k, top_p)
    assert set(ids.tolist()) == allowed


def test_sampler_equals_the_stable_argsort_reference_exactly(monkeypatch) -> None:
    """The sampler sorts integer keys instead of argsorting: the same ids for every input,
    ties (lower id first), -0.0 against 0.0 and temperatures outside ORDER_BY_LOGITS included;
    the order also with infinite logits. The reference is the sampler's own argsort path
    (taken for every temperature once ORDER_BY_LOGITS is empty)."""
    import nextchar.server.generator as gen

    def reference(*args):
        with monkeypatch.context() as m:
            m.setattr(gen, "ORDER_BY_LOGITS", (np.inf, -np.inf))
            return gen.sample_ids(*args)

    rng = np.random.default_rng(7)
    for case in range(3000):
        v = int(rng.choice([2, 5, 84, 255, 256, 300]))
        logits = (rng.standard_normal((16, v)) * rng.choice([1e-3, 1.0, 30.0])).astype(np.float32)
        if case % 3 == 0:
            logits = np.round(logits, 1)  # many ties
        if case % 5 == 0:
            logits[:, : v // 2] = np.where(rng.random((16, v // 2)) < 0.5, 0.0, -0.0)
        if case % 7 == 0:
            logits[:, 0], logits[:, -1] = np.inf, -np.inf
        u = rng.random(16)
        t = float(rng.choice([1.0, 0.7, 1.5, 1e-3, 1e-40, 1e40]))
        k = int(rng.choice([0, 1, 3, 40, 400]))
        p = float(rng.choice([0.0, 0.5, 0.9, 1.0]))
        if np.isfinite(logits).all():  # (infinite logits give NaN probabilities either way)
            want = reference(logits, u, t, k, p)
            assert np.array_equal(gen.sample_ids(logits, u, t, k, p), want), (case, t, k, p)
        assert np.array_equal(gen.descending_order(logits),
                              np.argsort(-logits.astype(np.float64), axis=1, kind="stable"))


@pytest.mark.parametrize("t", [1e-320, 5e-324, 1e-300, 1e-31])
def test_a_temperature_so_cold_it_overflows_is_greedy(t: float, recwarn) -> None:
    """logits / t would be +-inf (then inf - inf = nan): the answer is the argmax, as at t -> 0,
    without a numpy warning; tied maxima share the probability."""
    from nextchar.server.generator import sample_ids

    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((64, 84)) * 5).astype(np.float32)
    u = rng.random(64)
    assert sample_ids(logits, u, t, 0, 0.0).tolist() == np.argmax(logits, axis=1).tolist()
    assert sample_ids(logits, u, t, 40, 0.9).tolist() == np.argmax(logits, axis=1).tolist()
    tied = np.array([[1.0, 3.0, 3.0, -2.0]] * 2, dtype=np.float32)
    assert sample_ids(tied, np.array([0.25, 0.75]), t, 0, 0.0).tolist() == [1, 2]
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_sampler_rows_do_not_depend_on_each_other() -> None:
    from nextchar.server.generator import sample_ids

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, 84)).astype(np.float32) * 3
    u = rng.random(64)
    together = sample_ids(logits, u, 0.8, 40, 0.9)
    alone = [int(sample_ids(logits[r : r + 1], u[r : r + 1], 0.8, 40, 0.9)[0]) for r in range(64)]
    assert together.tolist() == alone


def test_flush_interval_coalesces_messages_and_keeps_the_text(
    start_server, tiny_artifact: Path
) -> None:
    request = generate_request(PROMPT, max_chars=1000, seed=4)
    texts, counts = [], []
    # (flush_ms, max_messages_per_s): every step; a minute's interval; no interval but a cap
    # of one message per 1,000 s for the one open stream.
    for flush_ms, cap in ((0.0, 0.0), (60_000.0, 0.0), (0.0, 0.001)):
        st = start_server(model=tiny_artifact, backend="onnx", generate_flush_ms=flush_ms,
                          generate_max_messages_per_s=cap)
        with NextCharClient(st.address) as c:
            responses = list(c.generate_responses(request))
        texts.append("".join(r.text for r in responses))
        counts.append(len(responses))
        assert responses[-1].stop_reason == pb.STOP_REASON_MAX_CHARS
    assert texts[0] == texts[1] == texts[2] and len(texts[0]) == 1000
    # Every step's character may go out at once; with a minute's interval, or the cap, only
    # the first text and the end (which never waits) do.
    assert counts[0] > 2 and counts[1] <= 2 and counts[2] <= 2


def test_the_prefill_wait_comes_from_the_settings(start_server, tiny_artifact: Path) -> None:
    """--generate-prefill-wait-ms reaches the generator (default 50 ms; 0: steps never wait);
    the batcher's tests (tests/server/test_batcher.py) check what the wait does."""
    assert start_server(model=tiny_artifact).server.runtime().generator.prefill_wait_s == 0.05
    st = start_server(model=tiny_artifact, generate_prefill_wait_ms=0)
    assert st.server.runtime().generator.prefill_wait_s == 0.0
    with NextCharClient(st.address, timeout_s=60) as c:
        text, last = _collect(c, pb.GenerateRequest(prompt=PROMPT, max_chars=20, seed=3))
    assert len(text) == 20 and last.stop_reason == pb.STOP_REASON_MAX_CHARS


def test_the_message_cap_stretches_the_flush_interval_with_the_open_streams(
    start_server, tiny_artifact: Path
) -> None:
    st = start_server(model=tiny_artifact, backend="onnx", generate_flush_ms=20.0,
                      generate_max_messages_per_s=100.0, max_chars_per_text=1_000_000)
    gen = st.server.runtime().generator
    assert gen.flush_interval() == 0.02  # no stream open: flush_ms
    with NextCharClient(st.address, timeout_s=60) as c:
        streams = [c.generate(PROMPT, max_chars=1_000_000, seed=i) for i in range(4)]
        try:
            assert all(next(s) for s in streams)  # all four generating
            assert gen.active_streams == 4
            # 4 streams at one message per 20 ms would be 200 a second: each waits 4 / 100 s.
            assert gen.flush_interval() == pytest.approx(0.04)
            streams.pop().close()
            _wait_for(lambda: gen.active_streams == 3, "the closed stream to free its slot")
            assert gen.flush_interval() == pytest.approx(0.03)
            streams.pop().close()
            streams.pop().close()
            _wait_for(lambda: gen.active_streams == 1, "two more streams to free their slots")
            assert gen.flush_interval() == 0.02  # 1 / 100 s is under flush_ms
        finally:
            for s in streams:
                s.close()
