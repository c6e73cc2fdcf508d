"""Local commands that work on files, not on a running server.

``switchboard model prepare|info`` and ``switchboard manifest check``. Every domain
error is printed as one ``error: ...`` line with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from server.errors import SwitchboardError

Handler = Callable[[argparse.Namespace], int]


def _print_table(rows: list[tuple[str, object]]) -> None:
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _cmd_model_prepare(args: argparse.Namespace) -> int:
    from server.basemodel.gguf_cache import prepare_gguf
    from server.basemodel.source import resolve_source

    resolved = resolve_source(args.source)
    if resolved.kind == "hf":
        print(f"{resolved.path} is an HF model folder: nothing to convert")
        return 0
    prepared = prepare_gguf(resolved.path)
    state = "hit" if prepared.cache_hit else f"miss (converted in {prepared.convert_seconds:.1f} s)"
    _print_table(
        [
            ("model path", prepared.path),
            ("source", resolved.path),
            ("source digest", prepared.source_digest),
            ("cache", state),
        ]
    )
    return 0


def _cmd_model_info(args: argparse.Namespace) -> int:
    from server.basemodel import load_base_model

    loaded = load_base_model(
        args.source, device=args.device, dtype=args.dtype, quantize=args.quantize
    )
    info = asdict(loaded.info)
    info["base_fingerprint"] = loaded.base_fingerprint
    from server.engine.config import EngineConfig
    from server.engine.engine import choose_decode_path

    info["decode_path"] = choose_decode_path(loaded.model, args.decode or EngineConfig.decode,
                                             args.gemm or EngineConfig.gemm)[1]
    if args.perplexity:
        from server.basemodel.quality import perplexity

        info["perplexity"] = round(perplexity(loaded.model, loaded.tokenizer), 3)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cache = {True: "hit", False: "miss (converted now)", None: "n/a (HF folder)"}
    rows: list[tuple[str, object]] = [
        ("source", info["source"]),
        ("model path", info["model_path"]),
        ("source digest", info["source_digest"] or "n/a"),
        ("cache", cache[info["cache_hit"]]),
        ("device", info["device"]),
        ("dtype", info["dtype"]),
        ("quantization", info["quantize"]),
        ("parameters", f"{info['num_parameters']:,}"),
        ("memory", f"{info['memory_bytes'] / 2**20:.1f} MiB"),
        ("load time", f"{info['load_seconds']:.2f} s"),
        ("base fingerprint", info["base_fingerprint"]),
        ("decode path", info["decode_path"]),
    ]
    if args.perplexity:
        rows.append(("perplexity", info["perplexity"]))
    _print_table(rows)
    return 0


def _cmd_manifest_check(args: argparse.Namespace) -> int:
    from server.formats.manifest import (
        MANIFEST_FILE,
        adapter_version,
        read_manifest,
        verify_weight_files,
    )

    path = Path(args.path)
    manifest = read_manifest(path)
    folder = path if path.is_dir() else path.parent
    verify_weight_files(folder, manifest)
    _print_table(
        [
            ("manifest", folder / MANIFEST_FILE),
            ("name", manifest.name),
            ("dialect", manifest.dialect or "-"),
            ("default weight scale", manifest.default_weight_scale),
            ("base fingerprint", manifest.base_fingerprint),
            ("version", adapter_version(folder)),
            ("weight files", "match the manifest"),
        ]
    )
    return 0


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source", default="default", help="'default', a .gguf file or an HF model folder"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchboard")
    groups = parser.add_subparsers(dest="group", required=True)

    model = groups.add_parser("model", help="prepare or inspect the base model")
    model_cmds = model.add_subparsers(dest="command", required=True)
    prepare = model_cmds.add_parser("prepare", help="convert a GGUF once into the cache")
    _add_model_options(prepare)
    prepare.set_defaults(handler=_cmd_model_prepare)
    info = model_cmds.add_parser("info", help="load the base model and describe it")
    _add_model_options(info)
    info.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    info.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    info.add_argument("--quantize", default="none", help="none, int8 or nf4")
    info.add_argument("--decode", default=None, choices=("fused", "eager", "compiled"),
                      help="the engine.decode setting to check (default: the engine's)")
    info.add_argument("--gemm", default=None, choices=("auto", "onednn", "aten"),
                      help="the engine.gemm setting to check (default: the engine's)")
    info.add_argument("--perplexity", action="store_true", help="also measure perplexity")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(handler=_cmd_model_info)

    manifest = groups.add_parser("manifest", help="adapter manifest tools")
    manifest_cmds = manifest.add_subparsers(dest="command", required=True)
    check = manifest_cmds.add_parser("check", help="validate switchboard.json and its files")
    check.add_argument("path", help="an adapter folder or its switchboard.json")
    check.set_defaults(handler=_cmd_manifest_check)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except SwitchboardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
