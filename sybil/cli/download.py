"""python -m sybil.download NAME [NAME ...]: fetch preset checkpoints into weights/<name>/.

Only model.safetensors and config.json are fetched, each checked against the hash the
Hub lists (sybil.weights.download).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sybil.cli.common import OneLineParser, run_cli
from sybil.model.config import PRESETS
from sybil.weights.download import default_weights_dir, download_preset


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m sybil.download", description="Fetch GPT-2 preset checkpoints into weights/<name>/.")
    p.add_argument("names", nargs="+", metavar="NAME", help=f"presets: {', '.join(PRESETS)}")
    p.add_argument("--dir", type=Path, default=None, help="weights folder (default: weights/)")
    return p


def run(args: argparse.Namespace) -> int:
    for name in args.names:
        print(f"{name}: {download_preset(name, args.dir or default_weights_dir())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
