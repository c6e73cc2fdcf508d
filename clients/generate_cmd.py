"""``switchboard generate``: one call, printed as text (or JSON), streamed if asked."""

from __future__ import annotations

import argparse
import sys

from clients.cli_common import add_connection_flags, connect, run, to_json
from clients.messages import GenerateResult, StreamChunk, parse_adapter_spec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchboard generate",
        description="Send what a caller said (wrapped in the routed adapter's template) or "
                    "a verbatim --prompt; print the answer.")
    parser.add_argument("text", nargs="?", help="the caller's utterance (sent as text)")
    parser.add_argument("--prompt", help="send this prompt verbatim instead of an utterance")
    parser.add_argument("--dialect", default="", help="adapter name, e.g. wuyu")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME[@SCALE]",
                        help="compose adapters on this call, e.g. --adapter wuyu "
                             "--adapter telecom_terms@0.6 (repeatable; not with --dialect)")
    parser.add_argument("--caller-number", default="", help="route by number, e.g. +862155551234")
    parser.add_argument("--region", default="", help="route by region, e.g. CN-GD or HK")
    parser.add_argument("--weight-scale", type=float, help="adapter strength (default: manifest)")
    parser.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="0 is greedy (the default)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--request-id", default="")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")
    add_connection_flags(parser)
    return parser


def summary(result: GenerateResult) -> str:
    adapter = f"{result.adapter} {result.adapter_version[:8]}" if result.adapter else "base"
    if len(result.adapters) > 1:
        adapter = " + ".join(f"{a.name}@{a.weight_scale:g} {a.version[:8]}"
                             for a in result.adapters)
    route = result.route + (f" {result.route_detail}" if result.route_detail else "")
    replica = f" · replica {result.replica}" if result.replica else ""
    line = (f"[{adapter} · {route} · {result.completion_tokens} tokens, {result.finish_reason}"
            f" · {result.total_ms:.0f} ms{replica}]")
    if result.fallback_reason:
        line += f" fallback: {result.fallback_reason}"
    return line


def _generate(args: argparse.Namespace) -> int:
    options = dict(prompt=args.prompt, dialect=args.dialect, caller_number=args.caller_number,
                   region=args.region, weight_scale=args.weight_scale,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k,
                   repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                   request_id=args.request_id, adapters=args.adapter)
    with connect(args) as client:
        if not args.stream:
            result = client.generate(args.text, **options)
            print(to_json(result) if args.json else result.text)
        else:
            final: GenerateResult | None = None
            for item in client.stream(args.text, **options):
                if isinstance(item, StreamChunk):
                    if not args.json:
                        sys.stdout.write(item.text)
                        sys.stdout.flush()
                else:
                    final = item
            assert final is not None
            result = final
            print(to_json(result) if args.json else "")
    if not args.json:
        print(summary(result), file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv[1:])
    if (args.text is None) == (args.prompt is None):
        parser.error("give either an utterance or --prompt")
    for spec in args.adapter:
        try:
            parse_adapter_spec(spec)
        except ValueError as exc:
            parser.error(str(exc))
    return run(_generate, args)
