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

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from nextchar.v1 import nextchar_pb2, nextchar_pb2_grpc

from . import kserve
from .artifact import MODEL_FILES, load_artifact
from .backends import create_backend
from .batcher import Batcher
from .interceptors import ErrorMappingInterceptor
from .predictor import Limits, Predictor
from .servicer import NextCharServicer
from .settings import ServerSettings

log = logging.getLogger(__name__)

SERVICE_NAME = nextchar_pb2.DESCRIPTOR.services_by_name["NextChar"].full_name


class NextCharServer:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self.health = HealthServicer()

    async def start(self) -> int:
        s = self.settings
        artifact = load_artifact(s.model, backends=(s.backend,))
        backend = create_backend(artifact, s.backend, s.device, s.backend_workers, s.intra_op_threads)
        self.batcher = Batcher(
            backend,
            batching=s.batching,
            max_batch_size=s.max_batch_size,
            max_batch_chars=s.max_batch_chars,
            max_batch_delay_ms=s.max_batch_delay_ms,
            max_queue_texts=s.max_queue_texts,
        )
        self.predictor = Predictor(artifact, backend, self.batcher, Limits.from_settings(s))
        self.servicer = NextCharServicer(self.predictor, backend.name, backend.device)

        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),  # two servers must not silently share a port
        ]
        server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()], options=options)
        nextchar_pb2_grpc.add_NextCharServicer_to_server(self.servicer, server)
        self.kserve = kserve.add_kserve_to_server(self.servicer, server)  # same port
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             kserve.SERVICE_NAME, reflection.SERVICE_NAME],
            server,
        )
        address = f"{s.host}:{s.port}"
        self.port = server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot bind {address}")
        self._server = server
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        log.info("listening on %s:%d; loading %s (%s) on %s", s.host, self.port, artifact.path,
                 MODEL_FILES[backend.name], backend.device)
        await self.batcher.start(warmup=s.warmup)
        self.servicer.ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING %s version %s (sha256 %s…)", artifact.name, artifact.version,
                 artifact.sha256[:12])
        return self.port

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def wait(self) -> None:
        await self._stopped.wait()

    async def stop(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING at once, refuse new work, let accepted work finish within grace."""
        grace = self.settings.grace_s if grace_s is None else grace_s
        if self._server is None:
            self._stopped.set()
            return
        if hasattr(self, "servicer"):
            self.servicer.ready = False
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)
        await self.batcher.close()
        self._stopped.set()
        log.info("stopped")
