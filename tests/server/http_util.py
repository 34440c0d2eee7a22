"""A tiny stdlib HTTP client for the HTTP front-end tests: JSON in and out, SSE events."""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[Any]:
        """SSE `data:` payloads, parsed ("[DONE]" kept as the string)."""
        out: list[Any] = []
        for block in self.body.decode().split("\n\n"):
            if block.startswith("data: "):
                data = block[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
        return out


def call(url: str, method: str, path: str, body: Any = None,
         headers: dict[str, str | None] | None = None,
         raw: bytes | None = None, context: ssl.SSLContext | None = None,
         timeout_s: float = 30) -> Reply:
    parts = urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    kw: dict[str, Any] = {"context": context} if parts.scheme == "https" else {}
    conn = cls(parts.hostname, parts.port, timeout=timeout_s, **kw)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        # A header given as None is not sent (a request without any Content-Type).
        h = {k: v for k, v in {"content-type": "application/json", **(headers or {})}.items()
             if v is not None}
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def root_conftest() -> Any:
    """tests/conftest.py as pytest loaded it (a bare `import conftest` may find another
    folder's in a full run)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = str(Path(__file__).resolve().parents[1] / "conftest.py")
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) == path:
            return module
    # In a full run sys.modules["conftest"] may be another folder's conftest by now: load this
    # file once more under its own name (its classes are what the tests need, not its fixtures).
    name = "nextchar_tests_root_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class Connection:
    """One keep-alive connection, reopened after the server closes it (e.g. after a 413)."""

    def __init__(self, url: str, timeout_s: float = 60) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.timeout_s = parts.hostname, parts.port, timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port,
                                                        timeout=self.timeout_s)
            try:
                self._conn.request(method, path, body=body, headers=headers or {})
                r = self._conn.getresponse()
                reply = Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
                if r.will_close:
                    self.close()
                return reply
            except (http.client.RemoteDisconnected, ConnectionError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
