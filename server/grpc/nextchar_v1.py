"""nextchar.v1.NextChar servicer: proto in, domain call, proto out. A few lines per RPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from nextchar import __version__
from nextchar.v1 import nextchar_pb2 as pb
from nextchar.v1 import nextchar_pb2_grpc as pb_grpc

from .batcher import TextResult
from .errors import NotReady
from .generator import STOP_MAX_CHARS, STOP_STRING, GenerateParams, Generator
from .predictor import Predictor
from .state import StateCodec

_STOP_REASONS = {None: pb.STOP_REASON_UNSPECIFIED, STOP_MAX_CHARS: pb.STOP_REASON_MAX_CHARS,
                 STOP_STRING: pb.STOP_REASON_STOP_STRING}


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the event loop's clock, or None when the caller set none."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return asyncio.get_running_loop().time() + remaining


class NextCharServicer(pb_grpc.NextCharServicer):
    def __init__(self, predictor: Predictor, backend_name: str, device: str,
                 generator: Generator | None = None) -> None:
        self.predictor = predictor
        self.generator = generator if generator is not None else Generator(predictor)
        self.backend_name = backend_name
        self.device = device
        self.ready = False  # set by the app once warm; False again while draining

    def _check_ready(self) -> None:
        if not self.ready:
            raise NotReady("server is not ready (starting up or shutting down); retry shortly")

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        self._check_ready()
        predictor = self.predictor  # one read: a hot reload mid-call cannot mix two versions
        results = await predictor.predict(
            list(request.texts), request.top_k, request.per_position, deadline_of(context),
            states=list(request.states), return_state=request.return_state,
        )
        vocab = predictor.artifact.vocab
        codec = predictor.state_codec
        return pb.PredictResponse(
            predictions=[_prediction(r, vocab, codec) for r in results],
            model_version=predictor.artifact.version,
        )

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        self._check_ready()
        generator = self.generator  # one read: the stream stays on the version it started on
        predictor = generator.predictor
        stream = generator.open(_generate_params(request), deadline_of(context))
        # A cancelled or disconnected call frees its slot now, not when this coroutine unwinds.
        context.add_done_callback(lambda _: stream.close())  # type: ignore[arg-type]  # grpc-stubs wants its DoneCallback class
        try:
            async for chunk in stream.chunks():
                if chunk.stop_reason is None:
                    yield pb.GenerateResponse(text=chunk.text)
                    continue
                state = b"" if chunk.state is None else predictor.state_codec.encode(chunk.state)
                yield pb.GenerateResponse(
                    text=chunk.text, stop_reason=_STOP_REASONS[chunk.stop_reason], state=state,
                    model_version=predictor.artifact.version,
                )
        finally:
            stream.close()

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        a = self.predictor.artifact
        lim = self.predictor.limits
        cfg = a.model_config
        return pb.GetModelInfoResponse(
            name=a.name,
            version=a.version,
            artifact_sha256=a.sha256,
            vocab=a.vocab,
            config=pb.ModelConfig(
                cell=str(cfg.get("cell", "")),
                vocab_size=a.vocab_size,
                embed_dim=int(cfg.get("embed_dim", 0)),
                hidden_size=a.hidden_size,
                num_layers=int(cfg.get("num_layers", 0)),
            ),
            backend=self.backend_name,
            device=self.device,
            limits=pb.ServerLimits(
                max_texts_per_request=lim.max_texts_per_request,
                max_chars_per_text=lim.max_chars_per_text,
                max_message_bytes=lim.max_message_bytes,
                max_top_k=min(lim.max_top_k, a.vocab_size),
                default_top_k=lim.default_top_k,
                max_queue_texts=lim.max_queue_texts,
                max_streams=lim.max_streams,
            ),
            has_unknown_token=a.unk_id is not None,
            server_version=__version__,
        )


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
    )


def _prediction(r: TextResult, vocab: list[str], codec: StateCodec) -> pb.Prediction:
    top = [pb.CharProb(char=vocab[i], prob=float(p), id=int(i))
           for i, p in zip(r.top_ids.tolist(), r.top_probs.tolist(), strict=True)]
    state = b"" if r.state is None else codec.encode(r.state)
    if r.position_ids is None or r.position_probs is None:
        return pb.Prediction(top=top, state=state)
    ids = r.position_ids.tolist()
    return pb.Prediction(
        top=top,
        argmax_text="".join(vocab[i] for i in ids),
        positions=[pb.CharProb(char=vocab[i], prob=float(p), id=int(i))
                   for i, p in zip(ids, r.position_probs.tolist(), strict=True)],
        state=state,
    )
