"""Ctrl-C and SIGTERM as KeyboardInterrupt, never where the standard library holds a lock by hand.

Python raises a signal handler's exception at whatever step the main thread is at. Inside the standard
library's own lock handling that leaves a lock half-held: raised as `Condition.wait` takes its lock back, the
`with` around it releases an unlocked lock ("RuntimeError: release unlocked lock" instead of a clean stop: seen
in CI, serve's main loop in `queue.get`); raised in a `with`'s `__enter__` after the lock is taken, it is never
released; in `queue.get`, the item just taken is lost; raised as `Popen.poll` holds its wait lock, every later
`wait` on that child hangs. There the signal is kept and sent again by a thread of its own (tripped by the
handler itself, the handler would run again at once, inside itself), until it comes at a step outside. A main
thread blocked for good inside such a step (a deadlock in the standard library's lock handling) is past
Ctrl-C's reach, as a frame cannot tell a blocked acquire from a taken one.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import queue
import signal
import subprocess
import threading
import time
from types import FrameType
from typing import Iterator, Optional

# Blocking calls of the standard library that hold no lock by hand (the last waits for threads at exit): an
# interrupt there must still end them.
WAITS = frozenset({"Event.wait", "Condition.wait_for", "Thread.join", "Thread._wait_for_tstate_lock", "_shutdown"})
# A child reaped but its status not yet kept: interrupted there, its exit status is lost.
REAPING = frozenset({"Popen._internal_poll", "Popen._handle_exitstatus"})
RETRIP_SECONDS = 0.005


def holds_lock_by_hand(frame: FrameType) -> bool:
    """Whether the main thread is at a step where an exception would leave a lock of the standard library
    half-held (or a reaped child's status unkept)."""
    code = frame.f_code
    name, where = code.co_qualname, code.co_filename
    line = linecache.getline(where, frame.f_lineno)
    if not line:  # no source to tell by: as Python itself would
        return False
    if where == subprocess.__file__:
        return (name in REAPING or (name == "Popen._wait" and "_waitpid_lock.acquire(False)" in line)
                or (name == "Popen._try_wait" and frame.f_locals.get("wait_flags") == os.WNOHANG))
    if where == threading.__file__:
        # blocked for its waiter, `Condition.wait` is given its lock back by its `finally`
        return "waiter.acquire" not in line if name == "Condition.wait" else name not in WAITS
    return where == queue.__file__


class Interrupts:
    """The SIGINT and SIGTERM handler while a command runs (`handled`)."""

    def __init__(self) -> None:
        self.kept: queue.SimpleQueue[Optional[int]] = queue.SimpleQueue()  # in C: no lock to be caught in
        self.main = threading.main_thread().ident or 0
        self.closing = False
        self.tripper = threading.Thread(target=self._trip_again, daemon=True, name="interrupts")
        self.tripper.start()

    def __call__(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.closing or (frame is not None and (holds_lock_by_hand(frame) or self._inside_itself(frame))):
            self.kept.put(signum)
            return
        raise KeyboardInterrupt

    @staticmethod
    def _inside_itself(frame: Optional[FrameType]) -> bool:
        """A second signal while the handler runs: raised there, it would leave through the first one's step."""
        while frame is not None:
            if frame.f_code is Interrupts.__call__.__code__:
                return True
            frame = frame.f_back
        return False

    def _trip_again(self) -> None:
        """The signal again, a real one: it also ends a blocking call the main thread went on to (a flag alone
        would wait for its timeout). The pause keeps a main thread blocked in held code from spinning."""
        while (signum := self.kept.get()) is not None:
            time.sleep(RETRIP_SECONDS)
            signal.pthread_kill(self.main, signum)

    def close(self) -> None:
        """No trip after this: a signal that comes meanwhile, or is still kept, is raised here, where no lock is
        held (raised before the tripper ended, one it still held would come after the handlers before are back)."""
        self.closing = True
        self.kept.put(None)
        self.tripper.join()  # its last signal is taken (and kept) before this returns
        self.closing = False
        if not self.kept.empty():
            raise KeyboardInterrupt


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """SIGTERM (what supervisors and `kill` send) and Ctrl-C as KeyboardInterrupt, so every command cleans up the
    same way: child processes stopped, partial files marked or removed. Ctrl-C stays ignored where it was; the
    handlers before are put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = Interrupts()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, handler)
        if before[0] is signal.default_int_handler:
            signal.signal(signal.SIGINT, handler)
        yield
    finally:
        try:
            handler.close()
        finally:
            for signum, previous in zip((signal.SIGINT, signal.SIGTERM), before):
                if previous is not None:  # None: set outside Python, left as it is
                    signal.signal(signum, previous)
