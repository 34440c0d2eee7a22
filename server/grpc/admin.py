"""nextchar.v1.Admin: operator actions (admin.proto) -> data plane. Auth is wrapping.py's job
(and, with auth off, admin calls are answered only to loopback peers: security.py).

    nextchar reload --server 127.0.0.1:50051 --token "$NEXTCHAR_TOKEN"
    nextchar load tiny-gru | nextchar unload tiny-gru
"""

from __future__ import annotations

import grpc

from nextchar.v1 import admin_pb2 as pb
from nextchar.v1 import admin_pb2_grpc as pb_grpc

from ..dataplane import DataPlane


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def ReloadModel(
        self, request: pb.ReloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadModelResponse:
        o = await self.plane.reload_model(request.model)
        return pb.ReloadModelResponse(reloaded=o.loaded, previous_version=o.previous_version,
                                      version=o.version, artifact_sha256=o.artifact_sha256,
                                      reason=o.reason, model=o.model)

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadModelResponse:
        o = await self.plane.load_model(request.model)
        return pb.LoadModelResponse(model=o.model, version=o.version,
                                    artifact_sha256=o.artifact_sha256)

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        version = await self.plane.unload_model(request.model)
        return pb.UnloadModelResponse(model=request.model, version=version)
