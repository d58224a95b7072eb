"""`python -m dnnpipe COMMAND`: every tool of the toolkit behind one entry point."""

from __future__ import annotations

import argparse
import sys

from .cli import SUBCOMMANDS
from .console import run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dnnpipe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, run, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    args = parser.parse_args(argv)
    return run_command(args.run, args, f"dnnpipe {args.command}")


if __name__ == "__main__":
    sys.exit(main())
