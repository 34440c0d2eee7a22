"""nextchar.v1.Admin servicer: operator actions (admin.proto). Auth is interceptors.py's job.

    nextchar reload --server 127.0.0.1:50051 --token "$NEXTCHAR_TOKEN"
"""

from __future__ import annotations

import grpc

from nextchar.v1 import admin_pb2 as pb
from nextchar.v1 import admin_pb2_grpc as pb_grpc

from .reload import Reloader


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, reloader: Reloader) -> None:
        self.reloader = reloader

    async def ReloadModel(
        self, request: pb.ReloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadModelResponse:
        outcome = await self.reloader.reload(retry_failed=True, reason="Admin.ReloadModel")
        return pb.ReloadModelResponse(
            reloaded=outcome.reloaded,
            previous_version=outcome.previous_version,
            version=outcome.version,
            artifact_sha256=outcome.artifact_sha256,
        )
