"""How the JSON routes (/v1, /nextchar/v1, the V2 control routes) read a request body.

Two rules on top of FastAPI's own parsing:
- A body without a Content-Type is read as JSON (`strict_content_type=False`): `requests`' `data=`,
  `http.client` and `curl -H 'content-type:'` send none, and docs/http.md promises it. Another
  Content-Type is still refused with 415 (errors.validation_error).
- A string holding a lone surrogate escape (`"\\ud800"`) is refused with 400 naming where it is.
  Python's json module accepts it, but it is no Unicode character: the text cannot be echoed,
  logged as UTF-8 or sent back in an answer (orjson refuses to write it), and gRPC could never
  carry it. The V2 infer route parses with orjson, which refuses it already.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute

# Only an escape can put a surrogate into a parsed string: encoded as UTF-8 bytes, it is invalid
# UTF-8 and the body fails to decode before this.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class LoneSurrogate(ValueError):
    """A JSON string in the body that is not Unicode text (errors.body_error words it)."""

    def __init__(self, where: str, index: int, code: int) -> None:
        super().__init__(f"{where or 'the body'} has a lone surrogate \\u{code:04x} at character "
                         f"{index}: not a Unicode character (send the pair, or the character "
                         "itself as UTF-8)")


def _find_lone_surrogate(value: Any, where: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise LoneSurrogate(where, e.start, ord(value[e.start])) from None
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _find_lone_surrogate(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _find_lone_surrogate(key, f"{where} key" if where else "a key")
            _find_lone_surrogate(item, f"{where}.{key}" if where else str(key))


class _JsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            doc = json.loads(body)  # what Starlette does; its errors are FastAPI's to word
            if _SURROGATE_ESCAPE.search(body):
                _find_lone_surrogate(doc, "")
            self._json = doc
        return self._json


class JsonRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def read_json_strictly(request: Request) -> Response:
            return await handler(_JsonRequest(request.scope, request.receive))

        return read_json_strictly


def json_router(tag: str) -> APIRouter:
    """The router every JSON front end is built on."""
    return APIRouter(tags=[tag], route_class=JsonRoute, strict_content_type=False)
