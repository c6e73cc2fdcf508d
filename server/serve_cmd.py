"""``switchboard serve``: the command line over both ways to serve.

It parses the flags, loads the configuration, then runs the single server
(``service.app.serve``) or, with ``--cluster``, the Ray Serve cluster
(``cluster.launcher.run``), and ends the process. It sits above ``server.service`` and
``server.cluster`` so that the cluster depends on the service and never the reverse; the
cluster (and Ray) is imported only when ``--cluster`` asks for it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path

from server.errors import SwitchboardError
from server.service.app import serve
from server.service.config import DEFAULT_CONFIG_PATH, load_config, parse_assignments
from server.service.logs import configure_logging

log = logging.getLogger("switchboard.server")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchboard serve",
        description="Run the Switchboard server: the gRPC API (port), the OpenAI-compatible "
                    "HTTP API under /v1 (http_port) and Prometheus metrics (metrics_port); "
                    "settings: server/config.yaml.")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG_PATH),
                        help="YAML settings file (default: server/config.yaml)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="gRPC port (0: a free one)")
    parser.add_argument("--metrics-port", type=int, help="metrics port (-1: off)")
    parser.add_argument("--http-port", type=int,
                        help="OpenAI-compatible HTTP API port (0: a free one; -1: off)")
    parser.add_argument("--base-model", help="default, a .gguf file or an HF folder")
    parser.add_argument("--quantize", help="none, int8 or nf4")
    parser.add_argument("--device", help="auto, cpu or cuda")
    parser.add_argument("--adapters", action="append", dest="adapter_roots",
                        help="adapter root folder (repeatable)")
    parser.add_argument("--routing-table", help="routing table YAML")
    parser.add_argument("--log-json", action="store_true", default=None,
                        help="one JSON object per log line")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any setting, e.g. --set engine.max_loras=16 (repeatable)")
    cluster = parser.add_argument_group(
        "cluster", "scale-out on Ray Serve (pip install 'switchboard[cluster]'; "
        "docs/cluster.md); settings under cluster: in the config file")
    cluster.add_argument("--cluster", action="store_true",
                         help="serve through replicas on a Ray cluster")
    cluster.add_argument("--address", help="Ray cluster to join: auto or HOST:PORT "
                         "(default: start a local one)")
    cluster.add_argument("--replicas", type=int, help="replicas of the base model")
    return parser


def main(argv: list[str]) -> int:
    """``switchboard serve ...``: ``argv`` starts with the command name (dispatch table)."""
    args = build_parser().parse_args(argv[1:])
    try:
        overrides = parse_assignments(args.set)
        for key in ("host", "port", "metrics_port", "http_port", "base_model", "quantize", "device",
                    "adapter_roots", "routing_table", "log_json"):
            value = getattr(args, key)
            if value is not None:
                overrides[key] = value
        for key in ("address", "replicas"):
            value = getattr(args, key)
            if value is not None:
                overrides.setdefault("cluster", {})[key] = value
        config = load_config(Path(args.config), overrides)
    except SwitchboardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_json, config.log_level)
    log.info("configuration", extra={"fields": {"config": config.public_dict()}})
    code = 1
    try:
        if args.cluster:
            from server.cluster.launcher import run as run_cluster

            code = run_cluster(config)
        else:
            code = asyncio.run(serve(config))
    except SwitchboardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except (OSError, RuntimeError) as exc:  # e.g. the port is taken, a TLS file is missing
        print(f"error: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
        code = 2
    except BaseException:
        log.exception("the server failed")
    finally:
        exit_process(code)
    return code  # not reached


def exit_process(code: int) -> None:
    """End the process now that the server has stopped and its logs are flushed.

    A worker thread blocked for ever (an adapter load reading a file on a hung disk)
    would otherwise keep the interpreter waiting at exit: ``concurrent.futures`` joins
    its workers then, daemon or not.
    """
    with contextlib.suppress(Exception):  # e.g. a closed pipe: exit all the same
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
