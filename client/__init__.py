"""Thin client: library, `nextchar` CLI and batch jobs. Needs only grpcio and protobuf.

The names below load on first use, so `nextchar` (client/cli.py) starts without importing
grpc, or even typing, before its `main` runs.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING, as mypy reads any name TYPE_CHECKING
if TYPE_CHECKING:
    from .client import NextCharClient, NextCharError, prediction_to_dict

__all__ = ["NextCharClient", "NextCharError", "prediction_to_dict"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
