"""Background work at the lowest CPU priority, so the stream's processes take a busy core first.

Only a process of its own is lowered (serve's cutting process): it shares no lock with the stream. A thread of a
process that runs the stream is never lowered, not even for a step that releases Python's lock (an interpreter's
invoke): the step takes the lock again to return, and a thread at nice 19 that the kernel preempts while it holds
the lock stalls every thread of its process while the host runs others. Measured on the 2-core machine with four
busy processes beside it: a thread at nice 19 that hashes (releasing the lock) stalled a 3 ms ticker of its
process by 129-426 ms in every round, at nice 0 by 7-11 ms (`benchmarks/priority.py`).
"""

from __future__ import annotations

import os

LOWEST_PRIORITY = 19  # the nice value of background work


def lower_this_process() -> None:
    """A process of background work, lowered first thing in its main(): on Linux this lowers the calling thread,
    and the threads it starts after inherit it (threads an import started, idle, keep theirs); elsewhere the whole
    process. Not allowed: it only runs sooner."""
    if hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, 0, LOWEST_PRIORITY)
        except OSError:
            pass
