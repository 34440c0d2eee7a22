"""nextchar.v1 as JSON: everything the gRPC API does, continuation state included, for callers
without gRPC stubs. Field names are the proto's; a state is base64 (as protobuf's JSON mapping
writes bytes), opaque, and continues on any replica of the same artifact.

    POST /nextchar/v1/predict    {"texts": ["To be, or no"], "top_k": 3, "per_position": false,
                                  "return_state": true, "states": ["<base64>"], "model": "",
                                  "priority": "high"}
    POST /nextchar/v1/generate   {"prompt": "To be", "max_chars": 40, "temperature": 0.8,
                                  "top_k": 0, "top_p": 0, "seed": 7, "stop": ["\\n"],
                                  "state": "<base64>", "return_state": true, "stream": false}
    GET  /nextchar/v1/models     ListModels;  GET /nextchar/v1/models/{model}: GetModelInfo
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncGenerator
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response, StreamingResponse

from nextchar import __version__

from ..batcher import HIGH, LOW
from ..dataplane import DataPlane, GenerateCall, PredictCall
from ..errors import InvalidInput
from ..generator import GenerateParams, as_float32
from ..predictor import TextResult
from ..telemetry import DrainGate
from .disconnect import ClientGone, gone_response, unless_gone
from .errors import error_body
from .json_body import json_router
from .streams import error_event, opened

JSON = "application/json"
STREAM_ENDED = ("server is shutting down: stream ended early; send the prompt plus the text "
                "received so far to another replica")


class PredictBody(BaseModel):
    # strict, as the /v1 bodies: "10" is not a count and true is not 1 (a typo'd client got a
    # one-character generation instead of a 400 naming the field).
    model_config = ConfigDict(strict=True)

    texts: list[str] = Field(description="Texts; with states, the characters that follow each.")
    top_k: int = Field(0, ge=0, description="0: the model's default.")
    per_position: bool = Field(False, description="argmax_text and positions per text.")
    states: list[str] = Field(default_factory=list, description="Base64 states, one per text "
                              "(\"\" = fresh), as return_state gave them.")
    return_state: bool = False
    model: str = ""
    priority: Literal["high", "low"] = "high"


class GenerateBody(BaseModel):
    model_config = ConfigDict(strict=True)

    prompt: str
    max_chars: int = Field(ge=1)
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(0.0, ge=0, le=1)
    seed: int | None = Field(None, ge=0, lt=1 << 64)  # nextchar.v1's uint64
    stop: list[str] = Field(default_factory=list)
    state: str = ""
    return_state: bool = False
    model: str = ""
    priority: Literal["high", "low"] = "high"
    stream: bool = Field(False, description="Server-sent events: one JSON chunk per event, "
                         "then data: [DONE].")


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{what} is not valid base64") from None


def _lane(priority: str) -> int:
    return LOW if priority == "low" else HIGH


def _json(doc: Any) -> Response:
    return Response(orjson.dumps(doc), media_type=JSON)


def _prediction(r: TextResult, vocab: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"top": [{"char": vocab[i], "prob": p, "id": i} for i, p in
                                   zip(r.top_ids.tolist(), r.top_probs.tolist(), strict=True)]}
    if r.position_ids is not None and r.position_probs is not None:
        ids = r.position_ids.tolist()
        out["argmax_text"] = "".join(vocab[i] for i in ids)
        out["positions"] = [{"char": vocab[i], "prob": p, "id": i}
                            for i, p in zip(ids, r.position_probs.tolist(), strict=True)]
    if r.state:
        out["state"] = base64.b64encode(r.state).decode()
    return out


def router(plane: DataPlane, gate: DrainGate) -> APIRouter:
    r = json_router("nextchar")

    @r.post("/nextchar/v1/predict", summary="Predict: top-k, per-position argmax, states")
    async def predict(body: PredictBody, request: Request) -> Response:
        states = [_b64(s, f"states[{i}]") for i, s in enumerate(body.states)]
        answer = await plane.predict(PredictCall(
            texts=body.texts, top_k=body.top_k, per_position=body.per_position, states=states,
            return_state=body.return_state, model=body.model, lane=_lane(body.priority),
            deadline=request.state.deadline))
        return _json({"model_name": answer.model, "model_version": answer.version,
                      "predictions": [_prediction(x, answer.vocab) for x in answer.results]})

    @r.post("/nextchar/v1/generate", summary="Generate, optionally from a state; stream: SSE")
    async def generate(body: GenerateBody, request: Request) -> Response:
        params = GenerateParams(
            prompt=body.prompt, max_chars=body.max_chars,
            temperature=as_float32(body.temperature, "temperature"), top_k=body.top_k,
            top_p=as_float32(body.top_p, "top_p"), seed=body.seed, stop=tuple(body.stop),
            state=_b64(body.state, "state") if body.state else b"",
            return_state=body.return_state, lane=_lane(body.priority))
        session = plane.generate(GenerateCall(params, body.model, request.state.deadline))

        def last(text: str, stop_reason: str | None, state: bytes) -> dict[str, Any]:
            doc: dict[str, Any] = {"text": text, "stop_reason": stop_reason,
                                   "model_name": session.model,
                                   "model_version": session.version}
            if state:
                doc["state"] = base64.b64encode(state).decode()
            return doc

        if not body.stream:
            async def whole() -> dict[str, Any]:
                parts, reason, state = [], None, b""
                async for chunk in session.chunks():
                    parts.append(chunk.text)
                    if chunk.stop_reason is not None:
                        reason, state = chunk.stop_reason, chunk.state
                return last("".join(parts), reason, state)

            try:
                return _json(await unless_gone(request, whole()))
            except ClientGone:
                return gone_response()
            finally:
                session.close()

        async def events() -> AsyncGenerator[bytes, None]:
            sent = False
            try:
                async for chunk in session.chunks():
                    doc = ({"text": chunk.text} if chunk.stop_reason is None
                           else last(chunk.text, chunk.stop_reason, chunk.state))
                    sent = True
                    yield b"data: " + orjson.dumps(doc) + b"\n\n"
                    if gate.streams_must_end and chunk.stop_reason is None:
                        yield b"data: " + error_body("", 503, STREAM_ENDED) + b"\n\n"
                        break
            except Exception as e:
                if not sent:  # before the first event: the route's HTTP status (streams.py)
                    raise
                yield error_event("", e)
            finally:
                session.close()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(await opened(events()), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    @r.get("/nextchar/v1/models", summary="ListModels")
    async def list_models() -> Response:
        return _json({"default_model": plane.registry.default_name, "models": [
            {"name": m.name, "version": m.version, "state": m.state.value, "reason": m.reason,
             "is_default": m.is_default, "artifact_version": m.artifact_version,
             "backend": m.backend, "device": m.device} for m in plane.list_models()]})

    @r.get("/nextchar/v1/models/{model}", summary="GetModelInfo")
    async def model_info(model: str) -> Response:
        m = plane.model(model)
        a, lim, cfg = m.artifact, m.limits, m.artifact.model_config
        return _json({
            "name": m.name, "version": m.version, "artifact_version": a.version,
            "artifact_sha256": a.sha256, "vocab": a.vocab,
            "config": {"cell": str(cfg.get("cell", "")), "vocab_size": a.vocab_size,
                       "embed_dim": int(cfg.get("embed_dim", 0)),
                       "hidden_size": a.hidden_size,
                       "num_layers": int(cfg.get("num_layers", 0))},
            "backend": m.backend, "device": m.device,
            "limits": lim.advertised(a.vocab_size),
            "has_unknown_token": a.unk_id is not None, "server_version": __version__})

    return r
