"""Domain errors, each carrying its gRPC status code and HTTP status; each front end maps them
in one place (grpc/wrapping.py for gRPC; the HTTP front end the same way).

The core (registry, data plane, batcher, predictor) raises these and never imports a
transport's API, so the same code serves nextchar.v1, KServe V2 and any protocol on top of it.
"""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """An error whose message is safe and useful to show to the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class NotFound(ServingError):
    """A named thing (e.g. a KServe V2 model name or version) that this server does not serve."""

    code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class NotReady(ServingError):
    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class Overloaded(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class FailedPrecondition(ServingError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409  # the request is fine; the server's state (e.g. a state blob's model) is not


class Unauthenticated(ServingError):
    code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class PermissionDenied(ServingError):
    code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


class ArtifactError(Exception):
    """The artifact cannot be served (missing file, bad checksum, bad manifest). Start-up only."""
