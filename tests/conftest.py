"""Fixture chain: settings -> artifact -> server on 127.0.0.1:0 (own thread, own loop) -> client.

Artifacts are built once per session from random-init tiny models through the same export code
users run (`nextchar.training.export`), so the server is always tested on real exported files.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

TINY_VOCAB = "\n !',.?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

# The HTTP front end's default port is 8000: every server a test starts (in-process, or a
# `nextchar serve` subprocess, which inherits this) picks a free one instead, so tests never
# collide with each other or with a server someone runs on this machine. A test that needs HTTP
# off passes --no-http (http=False).
os.environ.setdefault("NEXTCHAR_HTTP_PORT", "0")


def _cuda_device() -> bool:
    """A CUDA device on this machine, whatever torch was built for (the CPU torch wheel says no)."""
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except ImportError:
        pass
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def cuda_backends() -> dict[str, str]:
    """backend -> why it cannot run on CUDA here; a backend absent from the result can.
    torchscript needs a CUDA build of torch; onnx needs onnxruntime-gpu (its
    CUDAExecutionProvider), which no extra installs: `make gpu-venv` builds .venv-gpu with it."""
    missing: dict[str, str] = {}
    try:
        import torch

        if not torch.cuda.is_available():
            missing["torchscript"] = f"torch {torch.__version__} sees no CUDA device"
    except ImportError:
        missing["torchscript"] = "no torch"
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            missing["onnx"] = (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                               "(onnxruntime-gpu: make gpu-venv)")
        elif not _cuda_device():
            missing["onnx"] = "no CUDA device"
    except ImportError:
        missing["onnx"] = "no onnxruntime"
    return missing


@pytest.fixture(scope="session")
def cuda_missing() -> dict[str, str]:
    return cuda_backends()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`cuda` tests run per backend: a test parametrized by `backend` skips only the backends
    that cannot run on CUDA here; one without that parameter needs both."""
    if not any("cuda" in item.keywords for item in items):
        return
    missing = cuda_backends()
    for item in items:
        if "cuda" not in item.keywords:
            continue
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("backend") if callspec is not None else None
        why = ([missing[backend]] if backend in missing else []) if backend else list(missing.values())
        if why:
            item.add_marker(pytest.mark.skip(
                reason=f"needs CUDA: {'; '.join(why)} (scripts/gpu_check.sh on a GPU machine)"))


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
    """A real NextCharServer on its own event loop thread; `address` is 127.0.0.1:<port>.

    Exiting (or a start that fails) stops the server, then shuts down the loop's default
    executor (asyncio.to_thread's threads), stops the thread and closes the loop (its selector
    and self-pipe): no thread or file descriptor outlives it. Exiting twice is a no-op."""

    def __init__(self, **settings: Any) -> None:
        from nextchar.server.settings import ServerSettings

        settings.setdefault("host", "127.0.0.1")
        settings.setdefault("port", 0)
        self.settings = ServerSettings(**settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._exited = False
        self.server: Any = None
        self.port = 0

    def __enter__(self) -> ServerThread:
        from nextchar.server.app import NextCharServer

        try:
            self._thread.start()
            self.server = NextCharServer(self.settings)
            self.port = self.call(self.server.start())
        except BaseException:
            with suppress(Exception):  # the start's own error is the one to see
                self.__exit__(None, None, None)
            raise
        http_port = self.server.http_port
        self.http_url = None if http_port is None else f"http://127.0.0.1:{http_port}"
        return self

    def call(self, coro: Any, timeout_s: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        if self._exited:
            return
        self._exited = True
        running = self._thread.is_alive()
        try:
            if running and self.server is not None:
                self.call(self.server.stop(grace_s=1.0))
        finally:
            try:
                if running:
                    self.call(self.loop.shutdown_default_executor(), timeout_s=30)
            finally:
                if running:
                    self.loop.call_soon_threadsafe(self.loop.stop)
                    self._thread.join(10)
                if not self._thread.is_alive():
                    self.loop.close()


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerThread]]:
    """start_server(model=path, backend='onnx', ...) -> a started ServerThread, stopped after
    (each one, even when another's stop fails; one whose start failed cleaned up itself)."""
    with ExitStack() as stack:
        def start(**settings: Any) -> ServerThread:
            st = ServerThread(**settings)
            stack.push(st.__exit__)  # before the start: nothing it made outlives the test
            return st.__enter__()

        yield start


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


class ServerProcess:
    """`nextchar serve` as a subprocess in its own session, started with `--port 0`.

    stderr goes to a file (`log()`), so a chatty server never blocks on a full pipe; `address`
    is read from the "nextchar serving on HOST:PORT" line printed once SERVING, `http_url` from
    the "nextchar http on URL" line after it (and after the metrics URL, with --metrics-port).
    """

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        import os
        import subprocess
        import sys

        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nextchar", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=self._log, text=True, start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        try:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            if not line.startswith("nextchar serving on "):
                raise RuntimeError(f"server did not start: {line!r}\n{self.log()}")
            self.address = line.rsplit(" ", 1)[1].strip()
            self.metrics_url: str | None = None
            if any(a.startswith("--metrics-port") for a in args):
                self.metrics_url = self.proc.stdout.readline().rsplit(" ", 1)[1].strip()
            # "nextchar http on http://HOST:PORT" follows, unless HTTP is off.
            self.http_url: str | None = None
            if "--no-http" not in args and (env or {}).get("NEXTCHAR_HTTP", "1").lower() not in (
                    "0", "false"):
                self.http_url = self.proc.stdout.readline().rsplit(" ", 1)[1].strip()
        except BaseException:  # a start that fails leaves no process, pipe or open log behind
            self.close()
            raise

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def rss_kib(self) -> int:
        """The server's resident set size (VmRSS), KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def close(self) -> None:
        """Kills the server if it still runs; closes its stdout pipe and the log. Idempotent."""
        try:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._log.close()


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """server_process(args, env=None) -> a started ServerProcess, killed after the test if alive."""
    count = 0
    with ExitStack() as stack:  # every one closed, even when another's close fails
        def start(args: list[str], env: dict[str, str] | None = None) -> ServerProcess:
            nonlocal count
            count += 1  # a start that fails closes itself (ServerProcess.__init__)
            sp = ServerProcess(args, tmp_path / f"server-{count - 1}.log", env)
            stack.callback(sp.close)
            return sp

        yield start
