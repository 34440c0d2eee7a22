"""Builds and runs the server: artifact -> backend -> batcher -> gRPC services on one port.

    server = NextCharServer(ServerSettings(model=Path("artifacts/demo"), port=0))
    port = await server.start()      # returns once SERVING; raises on a bad artifact
    await server.wait()              # until stop()
    await server.stop(grace_s=5)     # NOT_SERVING first, then drain

Start-up order: the artifact is verified and the backend created before the port opens (a bad
artifact fails fast); the port then answers health NOT_SERVING and Predict UNAVAILABLE until the
warm-up finished.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer as AioReflectionServicer

from nextchar.v1 import admin_pb2, admin_pb2_grpc, nextchar_pb2, nextchar_pb2_grpc

from . import kserve
from .admin import AdminServicer
from .artifact import MODEL_FILES, Artifact
from .backends import Backend
from .batcher import Batcher
from .errors import ArtifactError
from .generator import Generator
from .interceptors import Auth, CallWrapper, WrappingServer
from .metrics import Metrics
from .predictor import Limits, Predictor
from .reload import LoadedModel, Reloader, ReloadFailed
from .security import load_tokens, open_method, server_credentials, warn_if_exposed
from .servicer import NextCharServicer
from .settings import ServerSettings
from .telemetry import CallTracker, DrainGate, Telemetry

log = logging.getLogger(__name__)

SERVICE_NAME = nextchar_pb2.DESCRIPTOR.services_by_name["NextChar"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
FLUSH_S = 1.0


class NextCharServer:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Task[None] | None = None
        self._stop_now = asyncio.Event()
        self.health = HealthServicer()
        self.metrics = Metrics()
        self.metrics_port: int | None = None
        self.tracker = CallTracker()  # accepted calls: drain and reload wait on them
        self.gate = DrainGate()
        self.model: LoadedModel | None = None
        self._old_models: set[LoadedModel] = set()  # replaced by a reload, calls still running
        self._retiring: set[asyncio.Task[None]] = set()
        self._reload_tasks: set[asyncio.Task[None]] = set()
        self.reloader = Reloader(settings, self._assemble, self._swap, lambda: self.model,
                                 self.metrics)

    def _assemble(self, artifact: Artifact, backend: Backend) -> LoadedModel:
        """One version's batcher, predictor and generator (not started)."""
        s = self.settings
        batcher = Batcher(
            backend,
            batching=s.batching,
            max_batch_size=s.max_batch_size,
            max_batch_chars=s.max_batch_chars,
            max_batch_delay_ms=s.max_batch_delay_ms,
            max_queue_texts=s.max_queue_texts,
            parallel_batch_chars=s.parallel_batch_chars,
            on_batch=self.metrics.observe_batch,
            on_batch_start=self.metrics.observe_queue_waits,
        )
        predictor = Predictor(artifact, backend, batcher, Limits.from_settings(s))
        return LoadedModel(predictor, Generator(predictor, step_batching=s.step_batching,
                                                  flush_ms=s.generate_flush_ms))

    def _use(self, model: LoadedModel) -> None:
        """Points every reader at `model` in one step (no await in between)."""
        self.model = model
        self.predictor = model.predictor
        self.batcher = model.predictor.batcher
        # Generate streams: the active-stream count is self.generator.active_streams.
        self.generator = model.generator
        if hasattr(self, "servicer"):
            self.servicer.predictor = model.predictor
            self.servicer.generator = model.generator
        a, b = model.artifact, model.predictor.backend
        self.metrics.set_model(a.name, a.version, a.sha256, b.name, b.device)

    async def _swap(self, model: LoadedModel) -> None:
        """Hot reload: new calls get `model`; the old version closes once its calls ended."""
        old = self.model
        self._use(model)
        if old is not None:
            self._old_models.add(old)
            task = asyncio.create_task(self._retire(old, self.tracker.next_seq))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, old: LoadedModel, swap_seq: int) -> None:
        await self.tracker.wait_begun_before(swap_seq)
        self._old_models.discard(old)
        await old.close()
        log.info("version %s closed (its last call finished)", old.artifact.version)

    @property
    def old_versions(self) -> list[str]:
        """Versions replaced by a reload whose calls are still running."""
        return sorted(m.artifact.version for m in self._old_models)

    def _active_streams(self) -> int:
        models = [*self._old_models, *([self.model] if self.model is not None else [])]
        return sum(m.generator.active_streams for m in models)

    async def start(self) -> int:
        s = self.settings
        credentials = server_credentials(s)  # settings errors first, before any model work
        tokens = load_tokens(s)
        artifact, backend = self.reloader.open_initial()  # a bad artifact fails before the port opens
        model = self._assemble(artifact, backend)
        self._use(model)
        self.servicer = NextCharServicer(self.predictor, backend.name, backend.device,
                                         generator=self.generator)
        self.metrics.track_queue_depth(lambda: self.batcher.queue_depth)
        self.metrics.track_active_streams(self._active_streams)

        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),  # two servers must not silently share a port
            # BDP probing sends PINGs as data arrives, to grow flow-control windows; our
            # messages are small. Off measured +5-15 % calls/s once, no difference later
            # (docs/benchmarks.md, peer benchmark); every recorded benchmark ran with it off.
            ("grpc.http2.bdp_probe", int(s.http2_bdp_probe)),
        ]
        server = grpc.aio.server(options=options)
        # Every handler registered through `registry` gets telemetry, auth and error mapping,
        # wrapped once here rather than by interceptors on every call (interceptors.py).
        auth = None if tokens is None else Auth(tokens.accepts, lambda m: open_method(m, s))
        wrapper = CallWrapper(Telemetry(self.tracker, self.gate, self.metrics), auth)
        registry: Any = WrappingServer(server, wrapper)
        nextchar_pb2_grpc.add_NextCharServicer_to_server(self.servicer, registry)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self.reloader), registry)
        self.kserve = kserve.add_kserve_to_server(self.servicer, registry)  # same port
        health_pb2_grpc.add_HealthServicer_to_server(self.health, registry)
        # What reflection.enable_server_reflection does for a grpc.aio server (it picks the
        # servicer by the server's type, which `registry` is not).
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(AioReflectionServicer(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             kserve.SERVICE_NAME, ADMIN_SERVICE_NAME, reflection.SERVICE_NAME]), registry)
        address = f"{s.host}:{s.port}"
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        if not self.port:
            raise OSError(f"cannot bind {address}")
        warn_if_exposed(s, credentials is not None, tokens)
        self._server = server
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        log.info("listening on %s:%d (%s, %s event loop); loading %s (%s) on %s", s.host,
                 self.port, "TLS" if credentials else "plaintext",
                 type(asyncio.get_running_loop()).__module__.split(".")[0], artifact.path,
                 MODEL_FILES[backend.name], backend.device)
        if s.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(s.host, s.metrics_port)
        await self.batcher.start(warmup=s.warmup)
        await self.generator.start()
        try:  # the reference answer the next version's parity check compares against
            await self.reloader.check(model, None)
        except ReloadFailed as e:
            raise ArtifactError(f"{artifact.path}: {e.message}") from e
        if self._stopping is not None:  # stop() began during start-up: stay NOT_SERVING
            return self.port
        self.servicer.ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING %s version %s (sha256 %s…)", artifact.name, artifact.version,
                 artifact.sha256[:12])
        self.reloader.start_polling()
        return self.port

    def request_reload(self, reason: str) -> None:
        """SIGHUP: check for a new version in the background (failures are logged and counted)."""
        if self._stopping is not None or self.model is None:
            return

        async def run() -> None:
            try:
                await self.reloader.reload(retry_failed=True, reason=reason)
            except ReloadFailed:
                pass

        task = asyncio.create_task(run())
        self._reload_tasks.add(task)
        task.add_done_callback(self._reload_tasks.discard)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def wait(self) -> None:
        await self._stopped.wait()

    async def stop(self, grace_s: float | None = None, prestop_s: float | None = None) -> None:
        """Drains; a second call waits for the first.

        1. health NOT_SERVING at once (probes and load balancers see it);
        2. keep serving for `prestop_s` (default settings.prestop_s) while they notice;
        3. refuse new work with UNAVAILABLE; accepted calls (streams included) get until
           `grace_s` (default settings.grace_s, counted from step 3) to finish;
        4. streams still open then end with UNAVAILABLE; the transport closes; models close.
        """
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._drain(
                self.settings.grace_s if grace_s is None else grace_s,
                self.settings.prestop_s if prestop_s is None else prestop_s))
        await asyncio.shield(self._stopping)

    async def stop_now(self) -> None:
        """A second SIGTERM/SIGINT: skip what is left of the pre-stop wait and the grace."""
        self._stop_now.set()
        self.gate.closed = True
        self.gate.streams_must_end = True
        if self._server is not None:
            await self._server.stop(0)
        await self.stop()

    async def _drain(self, grace_s: float, prestop_s: float) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.metrics.draining.set(1)
        await self.health.enter_graceful_shutdown()
        await self.reloader.stop_polling()
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
        if hasattr(self, "servicer"):
            self.servicer.ready = False
        accepted = self.tracker.count
        deadline = loop.time() + grace_s
        finished = await self.tracker.wait_idle(grace_s)
        if not finished:
            # Streams end at their next message with UNAVAILABLE; the rest is cancelled below.
            self.gate.streams_must_end = True
            await self.tracker.wait_idle(0.5)
            log.warning("draining: %d call(s) still running after grace %.1fs; cancelling them",
                        self.tracker.count, grace_s)
        # Answers already computed still need a moment to reach the wire; other calls (health
        # Watch streams, refused calls) are cancelled after it.
        await self._server.stop(min(FLUSH_S, max(0.0, deadline - loop.time())) if finished else 0)
        tasks = [*self._reload_tasks, *self._retiring]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for model in [*self._old_models, *([self.model] if self.model is not None else [])]:
            await model.close()
        self._old_models.clear()
        self.metrics.close()
        log.info("stopped: %d call(s) were in flight at the drain, %s; %.2fs since the signal",
                 accepted, "all finished" if finished else "grace exceeded",
                 loop.time() - started)
        self._stopped.set()
