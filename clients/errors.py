"""The one exception the client raises: a failed call, with its gRPC status and message."""

from __future__ import annotations

import grpc


class SwitchboardError(Exception):
    """A call failed. ``code`` is the gRPC status (``grpc.StatusCode``), ``details`` the
    server's one-line message, ``address`` the server tried."""

    def __init__(self, code: grpc.StatusCode, details: str, address: str) -> None:
        self.code = code
        self.details = details
        self.address = address
        super().__init__(f"{code.name}: {details}")

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
        if self.connection_failed:
            return f"cannot reach the Switchboard server at {self.address} ({self.details[:120]})"
        return f"{self.code.name}: {self.details}"


def from_rpc_error(error: grpc.RpcError, address: str) -> SwitchboardError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return SwitchboardError(code or grpc.StatusCode.UNKNOWN, " ".join(str(details).split()),
                            address)
