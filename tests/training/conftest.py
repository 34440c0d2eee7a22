"""Shared fixtures for the training tests: a private cache folder, a tiny text corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_TEXT = {
    "a.txt": "To be, or not to be, that is the question:\n"
             "Whether 'tis nobler in the mind to suffer\n" * 6,
    "sub/b.txt": "Now is the winter of our discontent\nMade glorious summer by this sun.\n" * 6,
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """No test reads or writes the user's ~/.cache/nextchar."""
    monkeypatch.setenv("NEXTCHAR_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster and shares the CPU better
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    for name, text in TINY_TEXT.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / ".hidden").write_text("\x00 never read \x00", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def hello_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The hello preset trained once per session: (run folder, train_hello's result). Tests
    only read the folder."""
    from nextchar.training.train import train_hello

    run = tmp_path_factory.mktemp("hello") / "run"
    return run, train_hello(run, quiet=True)

