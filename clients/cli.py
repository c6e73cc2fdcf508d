"""The ``switchboard`` command.

One entry point; each command group lives in its own module and is imported only when
that command runs. So the client commands never import torch or server code, and a
slow import (transformers) is paid only by the commands that need it.
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    module: str
    summary: str


COMMANDS: dict[str, Command] = {
    "serve": Command("server.serve_cmd",
                     "run the server: gRPC and the OpenAI-compatible HTTP API "
                     "(server/config.yaml)"),
    "generate": Command("clients.generate_cmd", "send an utterance (or --prompt), print it"),
    "adapters": Command("clients.admin_cmd:adapters_main",
                        "list, load, unload or reload adapters (admin)"),
    "health": Command("clients.admin_cmd:health_main",
                      "the server's health status (--wait: until SERVING)"),
    "train": Command("trainer.cli", "train, evaluate and publish an adapter (YAML + CSV)"),
    "callcenter": Command("clients.callcenter", "route a CSV of calls by caller number (demo)"),
    "loadtest": Command("clients.loadtest", "drive a server with concurrent clients"),
    "model": Command("server.cli", "prepare (convert and cache) or inspect the base model"),
    "manifest": Command("server.cli", "validate an adapter's switchboard.json manifest"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: switchboard COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "Run `switchboard COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name = args[0]
    if name not in COMMANDS:
        print(
            f"error: unknown command {name!r} (valid: {', '.join(COMMANDS)})", file=sys.stderr
        )
        return 2
    module_name, _, function = COMMANDS[name].module.partition(":")
    module = importlib.import_module(module_name)
    return int(getattr(module, function or "main")(args))


if __name__ == "__main__":
    raise SystemExit(main())
