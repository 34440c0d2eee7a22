"""Errors in each HTTP protocol's own shape, mapped in one place (as grpc/wrapping.py does for
gRPC): a ServingError carries its HTTP status and a message meant for the caller; anything else
is a bug, logged with its traceback and answered 500 with a generic message.

    KServe V2 and nextchar JSON   {"error": "<message>"}
    OpenAI (/v1/...)              {"error": {"message", "type", "param", "code"}}
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ..errors import NotFound, ServingError
from ..telemetry import http_error_detail
from .json_body import LoneSurrogate

log = logging.getLogger(__name__)

INTERNAL = "internal server error (logged on the server)"
RETRY_AFTER_S = "1"

# OpenAI's error `type` per status (its API answers these; the SDK maps the status to a class;
# a missing or wrong API key is its 401 "invalid_request_error", code "invalid_api_key").
_OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                 403: "permission_error", 404: "invalid_request_error",
                 405: "invalid_request_error", 408: "invalid_request_error",
                 409: "invalid_request_error",
                 413: "invalid_request_error", 415: "invalid_request_error",
                 429: "rate_limit_error",
                 503: "service_unavailable", 504: "timeout"}
_OPENAI_CODES = {401: "invalid_api_key", 404: "not_found", 408: "request_timeout",
                 413: "request_too_large",
                 429: "rate_limit_exceeded", 503: "unavailable", 504: "deadline_exceeded"}


class BodyRefused(ServingError, HTTPException):
    """A request body refused while it arrives (the middleware's receive). Also an
    HTTPException: FastAPI passes those through from body reading, where it would answer any
    other exception with a generic 400."""

    http_status = 400  # e.g. a gzip body that does not decompress

    def __init__(self, message: str) -> None:
        ServingError.__init__(self, message)
        self.status_code, self.detail, self.headers = self.http_status, message, None


class BodyTooLarge(BodyRefused):
    """Over max_message_bytes (chunked, a Content-Length that lied, or once decompressed)."""

    http_status = 413


class BodyTimeout(BodyRefused):
    """Stalled: nothing arrived for --http-body-timeout-s."""

    http_status = 408


def is_openai(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


def error_body(path: str, status: int, message: str, param: str | None = None,
               code: str | None = None) -> bytes:
    http_error_detail.set(message)
    body: dict[str, Any]
    if is_openai(path):
        body = {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "api_error"),
                          "param": param, "code": code or _OPENAI_CODES.get(status)}}
    else:
        body = {"error": message}
    return json.dumps(body).encode()


def error_headers(status: int) -> dict[str, str]:
    headers = {}
    if status in (429, 503):
        headers["retry-after"] = RETRY_AFTER_S
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    return headers


def error_response(path: str, status: int, message: str, param: str | None = None,
                   code: str | None = None) -> Response:
    return Response(error_body(path, status, message, param, code), status,
                    headers=error_headers(status), media_type="application/json")


async def serving_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServingError)
    status = exc.http_status if exc.http_status < 500 or exc.http_status in (503, 504) else 500
    if status == 500:
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(request.url.path, 500, INTERNAL)
    code = "model_not_found" if isinstance(exc, NotFound) and is_openai(request.url.path) else None
    return error_response(request.url.path, status, exc.message,
                          param=getattr(exc, "param", None), code=code)


async def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = ".".join(loc)
    kind = first.get("type")
    if kind == "json_invalid":
        pos = first.get("loc", (None, None))[-1]
        ctx: Any = first.get("ctx") or {}
        message = "the request body is not valid JSON" + (
            f" (at character {pos}: {ctx.get('error', '')})" if isinstance(pos, int) else "")
        where = ""
    elif not where:  # the body as a whole: empty, not JSON, or not an object
        content_type = request.headers.get("content-type", "")
        if content_type and not _is_json(content_type):
            return error_response(request.url.path, 415, f"Content-Type must be "
                                  f"application/json, got {content_type[:80]!r}")
        message = ("the request body is empty: send a JSON object" if kind == "missing"
                   else "the request body must be a JSON object")
    else:
        text = str(first.get("msg")).removeprefix("Value error, ")  # our validators' own text
        message = f"{where}: {text}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return error_response(request.url.path, 400, message + more, param=where or None)


def _is_json(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/")
                                           and kind.endswith("+json"))


def body_error(cause: BaseException | None) -> str:
    """What is wrong with a request body that did not parse, from the parser's exception."""
    if isinstance(cause, UnicodeDecodeError):
        return (f"the request body is not valid UTF-8 JSON: byte {cause.start} "
                f"({cause.object[cause.start:cause.start + 1]!r}) {cause.reason}")
    if isinstance(cause, RecursionError):
        return "the request body is not valid JSON: it is nested too deeply"
    if isinstance(cause, LoneSurrogate):
        return f"the request body is not valid text: {cause}"
    return "the request body is not valid JSON"


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    method = request.scope.get("nextchar.method", request.method)  # HEAD runs as GET
    if status == 404:
        message = f"no such endpoint: {method} {request.url.path} (docs/http.md)"
    elif status == 405:
        message = f"method {method} is not allowed on {request.url.path}"
    elif status == 400 and exc.__cause__ is not None:  # FastAPI: the body did not parse
        message = body_error(exc.__cause__)
    else:
        message = str(exc.detail)
    response = error_response(request.url.path, status, message)
    if exc.headers:
        response.headers.update(exc.headers)
    allow = response.headers.get("allow", "")
    if "GET" in allow.split(", ") and "HEAD" not in allow:  # the call layer answers HEAD
        response.headers["allow"] = f"{allow}, HEAD"
    return response


async def internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(request.url.path, 500, INTERNAL)


EXCEPTION_HANDLERS: dict[Any, Any] = {
    ServingError: serving_error,
    RequestValidationError: validation_error,
    HTTPException: http_error,
    Exception: internal_error,
}
