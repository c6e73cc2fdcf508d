"""``switchboard train`` / ``python -m trainer`` / ``make train ADAPTER=wuyu``."""

from __future__ import annotations

import argparse
import logging
import sys

from server.errors import SwitchboardError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchboard train",
        description="Train a LoRA adapter from one YAML config and a text,label CSV, "
                    "evaluate it and publish it into <publish_root>/<name>/ (publish_root: "
                    "./adapters unless the config sets it).")
    parser.add_argument("--config", required=True, help="training config (YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set epochs=3 (repeatable)")
    parser.add_argument("--force", action="store_true",
                        help="publish even if validation chrF is below the base model's or "
                             "the published version's")
    parser.add_argument("--no-publish", action="store_true", help="train and evaluate only")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str]) -> int:
    """``argv`` starts with the command name (the dispatch table's convention)."""
    args = build_parser().parse_args(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from trainer.config import load_train_config
    from trainer.plan import plan_run

    try:
        # The config and the data are checked before torch is imported (trainer.plan).
        config = load_train_config(args.config, args.set)
        plan = plan_run(config, publish=not args.no_publish)
        print(f"switchboard train: {plan.describe(config.name)}", flush=True)
        from trainer.run import summary_table, train

        result = train(config, plan, force=args.force, quiet=args.quiet)
    except SwitchboardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_table(result.metrics))
    print(f"adapter: {result.adapter_dir}  (metrics.json, loss.png in {result.output_dir})")
    if result.published is not None:
        print(result.published.message)
        # The published version again (an unchanged config, retrained) is not a failure.
        if not result.published.published and not result.published.unchanged:
            return 3
    return 0
