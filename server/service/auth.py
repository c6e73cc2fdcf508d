"""API keys: ``authorization: Bearer <key>`` metadata, compared in constant time.

* ``api_keys`` set: generation needs one of them (or the admin key). Empty: open.
* ``admin_key`` set: admin rpcs need it; a valid generation key gets PERMISSION_DENIED.
  Empty: admin rpcs follow the generation rule, so configuring only API keys never
  leaves the admin rpcs open to anyone.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from server.errors import PermissionDenied, Unauthenticated


def authorization_header(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The ``authorization`` value among gRPC metadata, if any."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return None


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _matches(token: str, keys: Iterable[str]) -> bool:
    # Check every key, so timing does not reveal which (if any) prefix matched.
    found = False
    for key in keys:
        if key and hmac.compare_digest(token.encode(), key.encode()):
            found = True
    return found


class KeyChecker:
    def __init__(self, api_keys: Iterable[str], admin_key: str) -> None:
        self.api_keys = tuple(k for k in api_keys if k)
        self.admin_key = admin_key

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None, *, admin: bool) -> None:
        """Return if the call may proceed; raise Unauthenticated / PermissionDenied."""
        token = bearer_token(metadata)
        generation_keys = (*self.api_keys, self.admin_key) if self.admin_key else self.api_keys
        if admin and self.admin_key:
            if token is not None and _matches(token, [self.admin_key]):
                return
            if token is not None and _matches(token, self.api_keys):
                raise PermissionDenied("this rpc needs the admin key")
            raise Unauthenticated("missing or unknown admin key "
                                  "(metadata 'authorization: Bearer <key>')")
        if not self.api_keys:
            return
        if token is None or not _matches(token, generation_keys):
            raise Unauthenticated("missing or unknown API key "
                                  "(metadata 'authorization: Bearer <key>')")
