"""The HTTP front end's ASGI app: the routers over one data plane, wrapped in the call layer.

    app = build_app(plane, telemetry, tokens, settings)   # then server.HttpServer(app, settings)

`GET /openapi.json` is the schema (the fuzz test walks it); no /docs page (it would load its
JavaScript from a CDN).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from nextchar import __version__

from ..dataplane import DataPlane
from ..security import TokenSet
from ..settings import ServerSettings
from ..telemetry import Telemetry
from . import native, openai, v2
from .errors import EXCEPTION_HANDLERS
from .middleware import ASGIApp, CallLayer, Receive, Scope, Send


class _FastPaths:
    """V2 infer straight to its bare handler (v2.raw_infer); everything else to FastAPI."""

    def __init__(self, api: ASGIApp, plane: DataPlane) -> None:
        self.api = api
        self.infer = v2.raw_infer(plane)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = v2.INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                await self.infer(scope, receive, send, match)
                return
        await self.api(scope, receive, send)


def build_app(plane: DataPlane, telemetry: Telemetry, tokens: TokenSet | None,
              settings: ServerSettings) -> Any:
    api = FastAPI(title="nextchar", version=__version__, docs_url=None, redoc_url=None,
                  redirect_slashes=False,  # a 404 that names the path, not a 307
                  exception_handlers=EXCEPTION_HANDLERS,
                  description="KServe V2 REST, OpenAI-compatible completions and nextchar.v1 "
                  "as JSON, over the same serving core as the gRPC port (docs/http.md).")
    api.include_router(v2.router(plane, telemetry.gate, control_loopback_only=tokens is None))
    api.include_router(openai.router(plane, telemetry.gate))
    api.include_router(native.router(plane, telemetry.gate))
    return CallLayer(_FastPaths(api, plane), telemetry, tokens, open_health=settings.auth_open_health,
                     max_body_bytes=settings.max_message_bytes,
                     body_timeout_s=settings.http_body_timeout_s)
