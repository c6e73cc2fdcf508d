"""``switchboard adapters list|load|unload|reload`` and ``switchboard health``."""

from __future__ import annotations

import argparse

from clients.cli_common import add_connection_flags, connect, run, table, to_json
from clients.messages import AdapterStatus


def _show(statuses: list[AdapterStatus], as_json: bool) -> None:
    if as_json:
        print(to_json(statuses))
        return
    rows = [(s.name, s.version[:12] or "-", s.rank or "-", s.tier, s.pinned, s.requests_served,
             f"{s.load_ms:.1f}" if s.load_ms is not None else "-", ",".join(s.targets) or "-",
             s.error[:60]) for s in statuses]
    print(table(("NAME", "VERSION", "RANK", "TIER", "PINNED", "SERVED", "LOAD_MS", "TARGETS",
                 "ERROR"), rows))


def _adapters(args: argparse.Namespace) -> int:
    with connect(args) as client:
        if args.action == "list":
            _show(client.list_adapters(), args.json)
        elif args.action == "load":
            _show([client.load_adapter(args.name)], args.json)
        elif args.action == "unload":
            _show([client.unload_adapter(args.name)], args.json)
        else:
            _show([client.reload_adapter(args.name, args.version)], args.json)
    return 0


def adapters_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="switchboard adapters",
                                     description="Inspect and manage the server's adapters "
                                                 "(admin rpcs: need the admin key if set).")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="every adapter: version, rank, tier, use")
    for action, text in (("load", "load into host memory now"),
                         ("unload", "evict from device and host memory"),
                         ("reload", "load the folder again, or roll back with --version")):
        command = sub.add_parser(action, help=text)
        command.add_argument("name", help="adapter name")
        if action == "reload":
            command.add_argument("--version", help="roll back to this kept version")
    for command in sub.choices.values():
        command.add_argument("--json", action="store_true")
        add_connection_flags(command)
    return run(_adapters, parser.parse_args(argv[1:]))


WAIT_DEFAULT_S = 120.0


def _health(args: argparse.Namespace) -> int:
    with connect(args) as client:
        if args.wait is None:
            status = client.health(args.service)
        else:
            status = client.wait_serving(args.wait, args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def health_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="switchboard health",
        description="The server's grpc.health.v1 status; exit 0 when SERVING, 1 otherwise "
                    "(the status number if the server cannot be asked, e.g. 14 unreachable).")
    parser.add_argument("--service", default="", help="one service (default: the server)")
    parser.add_argument("--wait", nargs="?", type=float, const=WAIT_DEFAULT_S, metavar="SECONDS",
                        help="wait until SERVING, up to SECONDS (default "
                             f"{WAIT_DEFAULT_S:g}), through a port not yet open and the "
                             "model load: for scripts, e.g. after starting `make serve`")
    add_connection_flags(parser)
    args = parser.parse_args(argv[1:])
    if args.wait is not None and args.wait < 0:
        parser.error(f"--wait must be >= 0 seconds, got {args.wait:g}")
    args.retries = 0 if args.retries == 3 else args.retries  # health answers now, not later
    return run(_health, args)
