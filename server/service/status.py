"""The one place domain errors become gRPC status codes.

Order matters: subclasses before their bases (``InvalidAdapterName`` is an
``InvalidRequest``; every adapter refusal is an ``AdapterIncompatible``). Anything not
listed is a bug: INTERNAL, with the request id so it can be found in the log.
"""

from __future__ import annotations

import grpc

from server.errors import (
    AdapterIncompatible,
    AdapterNotFound,
    EngineStopped,
    InvalidOption,
    InvalidRequest,
    PermissionDenied,
    PromptTemplateError,
    QueueFull,
    ServiceUnavailable,
    SwitchboardError,
    Unauthenticated,
)

STATUS_BY_ERROR: tuple[tuple[type[SwitchboardError], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (PromptTemplateError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidOption, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (AdapterIncompatible, grpc.StatusCode.FAILED_PRECONDITION),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineStopped, grpc.StatusCode.UNAVAILABLE),
    (ServiceUnavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
)


def status_for(error: BaseException) -> grpc.StatusCode:
    for kind, code in STATUS_BY_ERROR:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL
