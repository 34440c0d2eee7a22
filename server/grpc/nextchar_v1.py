"""nextchar.v1.NextChar: proto in -> data plane -> proto out. A few lines per RPC."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from nextchar import __version__
from nextchar.v1 import nextchar_pb2 as pb
from nextchar.v1 import nextchar_pb2_grpc as pb_grpc

from ..batcher import HIGH, LOW
from ..dataplane import DataPlane, GenerateCall, ModelStatus, PredictCall
from ..errors import InvalidInput
from ..generator import STOP_MAX_CHARS, STOP_STRING, GenerateParams
from ..registry import ModelState
from .converters import prediction_to_pb
from .wrapping import deadline_of

_STOP_REASONS = {None: pb.STOP_REASON_UNSPECIFIED, STOP_MAX_CHARS: pb.STOP_REASON_MAX_CHARS,
                 STOP_STRING: pb.STOP_REASON_STOP_STRING}
_STATES = {ModelState.READY: pb.MODEL_STATE_READY, ModelState.LOADING: pb.MODEL_STATE_LOADING,
           ModelState.UNAVAILABLE: pb.MODEL_STATE_UNAVAILABLE,
           ModelState.FAILED: pb.MODEL_STATE_FAILED,
           ModelState.UNLOADING: pb.MODEL_STATE_UNLOADING}


def lane_of(priority: int) -> int:
    # proto3 keeps an enum number it does not know; refuse it rather than guess a lane.
    if priority not in pb.Priority.values():
        raise InvalidInput(f"priority must be PRIORITY_UNSPECIFIED (0, the high lane), "
                           f"PRIORITY_HIGH (1) or PRIORITY_LOW (2), got {priority}")
    return LOW if priority == pb.PRIORITY_LOW else HIGH


class NextCharServicer(pb_grpc.NextCharServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        with self.plane.decoding(request.model):  # a refused priority counts as a failure too
            lane = lane_of(request.priority)
        answer = await self.plane.predict(PredictCall(
            texts=list(request.texts), top_k=request.top_k, per_position=request.per_position,
            states=list(request.states), return_state=request.return_state,
            model=request.model, lane=lane, deadline=deadline_of(context)))
        vocab = answer.vocab
        return pb.PredictResponse(predictions=[prediction_to_pb(r, vocab) for r in answer.results],
                                  model_version=answer.version, model_name=answer.model,
                                  artifact_sha256=answer.artifact_sha256)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        session = self.plane.generate(GenerateCall(_generate_params(request), request.model,
                                                   deadline_of(context)))
        # A cancelled or disconnected call frees its slot now, not when this coroutine unwinds.
        context.add_done_callback(lambda _: session.close())  # type: ignore[arg-type]  # grpc-stubs wants its DoneCallback class
        try:
            async for chunk in session.chunks():
                if chunk.stop_reason is None:
                    yield pb.GenerateResponse(text=chunk.text)
                    continue
                yield pb.GenerateResponse(
                    text=chunk.text, stop_reason=_STOP_REASONS[chunk.stop_reason],
                    state=chunk.state, model_version=session.version, model_name=session.model)
        finally:
            session.close()

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        m = self.plane.model(request.model)
        a, lim, cfg = m.artifact, m.limits, m.artifact.model_config
        return pb.GetModelInfoResponse(
            name=m.name,
            version=m.version,
            artifact_version=a.version,
            artifact_sha256=a.sha256,
            vocab=a.vocab,
            config=pb.ModelConfig(
                cell=str(cfg.get("cell", "")),
                vocab_size=a.vocab_size,
                embed_dim=int(cfg.get("embed_dim", 0)),
                hidden_size=a.hidden_size,
                num_layers=int(cfg.get("num_layers", 0)),
            ),
            backend=m.backend,
            device=m.device,
            limits=pb.ServerLimits(**lim.advertised(a.vocab_size)),
            has_unknown_token=a.unk_id is not None,
            server_version=__version__,
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models = self.plane.list_models()
        return pb.ListModelsResponse(models=[_status(m) for m in models],
                                     default_model=self.plane.registry.default_name)


def _status(m: ModelStatus) -> pb.ModelStatus:
    return pb.ModelStatus(name=m.name, version=m.version, state=_STATES[m.state], reason=m.reason,
                          is_default=m.is_default, artifact_version=m.artifact_version,
                          backend=m.backend, device=m.device)


def _generate_params(r: pb.GenerateRequest) -> GenerateParams:
    return GenerateParams(
        prompt=r.prompt,
        max_chars=r.max_chars,
        temperature=r.temperature if r.HasField("temperature") else 1.0,
        top_k=r.top_k,
        top_p=r.top_p,
        seed=r.seed if r.HasField("seed") else None,
        stop=tuple(r.stop),
        state=r.state,
        return_state=r.return_state,
        lane=lane_of(r.priority),
    )
