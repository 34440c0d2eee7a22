"""uvicorn on the event loop the gRPC server already runs on: no second process, no thread.

    http = HttpServer(app, settings)
    port = await http.start()     # bound and accepting; returns the port (0 picks one)
    await http.stop()             # after the drain: closes idle keep-alive connections

uvicorn's own signal handlers are never installed (its `serve()` would replace the ones
server/cli.py set for the drain): start() calls its startup() and main_loop() directly.
TLS and mutual TLS come from the same settings as gRPC (--tls-cert/--tls-key/--tls-client-ca/
--tls-require-client-cert), already checked by security.server_credentials.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

import uvicorn

from ..settings import ServerSettings, host_port

log = logging.getLogger(__name__)

FLUSH_S = 1  # after the drain, what uvicorn gives responses still on the wire before cancelling
CANCELLED = "an HTTP call still running when the server stopped was cancelled"


class CancelledCallFilter(logging.Filter):
    """uvicorn logs a call whose task a stop cancelled (the drain's grace over, a forced stop)
    as "Exception in ASGI application" at ERROR with the CancelledError's traceback. That end
    is expected and the drain already logs why: one INFO line instead, so an operator's error
    alerts do not fire on every rollout."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, asyncio.CancelledError):
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            record.msg, record.args = CANCELLED, None
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_cancellations() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, CancelledCallFilter) for f in logger.filters):
        logger.addFilter(CancelledCallFilter())


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0 picks one), so the bound port is known before
    uvicorn starts and a taken port fails here with OSError, in one line."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot bind HTTP {host_port(host, port)}: {e.strerror} (another server? pick "
                      f"another --http-port, 0 picks a free one, or --no-http)") from e
    return sock


class HttpServer:
    def __init__(self, app: Any, settings: ServerSettings) -> None:
        s = settings
        tls: dict[str, Any] = {}
        if s.tls_cert is not None:
            tls = {"ssl_certfile": str(s.tls_cert), "ssl_keyfile": str(s.tls_key)}
            if s.tls_client_ca is not None:  # with --tls-require-client-cert (security.py)
                tls["ssl_ca_certs"] = str(s.tls_client_ca)
                tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        self.tls = bool(tls)
        self.config = uvicorn.Config(
            app, host=s.host, port=s.http_port, lifespan="off", log_config=None,
            access_log=False,  # the call layer writes nextchar's own access log
            # The socket's peer, never X-Forwarded-For: the loopback-only model control
            # (v2.py) must not be opened by a header (uvicorn trusts it from FORWARDED_ALLOW_IPS).
            proxy_headers=False,
            server_header=False, timeout_graceful_shutdown=FLUSH_S, **tls)
        self._server = uvicorn.Server(self.config)
        _quiet_cancellations()
        self._main: asyncio.Task[None] | None = None
        self._stopping: asyncio.Future[None] | None = None
        self._sock: socket.socket | None = None
        self.port: int | None = None

    async def start(self) -> int:
        self._sock = _bind(self.config.host, self.config.port)
        self.port = self._sock.getsockname()[1]
        server = self._server
        self.config.load()
        server.lifespan = self.config.lifespan_class(self.config)
        await server.startup(sockets=[self._sock])
        self._main = asyncio.get_running_loop().create_task(server.main_loop())
        return self.port

    def cancel_calls(self) -> None:
        """A forced stop: HTTP calls still running are cancelled (their streams end)."""
        self._server.force_exit = True
        for task in list(self._server.server_state.tasks):
            task.cancel()

    async def stop(self) -> None:
        """Stops accepting and closes connections (answers still on the wire get FLUSH_S).
        A second call waits for the first."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        if self._main is None:
            if self._sock is not None:
                self._sock.close()
            return
        self._server.should_exit = True
        await self._main
        await self._server.shutdown(sockets=[self._sock] if self._sock is not None else None)
