"""The one exception the client raises: a failed call, with its gRPC status and message."""

from __future__ import annotations

import grpc

from clients.retry import is_not_grpc


class SwitchboardError(Exception):
    """A call failed. ``code`` is the gRPC status (``grpc.StatusCode``), ``details`` the
    server's one-line message, ``address`` the server tried."""

    def __init__(self, code: grpc.StatusCode, details: str, address: str) -> None:
        self.code = code
        self.details = details
        self.address = address
        message = f"{code.name}: {details}"
        if is_not_grpc(details):
            message = self.one_line()
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        """The status code's number (NOT_FOUND 5, UNAVAILABLE 14, ...): the CLI's exit code."""
        return int(self.code.value[0])

    @property
    def connection_failed(self) -> bool:
        text = self.details.lower()
        return self.code == grpc.StatusCode.UNAVAILABLE and (
            "connect" in text or "connection" in text or "dns" in text)

    def one_line(self) -> str:
        if is_not_grpc(self.details):  # gRPC's own words ("Expected SETTINGS") say nothing
            return (f"{self.address} answered, but not in gRPC: is it the HTTP API's port? "
                    "The client and the switchboard commands need the gRPC port (50051 by "
                    f"default, e.g. --target HOST:50051); HTTP clients use "
                    f"http://{self.address}/v1")
        if self.connection_failed:
            return f"cannot reach the Switchboard server at {self.address} ({self.details[:120]})"
        return f"{self.code.name}: {self.details}"


def from_rpc_error(error: grpc.RpcError, address: str) -> SwitchboardError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return SwitchboardError(code or grpc.StatusCode.UNKNOWN, " ".join(str(details).split()),
                            address)
