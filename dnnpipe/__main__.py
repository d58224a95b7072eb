"""`python -m dnnpipe COMMAND`: every tool of the toolkit behind one entry point."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .cli import SUBCOMMANDS
from .console import run_command


def chosen(argv: Sequence[str]) -> Optional[str]:
    """The command argv names (argparse says so if it names none or one that is not there)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser for argv: every command is listed, but only the chosen one's module is imported."""
    parser = argparse.ArgumentParser(prog="python -m dnnpipe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = chosen(argv)
    for name, subcommand in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=subcommand.help, description=subcommand.help)
        if name == wanted:
            add_arguments, run = subcommand.load()
            add_arguments(sub)
            sub.set_defaults(run=run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def parse_and_run(_: argparse.Namespace) -> int:  # interrupted while its module (TensorFlow) loads: one line
        args = build_parser(argv).parse_args(argv)
        return int(args.run(args))

    return run_command(parse_and_run, argparse.Namespace(), f"dnnpipe {chosen(argv) or ''}".strip())


if __name__ == "__main__":
    sys.exit(main())
