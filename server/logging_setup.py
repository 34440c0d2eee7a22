"""Server logging: text or JSON lines, each line carrying the request id of the call that logged it.

    nextchar serve --log-format json 2> server.log
    {"ts": "2026-11-27T10:15:00.123Z", "level": "INFO", "logger": "nextchar.server.access",
     "msg": "Predict OK 3.1 ms", "request_id": "b1f3...", "method": "/nextchar.v1.NextChar/Predict",
     "code": "OK", "duration_ms": 3.1}

The request id comes from the caller's `x-request-id` metadata (or is generated) and is echoed in
the call's trailing metadata; `telemetry.py` sets it for the duration of each call.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import sys
from contextvars import ContextVar
from datetime import datetime, timezone

REQUEST_ID_HEADER = "x-request-id"
request_id_var: ContextVar[str | None] = ContextVar("nextchar_request_id", default=None)

# A caller's id is kept only when it cannot forge log structure: printable ASCII, no spaces.
_VALID_REQUEST_ID = re.compile(r"[!-~]{1,128}")

# LogRecord attributes that are not `extra=` fields.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "request_id", "taskName",
}


# Fresh ids: 32 hex characters, a random per-process half and a counter. Unique like uuid4().hex
# in practice, without its urandom system call on every call (~2% of the event loop's time).
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count()


def request_id_from(value: str | bytes | None) -> str:
    """The caller's id when it is usable, else a fresh one."""
    if isinstance(value, str) and _VALID_REQUEST_ID.fullmatch(value):
        return value
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` ('-' outside a call) so both formats can show it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra=` fields become keys; tracebacks go in `exc`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "-")
        if request_id != "-":
            out["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, one line per record: line breaks in the message (a caller's path or text
    quoted in it) are written as \\n, so no caller can forge a log line; a traceback keeps
    its own lines after it."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        if "\n" in line or "\r" in line:
            line = line.replace("\r", "\\r").replace("\n", "\\n")
        return line


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Root handler on stderr; replaces handlers a previous call installed."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
