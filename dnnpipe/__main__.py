"""`python -m dnnpipe COMMAND`: every tool of the toolkit behind one entry point."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .cli import SUBCOMMANDS
from .console import run_command


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser for argv: every command is listed, but only the chosen one's module is imported."""
    parser = argparse.ArgumentParser(prog="python -m dnnpipe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, subcommand in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=subcommand.help, description=subcommand.help)
        if name == chosen:
            add_arguments, run = subcommand.load()
            add_arguments(sub)
            sub.set_defaults(run=run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    return run_command(args.run, args, f"dnnpipe {args.command}")


if __name__ == "__main__":
    sys.exit(main())
