"""Fixture chain: settings -> artifact -> server on 127.0.0.1:0 (own thread, own loop) -> client.

Artifacts are built once per session from random-init tiny models through the same export code
users run (`nextchar.training.export`), so the server is always tested on real exported files.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

TINY_VOCAB = "\n !',.?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nextchar.training.export import build_random_artifact

    return build_random_artifact(tmp_path_factory.mktemp("art") / "tiny", vocab=TINY_VOCAB,
                                 cell="rnn", embed_dim=8, hidden_size=16, num_layers=2, seed=0)


@pytest.fixture(scope="session")
def tiny_lstm_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nextchar.training.export import build_random_artifact

    return build_random_artifact(tmp_path_factory.mktemp("art") / "tiny-lstm", vocab=TINY_VOCAB,
                                 cell="lstm", embed_dim=8, hidden_size=16, num_layers=2, seed=1)


@pytest.fixture(scope="session")
def hello_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed's embedding model trained on hello -> ohlol, exported."""
    from nextchar.training.export import export_artifact
    from nextchar.training.train import train_hello

    run = tmp_path_factory.mktemp("hello") / "run"
    train_hello(run, quiet=True)
    return export_artifact(run, run.parent / "artifact")


class ServerThread:
    """A real NextCharServer on its own event loop thread; `address` is 127.0.0.1:<port>."""

    def __init__(self, **settings: Any) -> None:
        from nextchar.server.settings import ServerSettings

        settings.setdefault("host", "127.0.0.1")
        settings.setdefault("port", 0)
        self.settings = ServerSettings(**settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: Any = None
        self.port = 0

    def __enter__(self) -> ServerThread:
        from nextchar.server.app import NextCharServer

        self._thread.start()
        self.server = NextCharServer(self.settings)
        self.port = self.call(self.server.start())
        return self

    def call(self, coro: Any, timeout_s: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.server.stop(grace_s=1.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerThread]]:
    """start_server(model=path, backend='onnx', ...) -> a started ServerThread, stopped after."""
    started: list[ServerThread] = []

    def start(**settings: Any) -> ServerThread:
        st = ServerThread(**settings).__enter__()
        started.append(st)
        return st

    yield start
    for st in reversed(started):
        st.__exit__(None, None, None)


@pytest.fixture(scope="module")
def tiny_server(tiny_artifact: Path) -> Iterator[ServerThread]:
    with ServerThread(model=tiny_artifact, backend="onnx") as st:
        yield st


@pytest.fixture
def client(tiny_server: ServerThread) -> Iterator[Any]:
    from nextchar.client import NextCharClient

    with NextCharClient(tiny_server.address, timeout_s=30) as c:
        yield c


@contextmanager
def serving(**settings: Any) -> Iterator[ServerThread]:
    with ServerThread(**settings) as st:
        yield st
