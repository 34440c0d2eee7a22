"""Answers over real gRPC: the seed's hello -> ohlol, parity with eager PyTorch, batching."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from nextchar.client import NextCharClient

BACKENDS = ["onnx", "torchscript"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hello_answers_ohlol_per_position(start_server, hello_artifact: Path, backend: str) -> None:
    st = start_server(model=hello_artifact, backend=backend)
    with NextCharClient(st.address) as c:
        (pred,) = c.predict(["hello"], per_position=True, top_k=1)
    assert pred.argmax_text == "ohlol"
    assert [p.char for p in pred.positions] == list("ohlol")
    assert pred.top[0].char == "l"  # the last position's argmax is the top-1 next character


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small model trained briefly on a real (tiny) corpus, and its artifact."""
    from nextchar.training.export import export_artifact
    from nextchar.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("corpus")
    text = root / "text.txt"
    text.write_text("To be, or not to be, that is the question:\n"
                    "Whether 'tis nobler in the mind to suffer\n" * 40, encoding="utf-8")
    run = root / "run"
    train(TrainConfig(out=str(run), corpus=[str(text)], max_steps=30, cell="gru", embed_dim=16,
                      hidden_size=32, num_layers=2, batch_size=8, bptt=32, eval_every=1000,
                      progress=False, precision="fp32"))
    return run, export_artifact(run, root / "artifact")


def _eager_probs(run: Path, texts: list[str]) -> list[np.ndarray]:
    import torch

    from nextchar.training.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(run)
    model = model_from_checkpoint(ckpt, run).eval()
    index = {c: i for i, c in enumerate(ckpt["vocab"])}
    out = []
    with torch.no_grad():
        for t in texts:  # one at a time: no padding involved on the reference side
            ids = torch.tensor([[index[c] for c in t]])
            logits, _, _ = model(ids, torch.tensor([len(t)]), model.initial_state(1))
            out.append(torch.softmax(logits[0], -1).numpy())
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_backends_agree_with_eager(start_server, corpus_run, backend: str) -> None:
    run, artifact = corpus_run
    texts = ["T", "To be", "Whether 'tis nobler in the mind", "question:\nWhether", "o"]
    expected = _eager_probs(run, texts)
    st = start_server(model=artifact, backend=backend)
    with NextCharClient(st.address) as c:
        vocab_size = len(c.model_info().vocab)
        preds = c.predict(texts, top_k=vocab_size)
    for exp, pred in zip(expected, preds, strict=True):
        got = np.zeros_like(exp)
        for cp in pred.top:
            got[cp.id] = cp.prob
        assert np.abs(got - exp).max() <= 1e-4


def test_batching_never_changes_an_answer(start_server, tiny_artifact: Path) -> None:
    """Concurrent mixed-length requests merged into shared batches == each text alone."""
    rng = random.Random(0)
    alphabet = "abcdefghij klmnop"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(60)]
    st = start_server(model=tiny_artifact, backend="onnx", max_batch_delay_ms=5)
    with NextCharClient(st.address) as c:
        alone = {t: c.predict([t], top_k=5, per_position=True)[0] for t in texts}
        batches_before = st.server.runtime().batcher.stats.batches
        with ThreadPoolExecutor(16) as pool:
            merged = list(pool.map(lambda t: c.predict([t], top_k=5, per_position=True)[0], texts))
        many = c.predict(texts, top_k=5, per_position=True)
    # Fewer backend calls than requests proves merging happened.
    assert st.server.runtime().batcher.stats.batches - batches_before < len(texts)
    for t, m, k in zip(texts, merged, many, strict=True):
        for got in (m, k):
            a = alone[t]
            assert [x.id for x in got.top] == [x.id for x in a.top]
            assert max(abs(x.prob - y.prob) for x, y in zip(got.top, a.top, strict=True)) <= 1e-5
            assert got.argmax_text == a.argmax_text


def test_batching_off_gives_same_answers(start_server, tiny_artifact: Path) -> None:
    texts = ["abc", "the quick brown fox", "a"]
    st_on = start_server(model=tiny_artifact, backend="onnx")
    st_off = start_server(model=tiny_artifact, backend="onnx", batching=False)
    with NextCharClient(st_on.address) as on, NextCharClient(st_off.address) as off:
        for a, b in zip(on.predict(texts, top_k=3), off.predict(texts, top_k=3), strict=True):
            assert [x.id for x in a.top] == [x.id for x in b.top]
            assert max(abs(x.prob - y.prob) for x, y in zip(a.top, b.top, strict=True)) <= 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_backend_matches_cpu(start_server, hello_artifact: Path, tiny_artifact: Path, backend: str) -> None:
    st = start_server(model=hello_artifact, backend=backend, device="cuda")
    with NextCharClient(st.address) as c:
        assert c.model_info().device == "cuda"
        assert c.predict(["hello"], per_position=True)[0].argmax_text == "ohlol"
    texts = ["abc", "the quick brown fox"]
    gpu = start_server(model=tiny_artifact, backend=backend, device="cuda")
    cpu = start_server(model=tiny_artifact, backend=backend, device="cpu")
    with NextCharClient(gpu.address) as g, NextCharClient(cpu.address) as c:
        for a, b in zip(g.predict(texts, top_k=5), c.predict(texts, top_k=5), strict=True):
            # The same characters in the same order (close probabilities alone would pass a
            # GPU answer for another text's row or another character's index).
            assert [x.id for x in a.top] == [x.id for x in b.top]
            assert max(abs(x.prob - y.prob) for x, y in zip(a.top, b.top, strict=True)) <= 1e-4
