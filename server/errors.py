"""Domain errors, each carrying its gRPC status code; `interceptors.py` maps them in one place.

The core (artifact, batcher, predictor) raises these and never imports grpc's servicer API, so
the same code serves nextchar.v1 and any other protocol on top of it.
"""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """An error whose message is safe and useful to show to the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    """A named thing (e.g. a KServe V2 model name or version) that this server does not serve."""

    code = grpc.StatusCode.NOT_FOUND


class NotReady(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class Overloaded(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(ServingError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ArtifactError(Exception):
    """The artifact cannot be served (missing file, bad checksum, bad manifest). Start-up only."""
