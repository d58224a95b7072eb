"""What every command shares: user errors as one line and an exit status, never a traceback."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Optional, Sequence

from .errors import DnnpipeError, printable
from .interrupts import handled

Command = Callable[[argparse.Namespace], int]


def run_command(command: Command, args: argparse.Namespace, prog: str) -> int:
    """Run a command; user errors become one line on stderr and a non-zero exit, never a traceback. SIGTERM is
    handled like Ctrl-C (`interrupts.handled`)."""
    try:
        with handled():
            return command(args)
    except DnnpipeError as e:
        print(f"{prog}: error: {printable(str(e))}", file=sys.stderr)  # may quote a peer
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def script_main(parser: argparse.ArgumentParser, command: Command, argv: Optional[Sequence[str]] = None) -> int:
    """A top-level script: parse, run, and turn errors into one line."""
    return run_command(command, parser.parse_args(argv), parser.prog)


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value
