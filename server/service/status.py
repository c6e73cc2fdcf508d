"""The one place domain errors become a call's status, and each status its code per
protocol.

A status is named as in gRPC (and Google's API design guide): ``INVALID_ARGUMENT``,
``NOT_FOUND``... It is what metrics and logs record, whatever the protocol. Each
front-end then has one table from status to its own code: :data:`GRPC_CODES` here,
``HTTP_ERRORS`` in ``server/service/http_api.py``.

Order matters: subclasses before their bases (``InvalidAdapterName`` is an
``InvalidRequest``; every adapter refusal is an ``AdapterIncompatible``). Anything not
listed is a bug: INTERNAL, with the request id so it can be found in the log.
"""

from __future__ import annotations

from enum import StrEnum

import grpc

from server.errors import (
    AdapterIncompatible,
    AdapterNotFound,
    CallCancelled,
    DeadlineExceeded,
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


class Status(StrEnum):
    OK = "OK"
    CANCELLED = "CANCELLED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INTERNAL = "INTERNAL"


STATUS_BY_ERROR: tuple[tuple[type[SwitchboardError], Status], ...] = (
    (InvalidRequest, Status.INVALID_ARGUMENT),
    (PromptTemplateError, Status.INVALID_ARGUMENT),
    (InvalidOption, Status.INVALID_ARGUMENT),
    (AdapterNotFound, Status.NOT_FOUND),
    (AdapterIncompatible, Status.FAILED_PRECONDITION),
    (QueueFull, Status.RESOURCE_EXHAUSTED),
    (EngineStopped, Status.UNAVAILABLE),
    (ServiceUnavailable, Status.UNAVAILABLE),
    (Unauthenticated, Status.UNAUTHENTICATED),
    (PermissionDenied, Status.PERMISSION_DENIED),
    (DeadlineExceeded, Status.DEADLINE_EXCEEDED),
    (CallCancelled, Status.CANCELLED),
)

GRPC_CODES: dict[Status, grpc.StatusCode] = {s: grpc.StatusCode[s.value] for s in Status}
"""gRPC's table: its codes carry the same names."""


def status_of(error: BaseException) -> Status:
    for kind, status in STATUS_BY_ERROR:
        if isinstance(error, kind):
            return status
    return Status.INTERNAL


def status_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC code of ``error``."""
    return GRPC_CODES[status_of(error)]
