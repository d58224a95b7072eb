"""What every command shares: user errors as one line and an exit status, never a traceback."""

from __future__ import annotations

import _thread
import argparse
import math
import queue
import signal
import sys
import threading
from types import FrameType
from typing import Callable, Optional, Sequence

from .errors import DnnpipeError, printable

Command = Callable[[argparse.Namespace], int]


# Code where an exception raised by a signal handler can leave a lock half-held: raised as `Condition.wait` takes
# its lock back, the `with` around it releases an unlocked lock ("RuntimeError: release unlocked lock" instead of
# a clean stop: seen in CI); raised in a `with`'s `__enter__` after the lock is taken, it is never released; in
# `queue.get`, the item just taken is lost.
_LOCK_CODE = frozenset({threading.__file__, queue.__file__})
# ... except where the standard library blocks, which an interrupt must still end, and which restores its lock.
_BLOCKING = frozenset({"wait", "wait_for", "join", "_wait_for_tstate_lock"})


def _interrupt(signum: int, frame: Optional[FrameType]) -> None:
    """Ctrl-C or SIGTERM as KeyboardInterrupt, but never while the standard library holds a lock half-way.

    There the signal is tripped again: its handler runs at the next step, and raises at the first step outside.
    """
    code = frame.f_code if frame is not None else None
    if code is not None and code.co_filename in _LOCK_CODE and code.co_name not in _BLOCKING:
        _thread.interrupt_main(signal.Signals(signum))
        return
    raise KeyboardInterrupt


def run_command(command: Command, args: argparse.Namespace, prog: str) -> int:
    """Run a command; user errors become one line on stderr and a non-zero exit, never a traceback.

    SIGTERM (what supervisors and `kill` send) is handled like Ctrl-C, so every command cleans up the same
    way: child processes stopped, partial files marked or removed. Ctrl-C stays ignored where it was.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _interrupt)
    try:
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
