"""KServe V2 / Open Inference Protocol (`inference.GRPCInferenceService`) on the nextchar port:
V2 tensors in (kserve_codec.py) -> the data plane, with the same validation, batcher and
priorities as nextchar.v1 -> V2 tensors out. Also Triton's model-repository and statistics
and model-configuration RPCs, so tritonclient's `get_model_repository_index`, `load_model`,
`unload_model`, `get_inference_statistics` and `get_model_config` work.

A model's KServe name is its registry name (the repository folder, or `--model`'s manifest
name); its version the repository folder (ListModels). Readiness is the data plane's, so every
protocol turns ready and unready together.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf import json_format

from nextchar import __version__
from nextchar.kserve import grpc_predict_v2_pb2 as pb
from nextchar.kserve import grpc_predict_v2_pb2_grpc as pb_grpc

from ..dataplane import DataPlane, PredictCall
from ..errors import InvalidInput, NotFound, ServingError
from ..registry import ModelState
from ..v2_config import model_config
from ..v2_stats import model_statistics
from ..v2_tensors import deadline_with_timeout, metadata_tensors
from .kserve_codec import (
    decode_inputs,
    encode_response,
    final_response_wanted,
    lane_of,
    mark_final,
    output_tensors,
    requested_outputs,
    timeout_of,
    top_k_of,
)
from .wrapping import deadline_of

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "nextchar"
STREAM_WINDOW = 256  # requests of one ModelStreamInfer stream in flight at once


def _named(name: str) -> str:
    if not name:
        raise InvalidInput("model name is required (ListModels or RepositoryIndex lists them)")
    return name


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.server_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        # Triton answers ready=false, not an error, for a model or version it does not serve:
        # tritonclient's `while not is_model_ready(m)` loops rely on it.
        try:
            ready = self.plane.model_ready(_named(request.name), request.version)
        except NotFound:
            ready = False
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__,
                                         extensions=["model_repository", "statistics",
                                                     "model_configuration", "schedule_policy"])

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        m = self.plane.model(_named(request.name), request.version)
        meta = pb.ModelMetadataResponse.TensorMetadata
        inputs, outputs = metadata_tensors(m.artifact.vocab_size)
        return pb.ModelMetadataResponse(name=m.name, versions=[m.version], platform=m.platform,
                                        inputs=[meta(**t) for t in inputs],
                                        outputs=[meta(**t) for t in outputs])

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        config = model_config(self.plane.model(_named(request.name), request.version))
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, pb.ModelConfig()))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return await self._infer(request, deadline_of(context))

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        name = _named(request.model_name)
        limits = self.plane.model(name, request.model_version).limits
        with self.plane.decoding(name):
            wanted = requested_outputs(request)
            inputs = decode_inputs(request, limits.max_texts_per_request)
            top_k, lane = top_k_of(request.parameters), lane_of(request.parameters)
            deadline = deadline_with_timeout(deadline, timeout_of(request.parameters))
        answer = await self.plane.predict(PredictCall(
            texts=inputs.get("texts"), ids=inputs.get("ids"), lengths=inputs.get("lengths"),
            top_k=top_k, want_probs="probs" in wanted, model=name,
            version=request.model_version, lane=lane, deadline=deadline))
        response = pb.ModelInferResponse(model_name=answer.model, model_version=answer.version,
                                         id=request.id)
        encode_response(response, output_tensors(wanted, answer.results, answer.top_k,
                                                 answer.vocab),
                        raw=bool(request.raw_input_contents))
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream run concurrently (so they batch together); responses come
        back in request order, one per request; a failed request is answered in-band with
        error_message '<STATUS_CODE>: <message>' and the stream goes on."""
        deadline = deadline_of(context)
        window: asyncio.Queue[asyncio.Task[pb.ModelStreamInferResponse] | None] = asyncio.Queue(
            STREAM_WINDOW)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.put(asyncio.ensure_future(self._stream_one(request, deadline)))
            finally:
                await window.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await window.get()) is not None:
                yield await task
            await reader  # surfaces a failed read (an undecodable frame: INVALID_ARGUMENT)
        finally:
            reader.cancel()
            while not window.empty():
                leftover = window.get_nowait()
                if leftover is not None:
                    leftover.cancel()

    async def _stream_one(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelStreamInferResponse:
        try:
            final = final_response_wanted(request.parameters)
            response = await self._infer(request, deadline)
            if final:
                mark_final(response)
            return pb.ModelStreamInferResponse(infer_response=response)
        except ServingError as e:
            message = f"{e.code.name}: {e.message}"
        except Exception:
            log.exception("unhandled error in ModelStreamInfer")
            message = "INTERNAL: internal server error (logged on the server)"
        echo = pb.ModelInferResponse(model_name=request.model_name,
                                     model_version=request.model_version, id=request.id)
        if final_response_wanted(request.parameters, strict=False):
            mark_final(echo)
        return pb.ModelStreamInferResponse(error_message=message, infer_response=echo)

    # -- Triton's statistics and repository extensions ---------------------------------------
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        doc = model_statistics(self.plane, request.name, request.version)
        return json_format.ParseDict(doc, pb.ModelStatisticsResponse())

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse.ModelIndex
        models = [m for m in self.plane.list_models()
                  if not request.ready or m.state is ModelState.READY]
        return pb.RepositoryIndexResponse(models=[
            index(name=m.name, version=m.version, state=m.state.value, reason=m.reason)
            for m in models])

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        if request.parameters:
            raise InvalidInput("load parameters (config overrides, files) are not supported: "
                               "put settings in the model's config.json")
        await self.plane.load_model(_named(request.model_name))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await self.plane.unload_model(_named(request.model_name))
        return pb.RepositoryModelUnloadResponse()


def add_kserve_to_server(plane: DataPlane, server: grpc.aio.Server) -> KServeServicer:
    """Registers inference.GRPCInferenceService beside nextchar.v1 on the same server."""
    servicer = KServeServicer(plane)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return servicer
