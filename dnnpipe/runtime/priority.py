"""Background work at the lowest CPU priority, so the stream's own threads take a busy core first.

Preparing ahead (cutting a sub-model, a loaded sub-model's first invoke) must not take the cores from the frames
that run meanwhile: on a 2-core host the cutting process and an agent's first invoke held the cores while every
stage waited its turn. On Linux a nice value is a thread's own (a thread id given to setpriority names that
thread) and without privilege it can only be raised: what is lowered stays lowered, so only threads whose every
step may wait are lowered. Work that holds Python's lock (building an interpreter) is not: lowered, it would
keep the lock while the host ran others, and the stream's threads wait for that lock.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Callable, TypeVar

LOWEST_PRIORITY = 19  # the nice value of background work
T = TypeVar("T")


def lower_thread(thread_id: int) -> None:
    """The thread (its native id) to the lowest priority; elsewhere than Linux a thread id given as a process id
    could name another process, and there it stays as it is."""
    if sys.platform.startswith("linux"):
        _lowest(thread_id)


def lower_this_process() -> None:
    """A process of background work, lowered first thing in its main(): on Linux this lowers the calling thread,
    and the threads it starts after inherit it (threads an import started, idle, keep theirs); elsewhere the whole
    process."""
    if hasattr(os, "setpriority"):
        _lowest(0)


def _lowest(who: int) -> None:
    """Not allowed, or ended meanwhile: it only runs sooner."""
    try:
        os.setpriority(os.PRIO_PROCESS, who, LOWEST_PRIORITY)
    except OSError:
        pass


def in_background(call: Callable[[], T], name: str) -> T:
    """call()'s value, computed on a thread of its own at the lowest priority (the caller's keeps its own)."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        lower_thread(threading.get_native_id())
        try:
            outcome.append(call())
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            failure.append(e)

    thread = threading.Thread(target=body, name=name, daemon=True)
    try:
        thread.start()
    except RuntimeError:  # no thread to be had (a board's limit): the work is done all the same, at this priority
        return call()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
