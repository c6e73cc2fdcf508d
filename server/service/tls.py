"""TLS for both front-ends, and the rules that keep keys off the network in clear.

One certificate (``tls_cert``/``tls_key``) serves the gRPC port and the HTTP API alike:
with it configured, neither speaks plaintext. :func:`plain_http_refusal` is the guard
that keeps it so for any caller of the HTTP server (the single server, the cluster's
ingress): plain HTTP on a network address while TLS is configured is refused, with one
line that says why. Loopback stays allowed (a local sidecar, a test), as it never
crosses a network. Without TLS, keys on a network address are only warned about
(:func:`cleartext_warning`): a proxy or mesh may terminate TLS in front of the server.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate chain and private key, read and checked once at start."""

    cert: bytes
    key: bytes
    context: ssl.SSLContext
    """A server context holding them (TLS 1.2 or later), for the HTTP API."""

    @classmethod
    def of(cls, settings: Any) -> TlsFiles | None:
        """The configured files (None without ``tls_cert``); an OSError of one line
        names the setting whose file cannot be read or used."""
        if not settings.tls_cert:
            return None
        cert_path, key_path = settings.resolve(settings.tls_cert), \
            settings.resolve(settings.tls_key)
        contents = []
        for name, path in (("tls_cert", cert_path), ("tls_key", key_path)):
            try:
                contents.append(path.read_bytes())
            except OSError as exc:
                raise OSError(f"setting {name}: {path} cannot be read: {exc.strerror}") from None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(cert_path, key_path)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
            raise OSError(f"settings tls_cert and tls_key cannot be used together "
                          f"({cert_path.name}, {key_path.name}): {reason}") from None
        return cls(contents[0], contents[1], context)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address to bind) is reachable from this machine only.
    A name other than ``localhost`` counts as a network address: it may resolve to one."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def plain_http_refusal(settings: Any, host: str, port: int) -> str | None:
    """Why plain HTTP may not be served on ``host:port`` (None: it may)."""
    if settings.tls_cert and not is_loopback(host):
        return (f"refusing plain HTTP on {host}:{port}: tls_cert is set, so the HTTP API "
                "must be served with TLS too (API keys would cross the network in clear)")
    return None


def cleartext_warning(settings: Any) -> str | None:
    """A warning when keys are configured, the host is a network address and TLS is
    off: every key then crosses the network in clear unless a proxy terminates TLS."""
    if settings.tls_cert or is_loopback(settings.host):
        return None
    if not (settings.api_keys or settings.admin_key):
        return None
    return (f"API keys are configured but TLS is not, on network address {settings.host}: "
            "keys cross the network in clear unless a proxy in front terminates TLS "
            "(set tls_cert and tls_key)")
