"""KServe V2 REST (the Open Inference Protocol's HTTP binding): JSON in (v2_codec.py) -> the data
plane, with the same validation, batcher and priorities as every front end -> JSON out.

    GET  /v2                                         server metadata
    GET  /v2/health/live | /v2/health/ready          200, or 503 {"ready": false} (starting,
                                                     draining: from the drain's first moment)
    GET  /v2/models/{name}[/versions/{v}]            model metadata (tensor names, shapes)
    GET  /v2/models/{name}[/versions/{v}]/ready      200, or 503 {"ready": false}
    GET  /v2/models/{name}[/versions/{v}]/config     Triton's model configuration (JSON)
    POST /v2/models/{name}[/versions/{v}]/infer      inference
    POST /v2/repository/index                        Triton's repository index
    POST /v2/repository/models/{name}/load | unload  Triton's model control: loopback callers
                                                     only while auth is off (as gRPC's)
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from nextchar import __version__

from ..dataplane import DataPlane, PredictCall
from ..errors import InvalidInput, PermissionDenied, ServingError
from ..registry import ModelState
from ..security import CONTROL_LOOPBACK_ONLY, is_loopback
from ..telemetry import DrainGate
from ..v2_config import model_config
from ..v2_stats import model_statistics
from ..v2_tensors import deadline_with_timeout, metadata_tensors, output_tensors
from .errors import INTERNAL, body_error, error_body, error_headers
from .json_body import json_router
from .v2_codec import HEADER_LENGTH, decode_request, encode_response

log = logging.getLogger(__name__)

SERVER_NAME = "nextchar"
JSON = "application/json"
INFER_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status, media_type=JSON)


async def infer(plane: DataPlane, body: bytes, header_length: str | None, name: str,
                version: str, deadline: float | None) -> tuple[bytes, int | None]:
    """One V2 infer: (response body, JSON header length when outputs are binary)."""
    limits = plane.model(name, version).limits
    with plane.decoding(name):
        req = decode_request(body, header_length, limits.max_texts_per_request)
        deadline = deadline_with_timeout(deadline, req.timeout_us)
    answer = await plane.predict(PredictCall(
        texts=req.texts, ids=req.ids, lengths=req.lengths, top_k=req.top_k,
        want_probs="probs" in req.wanted, model=name, version=version, lane=req.lane,
        deadline=deadline))
    tensors = output_tensors(req.wanted, answer.results, answer.top_k, answer.vocab)
    return encode_response(answer.model, answer.version, req.id, tensors, req.binary)


Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


def raw_infer(plane: DataPlane) -> Callable[..., Awaitable[None]]:
    """POST .../infer as a bare ASGI handler: the hot path skips FastAPI's routing, dependency
    solving and response classes (~100 us of the event loop per call); the FastAPI route of the
    same path documents it in the OpenAPI schema. Errors are mapped as errors.py does."""

    async def handle(scope: MutableMapping[str, Any], receive: Receive, send: Send,
                     match: re.Match[str]) -> None:
        header_length = None
        for k, v in scope["headers"]:
            if k == b"inference-header-content-length":
                header_length = v.decode("latin-1")
        status, headers = 200, [(b"content-type", JSON.encode())]
        try:
            chunks = []
            while True:  # inside the try: a body over the limit (BodyTooLarge) is a 413
                message = await receive()
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
            body, n = await infer(plane, b"".join(chunks), header_length, match["name"],
                                  match["version"] or "", scope["state"]["deadline"])
            if n is not None:
                headers = [(b"content-type", b"application/octet-stream"),
                           (HEADER_LENGTH.encode(), str(n).encode())]
        except ServingError as e:
            status = e.http_status if e.http_status != 500 else 500
            text = e.message if status != 500 else INTERNAL
            if status == 500:
                log.error("unhandled error in %s", scope["path"], exc_info=e)
            body = error_body(scope["path"], status, text)
            headers += [(k.encode(), v.encode()) for k, v in error_headers(status).items()]
        except Exception as e:
            log.error("unhandled error in %s", scope["path"], exc_info=e)
            status, body = 500, error_body(scope["path"], 500, INTERNAL)
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return handle


def _ready(doc: dict[str, Any], ready: bool) -> Response:
    return _json({**doc, "ready": ready}, 200 if ready else 503)


def _json_object(body: bytes, example: str) -> dict[str, Any]:
    """An optional JSON object body ({} when empty)."""
    if not body.strip():
        return {}
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise InvalidInput(body_error(e)) from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"the request body must be a JSON object, e.g. {example}")
    return doc


def router(plane: DataPlane, gate: DrainGate, control_loopback_only: bool = False) -> APIRouter:
    """control_loopback_only: load and unload answer loopback callers only (auth is off)."""
    r = json_router("KServe V2")

    def check_control(request: Request) -> None:
        host = request.client.host if request.client is not None else ""
        if control_loopback_only and not is_loopback(host):
            log.info("refused %s from %s: not loopback and auth is off", request.url.path, host)
            raise PermissionDenied(CONTROL_LOOPBACK_ONLY)

    @r.get("/v2", summary="Server metadata")
    async def server_metadata() -> Response:
        return _json({"name": SERVER_NAME, "version": __version__,
                      "extensions": ["model_repository", "model_configuration", "statistics",
                                     "binary_tensor_data", "schedule_policy"]})

    @r.get("/v2/health/live", summary="Liveness: 200 whenever the process answers")
    async def live() -> Response:
        return _json({"live": True})

    @r.get("/v2/health/ready",
           summary="Readiness: 200 once every model is warm, 503 while starting or draining")
    async def ready() -> Response:
        return _ready({}, plane.server_ready() and not gate.draining)

    async def metadata(name: str, version: str = "") -> Response:
        m = plane.model(name, version)
        inputs, outputs = metadata_tensors(m.artifact.vocab_size)
        return _json({"name": m.name, "versions": [m.version], "platform": m.platform,
                      "inputs": inputs, "outputs": outputs})

    async def model_ready(name: str, version: str = "") -> Response:
        return _ready({"name": name}, plane.model_ready(name, version) and not gate.draining)

    async def infer_route(request: Request, name: str, version: str = "") -> Response:
        body, header_length = await infer(plane, await request.body(),
                                          request.headers.get(HEADER_LENGTH), name, version,
                                          request.state.deadline)
        if header_length is None:
            return Response(body, media_type=JSON)
        return Response(body, media_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(header_length)})

    # Before /v2/models/{name}: "stats" is the statistics of every model, as in Triton.
    @r.get("/v2/models/stats", summary="Every model's statistics (Triton extension)")
    async def all_statistics() -> Response:
        return _json(model_statistics(plane))

    @r.get("/v2/models/{name}/stats", summary="A model's statistics (Triton extension)")
    async def statistics(name: str) -> Response:
        return _json(model_statistics(plane, name))

    @r.get("/v2/models/{name}/versions/{version}/stats",
           summary="A model's statistics, naming its version (Triton extension)")
    async def version_statistics(name: str, version: str) -> Response:
        return _json(model_statistics(plane, name, version))

    @r.get("/v2/models/{name}", summary="Model metadata")
    async def metadata_latest(name: str) -> Response:
        return await metadata(name)

    @r.get("/v2/models/{name}/versions/{version}", summary="Model metadata (one version)")
    async def metadata_version(name: str, version: str) -> Response:
        return await metadata(name, version)

    @r.get("/v2/models/{name}/config", summary="Model configuration (Triton's JSON form)")
    async def config_latest(name: str) -> Response:
        return _json(model_config(plane.model(name)))

    @r.get("/v2/models/{name}/versions/{version}/config",
           summary="Model configuration (one version)")
    async def config_version(name: str, version: str) -> Response:
        return _json(model_config(plane.model(name, version)))

    @r.get("/v2/models/{name}/ready", summary="Model readiness: 200, or 503 while not served")
    async def ready_latest(name: str) -> Response:
        return await model_ready(name)

    @r.get("/v2/models/{name}/versions/{version}/ready", summary="Model readiness (one version)")
    async def ready_version(name: str, version: str) -> Response:
        return await model_ready(name, version)

    infer_doc: dict[str, Any] = {"requestBody": {"required": True, "content": {JSON: {"schema": {
        "type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "properties": {
                "top_k": {"type": "integer"}, "priority": {"type": "integer"}}},
            "inputs": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "datatype": {"type": "string"},
                "shape": {"type": "array", "items": {"type": "integer"}},
                "data": {"type": "array"}}}},
            "outputs": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}}}}}}}}}}

    @r.post("/v2/models/{name}/infer", summary="Inference", openapi_extra=infer_doc)
    async def infer_latest(request: Request, name: str) -> Response:
        return await infer_route(request, name)

    @r.post("/v2/models/{name}/versions/{version}/infer", summary="Inference (one version)",
            openapi_extra=infer_doc)
    async def infer_version(request: Request, name: str, version: str) -> Response:
        return await infer_route(request, name, version)

    @r.post("/v2/repository/index", summary="Models known to the server (Triton extension)")
    async def repository_index(request: Request) -> Response:
        # Triton's body is optional: {"ready": true} lists ready models only.
        ready_only = _json_object(await request.body(), '{"ready": true}').get("ready", False)
        if not isinstance(ready_only, bool):
            raise InvalidInput(f"ready must be true or false, got {ready_only!r}")
        return _json([{"name": m.name, "version": m.version, "state": m.state.value,
                       "reason": m.reason} for m in plane.list_models()
                      if not ready_only or m.state is ModelState.READY])

    @r.post("/v2/repository/models/{name}/load",
            summary="Load a model of the repository, or its newest version (Triton extension)")
    async def load_model(request: Request, name: str) -> Response:
        check_control(request)
        if _json_object(await request.body(), "{}").get("parameters"):
            raise InvalidInput("load parameters (config overrides, files) are not supported: "
                               "put settings in the model's config.json")
        await plane.load_model(name)
        return _json({})

    @r.post("/v2/repository/models/{name}/unload",
            summary="Stop serving a model; accepted calls finish first (Triton extension)")
    async def unload_model(request: Request, name: str) -> Response:
        check_control(request)
        _json_object(await request.body(), "{}")
        await plane.unload_model(name)
        return _json({})

    return r
