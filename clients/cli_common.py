"""What every client command shares: connection flags, output, exit codes.

Exit codes: 0 on success, the gRPC status number on a failed call (INVALID_ARGUMENT 3,
NOT_FOUND 5, PERMISSION_DENIED 7, RESOURCE_EXHAUSTED 8, FAILED_PRECONDITION 9,
UNAVAILABLE 14, UNAUTHENTICATED 16, ...), 2 on a usage error. Failures print one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

from clients.client import DEFAULT_TARGET, SwitchboardClient
from clients.errors import SwitchboardError
from clients.retry import RetryPolicy


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--target", default=os.environ.get("SWITCHBOARD_TARGET", DEFAULT_TARGET),
                       help="server address host:port (env SWITCHBOARD_TARGET; "
                            f"default {DEFAULT_TARGET})")
    group.add_argument("--api-key", default=os.environ.get("SWITCHBOARD_API_KEY"),
                       help="API key (env SWITCHBOARD_API_KEY)")
    group.add_argument("--admin-key", default=os.environ.get("SWITCHBOARD_ADMIN_KEY"),
                       help="admin key for admin commands (env SWITCHBOARD_ADMIN_KEY)")
    group.add_argument("--tls-root-cert", default=os.environ.get("SWITCHBOARD_TLS_ROOT_CERT"),
                       help="PEM root certificate: connect with TLS")
    group.add_argument("--timeout", type=float, default=120.0,
                       help="deadline per call in seconds, retries included (default 120)")
    group.add_argument("--retries", type=int, default=3,
                       help="retries for UNAVAILABLE / queue full (default 3; a server "
                            "still starting is waited for within --timeout; 0: none)")


def connect(args: argparse.Namespace) -> SwitchboardClient:
    return SwitchboardClient(args.target, api_key=args.api_key, admin_key=args.admin_key,
                             root_certificate=args.tls_root_cert, timeout=args.timeout,
                             retry=RetryPolicy(max_attempts=max(1, args.retries + 1)))


def run(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; a failed call becomes one line on stderr and its exit code."""
    try:
        return main(args)
    except SwitchboardError as error:
        print(f"error: {error.one_line()}", file=sys.stderr)
        return error.exit_code
    except OSError as error:  # e.g. an unreadable certificate file
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def to_json(value: Any) -> str:
    def plain(item: Any) -> Any:
        if is_dataclass(item) and not isinstance(item, type):
            return asdict(item)
        if isinstance(item, list):
            return [plain(i) for i in item]
        return item
    return json.dumps(plain(value), ensure_ascii=False, indent=2)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
