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

from ..errors import ServingError

log = logging.getLogger(__name__)

INTERNAL = "internal server error (logged on the server)"
RETRY_AFTER_S = "1"

# OpenAI's error `type` per status (its API answers these; the SDK maps the status to a class).
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                 403: "permission_error", 404: "invalid_request_error",
                 405: "invalid_request_error", 409: "invalid_request_error",
                 413: "invalid_request_error", 429: "rate_limit_error",
                 503: "service_unavailable", 504: "timeout"}
_OPENAI_CODES = {401: "invalid_api_key", 404: "not_found", 413: "request_too_large",
                 429: "rate_limit_exceeded", 503: "unavailable", 504: "deadline_exceeded"}


class BodyTooLarge(ServingError):
    http_status = 413


def is_openai(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


def error_body(path: str, status: int, message: str, param: str | None = None,
               code: str | None = None) -> bytes:
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
    return error_response(request.url.path, status, exc.message,
                          param=getattr(exc, "param", None))


async def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = ".".join(loc)
    if first.get("type") == "json_invalid":
        message = "the request body is not valid JSON"
        where = ""
    else:
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return error_response(request.url.path, 400, message + more, param=where or None)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    if status == 404:
        message = f"no such endpoint: {request.method} {request.url.path} (docs/http.md)"
    elif status == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    response = error_response(request.url.path, status, message)
    if exc.headers:
        response.headers.update(exc.headers)
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
