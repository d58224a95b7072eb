"""What every command shares: user errors as one line and an exit status, never a traceback."""

from __future__ import annotations

import _thread
import argparse
import contextlib
import linecache
import math
import queue
import signal
import subprocess
import sys
import threading
from types import FrameType
from typing import Callable, Iterator, Optional, Sequence

from .errors import DnnpipeError, printable

Command = Callable[[argparse.Namespace], int]


# Blocking calls of the standard library that hold no lock by hand (the last waits for threads at exit): an
# interrupt there must still end them.
_WAITS = frozenset({"Event.wait", "Condition.wait_for", "Thread.join", "Thread._wait_for_tstate_lock", "_shutdown"})


def _holds_lock_by_hand(frame: FrameType) -> bool:
    """Whether the main thread is where an exception would leave a lock of the standard library half-held.

    Raised as `Condition.wait` takes its lock back, the `with` around it releases an unlocked lock
    ("RuntimeError: release unlocked lock" instead of a clean stop: seen in CI); raised in a `with`'s
    `__enter__` after the lock is taken, it is never released; in `queue.get`, the item just taken is lost;
    raised as `Popen.poll` holds its wait lock, every later `wait` on that child hangs.
    """
    code = frame.f_code
    name, where = code.co_qualname, code.co_filename
    line = linecache.getline(where, frame.f_lineno)
    if not line:  # no source to tell by: as Python itself would
        return False
    if where == subprocess.__file__:
        return name == "Popen._internal_poll" or (name == "Popen._wait" and "sleep(" not in line)
    if where == threading.__file__:
        # blocked for its waiter the lock is given back by its `finally`
        return "waiter.acquire" not in line if name == "Condition.wait" else name not in _WAITS
    return where == queue.__file__


def _interrupt(signum: int, frame: Optional[FrameType]) -> None:
    """Ctrl-C or SIGTERM as KeyboardInterrupt, but never while the standard library holds a lock half-way.

    There the signal is tripped again: its handler runs at the next step, and raises at the first step outside.
    """
    if frame is not None and _holds_lock_by_hand(frame):
        _thread.interrupt_main(signal.Signals(signum))
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts() -> Iterator[None]:
    """SIGTERM (what supervisors and `kill` send) and Ctrl-C as KeyboardInterrupt while a command runs, so every
    command cleans up the same way: child processes stopped, partial files marked or removed. Ctrl-C stays
    ignored where it was; the handlers before are put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt)
    if before[0] is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        yield
    finally:
        for signum, handler in zip((signal.SIGINT, signal.SIGTERM), before):
            if handler is not None:  # None: set outside Python, left as it is
                signal.signal(signum, handler)


def run_command(command: Command, args: argparse.Namespace, prog: str) -> int:
    """Run a command; user errors become one line on stderr and a non-zero exit, never a traceback."""
    try:
        with interrupts():
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
