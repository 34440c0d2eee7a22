"""Lifecycle only: build the serving core (registry + data plane), put the front ends on it,
start, wait, stop.

    server = NextCharServer(ServerSettings(model=Path("runs/demo/artifact"), port=0))
    port = await server.start()      # returns once SERVING; raises on a bad --model artifact
    await server.wait()              # until stop()
    await server.stop(grace_s=5)     # NOT_SERVING first, then drain

Start-up order: artifacts are verified and backends created before the port opens (a bad
`--model` fails fast; a bad repository model is FAILED and the others serve); the port then
answers health NOT_SERVING and calls UNAVAILABLE until every model is warm and probed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer as AioReflectionServicer

from nextchar.v1 import admin_pb2, admin_pb2_grpc, nextchar_pb2, nextchar_pb2_grpc

from .dataplane import DataPlane
from .grpc import kserve
from .grpc.admin import AdminServicer
from .grpc.nextchar_v1 import NextCharServicer
from .grpc.wrapping import Auth, CallWrapper, WrappingServer
from .metrics import Metrics
from .registry import ModelRegistry
from .runtime import ModelRuntime
from .security import (
    SecurityConfigError,
    load_tokens,
    open_method,
    server_credentials,
    warn_if_exposed,
)
from .settings import ServerSettings, host_port
from .telemetry import CallTracker, DrainGate, Telemetry

if TYPE_CHECKING:
    from .tracing import Tracing

log = logging.getLogger(__name__)

SERVICE_NAME = nextchar_pb2.DESCRIPTOR.services_by_name["NextChar"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
# Health names a status for the server ("") and for every service it registers, so a probe
# that names one (Kubernetes `grpc: {service: ...}`) gets SERVING/NOT_SERVING, not NOT_FOUND.
HEALTH_SERVICE_NAMES = ("", SERVICE_NAME, ADMIN_SERVICE_NAME, kserve.SERVICE_NAME)
FLUSH_S = 1.0
ENDING_S = 0.5  # a drain's end: for streams to send their last message, then for the rest


class NextCharServer:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Task[None] | None = None
        self._stop_now = asyncio.Event()
        self._forced: int | None = None  # calls still running at a second signal
        self.health = HealthServicer()
        # Counted only when exported: with --metrics-port unset nobody can read them, and every
        # call would still pay for its counters and histograms (py-spy: ~3 % of the event
        # loop's samples at c=64; 1.00-1.03x calls/s measured, docs/benchmarks.md).
        self.metrics = Metrics() if settings.metrics_port is not None else None
        self.metrics_port: int | None = None
        self.http_port: int | None = None  # the HTTP front end's (server/http/), when on
        self._http: Any = None
        self.tracker = CallTracker()  # accepted calls: drain waits on them
        self.gate = DrainGate()
        self.tracing = _tracing(settings)  # None unless --otel
        self.registry = ModelRegistry(settings, self.metrics, self.tracing)
        self.plane = DataPlane(self.registry)
        if self.metrics is not None:
            self.metrics.track_runtimes(self.registry.runtimes)
        self._reload_tasks: set[asyncio.Task[None]] = set()

    def runtime(self, model: str = "") -> ModelRuntime:
        """The version of `model` (empty: the default) served now: for tests and tools."""
        rt = self.registry.slot(model).current
        if rt is None:
            raise LookupError(f"model {model or self.registry.default_name!r} is not loaded")
        return rt

    @property
    def old_versions(self) -> list[str]:
        """Versions replaced or unloaded whose calls are still running."""
        return self.registry.old_versions

    async def start(self) -> int:
        s = self.settings
        credentials = server_credentials(s)  # settings errors first, before any model work
        tokens = load_tokens(s)
        self.registry.open()  # a bad --model artifact fails here, before the port opens
        self.registry.on_change = self._readiness_changed

        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),  # two servers must not silently share a port
            # BDP probing sends PINGs as data arrives, to grow flow-control windows; our
            # messages are small. Off measured +5-15 % calls/s once, no difference later
            # (docs/benchmarks.md, peer benchmark); every recorded benchmark ran with it off.
            ("grpc.http2.bdp_probe", int(s.http2_bdp_probe)),
        ]
        if s.max_connection_age_s > 0:  # gRPC adds up to +-10 % jitter, so clients spread out
            options += [("grpc.max_connection_age_ms", round(s.max_connection_age_s * 1000)),
                        ("grpc.max_connection_age_grace_ms",
                         round(s.max_connection_age_grace_s * 1000))]
        server = grpc.aio.server(options=options)
        # Every handler registered through `wrapped` gets telemetry, auth and error mapping,
        # wrapped once here rather than by interceptors on every call (grpc/wrapping.py).
        auth = None if tokens is None else Auth(tokens.accepts, lambda m: open_method(m, s),
                                                tokens.may_control)
        telemetry = Telemetry(self.tracker, self.gate, self.metrics, self.tracing,  # + HTTP
                              access_log=s.access_log)
        wrapper = CallWrapper(telemetry, auth, admin_loopback_only=tokens is None)
        wrapped: Any = WrappingServer(server, wrapper)
        nextchar_pb2_grpc.add_NextCharServicer_to_server(NextCharServicer(self.plane), wrapped)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self.plane), wrapped)
        kserve.add_kserve_to_server(self.plane, wrapped)  # same port
        health_pb2_grpc.add_HealthServicer_to_server(self.health, wrapped)
        # What reflection.enable_server_reflection does for a grpc.aio server (it picks the
        # servicer by the server's type, which `wrapped` is not).
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(AioReflectionServicer(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             kserve.SERVICE_NAME, ADMIN_SERVICE_NAME, reflection.SERVICE_NAME]), wrapped)
        address = host_port(s.host, s.port)  # gRPC takes IPv6 in brackets only
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        if not self.port:
            raise OSError(f"cannot bind {address}")
        warn_if_exposed(s, credentials is not None, tokens)
        if s.http:
            # Imported here: FastAPI and uvicorn cost start-up time only when HTTP is on.
            from .http.app import build_app
            from .http.server import HttpServer

            self._http = HttpServer(build_app(self.plane, telemetry, tokens, s), s)
            self.http_port = await self._http.start()  # on this loop; answers 503 until ready
            log.info("HTTP on %s (%s): KServe V2 REST, OpenAI /v1, nextchar JSON",
                     host_port(s.host, self.http_port), "TLS" if self._http.tls else "plaintext")
        self._server = server
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        log.info("listening on %s (%s, %s event loop); models: %s", host_port(s.host, self.port),
                 "TLS" if credentials else "plaintext",
                 type(asyncio.get_running_loop()).__module__.split(".")[0],
                 ", ".join(self.registry.slots) or "none")
        if self.metrics is not None and s.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(s.metrics_host, s.metrics_port)
        await self.registry.start()  # warm-up and probe; --model's failure raises here
        if self._stopping is not None:  # stop() began during start-up: stay NOT_SERVING
            return self.port
        self.plane.accepting = True
        await self._sync_health()
        for status in self.plane.list_models():
            log.info("model %s: %s%s%s", status.name, status.state.value,
                     f" version {status.version}" if status.version else "",
                     f" ({status.reason})" if status.reason else "")
        self.registry.start_polling()
        return self.port

    def request_reload(self, reason: str) -> None:
        """SIGHUP: check every model for a new version in the background (failures are logged
        and counted)."""
        if self._stopping is not None or not self.plane.accepting:
            return
        task = asyncio.create_task(self.registry.poll_once(reason=reason))
        self._reload_tasks.add(task)
        task.add_done_callback(self._reload_tasks.discard)

    def _readiness_changed(self) -> None:
        """A model was loaded, unloaded or failed: health follows the data plane's readiness."""
        if self.plane.accepting and self._stopping is None:
            task = asyncio.get_running_loop().create_task(self._sync_health())
            self._reload_tasks.add(task)
            task.add_done_callback(self._reload_tasks.discard)

    async def _sync_health(self) -> None:
        ready = self.plane.server_ready()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING if ready
                               else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in HEALTH_SERVICE_NAMES:
            await self.health.set(name, status)

    async def wait(self) -> None:
        await self._stopped.wait()

    async def stop(self, grace_s: float | None = None, prestop_s: float | None = None) -> None:
        """Drains; a second call waits for the first.

        1. health NOT_SERVING at once (probes and load balancers see it);
        2. keep serving for `prestop_s` (default settings.prestop_s) while they notice;
        3. refuse new work: gRPC sends GOAWAY and closes its listener (a client channel moves
           its calls to another replica, transparently; HTTP answers 503); accepted calls
           (streams included) get until `grace_s` (default settings.grace_s, counted from
           step 3) to finish;
        4. streams still open then end with UNAVAILABLE; the transport closes; models close.
        """
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._drain(
                self.settings.grace_s if grace_s is None else grace_s,
                self.settings.prestop_s if prestop_s is None else prestop_s))
        await asyncio.shield(self._stopping)

    async def stop_now(self) -> None:
        """A second SIGTERM/SIGINT: skip what is left of the pre-stop wait and the grace. The
        calls still running end as at the grace's end, each in its protocol's shape (gRPC
        UNAVAILABLE, an in-band 503 event then [DONE], a JSON 503), within ENDING_S; what is
        left after that is cancelled (uvicorn answers a cancelled HTTP call with a bare 500
        or cuts its stream, which no client can tell from a crash)."""
        self._stop_now.set()
        self.gate.closed = True
        self.plane.accepting = False
        if self._forced is None:
            self._forced = self.tracker.count  # before the loads' callers end below
        await self.registry.cancel_loads()  # a warm-up and probe nobody will use
        await self._end_streams(ENDING_S)
        if self._server is not None:
            await self._server.stop(0)
        if self._http is not None:
            self._http.cancel_calls()
        await self.stop()

    async def _end_streams(self, wait_s: float) -> None:
        """Streams end at their next message with UNAVAILABLE; then the Generate streams that
        sent none meanwhile (a non-streaming HTTP answer, a prompt still queued) fail NotReady,
        which each front end answers in its own shape (UNAVAILABLE, 503) rather than as a
        cancelled call. Waits up to wait_s for each step."""
        self.gate.streams_must_end = True
        if not await self.tracker.wait_idle(wait_s):
            for rt in self.registry.runtimes():
                await rt.generator.close()
            await self.tracker.wait_idle(wait_s)

    async def _drain(self, grace_s: float, prestop_s: float) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        if self.metrics is not None:
            self.metrics.draining.set(1)
        self.gate.draining = True  # HTTP health turns not-ready with gRPC health
        self.plane.draining = True  # and KServe's ServerReady/ModelReady with them
        await self.health.enter_graceful_shutdown()
        await self.registry.stop_polling()
        if self._server is None:
            self._stopped.set()
            return
        if prestop_s > 0 and not self.gate.closed:
            log.info("draining: NOT_SERVING; still serving for %.1fs (pre-stop)", prestop_s)
            try:
                await asyncio.wait_for(self._stop_now.wait(), prestop_s)
            except asyncio.TimeoutError:
                pass
        self.gate.closed = True
        self.plane.accepting = False
        accepted = self.tracker.count
        deadline = loop.time() + grace_s
        # GOAWAY now, not after the accepted calls: a client channel keeps the connections it
        # has (the pod leaving the Service's endpoints changes nothing for it), so refusing its
        # calls one by one would fail them; GOAWAY makes it send them to another replica
        # (gRPC retries a call the server never took, transparently). The accepted calls
        # finish on their connections; the second stop() below ends what is left.
        goaway = asyncio.create_task(self._server.stop(grace_s + FLUSH_S))
        finished = await self.tracker.wait_idle(grace_s)
        if not finished:
            # What is left after this is cancelled below.
            running = self.tracker.count  # counted before they are ended, for the log line
            await self._end_streams(ENDING_S)
            log.warning("draining: %d call(s) still running after grace %.1fs: streams ended "
                        "with UNAVAILABLE, %d left cancelled", running, grace_s,
                        self.tracker.count)
        # Answers already computed still need a moment to reach the wire; other calls (health
        # Watch streams, refused calls) are cancelled after it.
        await self._server.stop(min(FLUSH_S, max(0.0, deadline - loop.time())) if finished else 0)
        await goaway
        if self._http is not None:
            if not finished:
                self._http.cancel_calls()
            await self._http.stop()
        tasks = list(self._reload_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.registry.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # flushes the exporter
        how = ("grace exceeded" if not finished else "all finished" if not self._forced
               else f"{self._forced} ended by a second signal")
        log.info("stopped: %d call(s) were in flight at the drain, %s; %.2fs since the signal",
                 accepted, how, loop.time() - started)
        self._stopped.set()


def _tracing(settings: ServerSettings) -> Tracing | None:
    if not settings.otel:
        return None
    try:
        from .tracing import Tracing
    except ImportError as e:  # pragma: no cover - depends on the install
        raise SecurityConfigError(f"--otel needs OpenTelemetry: pip install 'nextchar[otel]' "
                                  f"({e.name} is missing)") from e
    return Tracing(settings)
