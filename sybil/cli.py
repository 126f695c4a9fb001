"""What every command line here shares: one-line errors and exit status 2 for bad input."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from sybil.errors import SybilError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse's default also prints usage)."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """Parse argv and run; a SybilError becomes its message on one line and status 2."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except SybilError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. piped into head
        return 0
