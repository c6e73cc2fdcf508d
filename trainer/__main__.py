"""``python -m trainer --config FILE``."""

import sys

from trainer.cli import main

raise SystemExit(main(["train", *sys.argv[1:]]))
