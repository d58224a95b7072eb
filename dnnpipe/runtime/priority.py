"""How the kernel schedules a process: the stream's processes as batch work, background work at the lowest priority.

A process that runs the stream on a board (a stage, an agent, the profiling timer that measures what they will
pay) runs under SCHED_BATCH: a thread of it that wakes (its receive thread when a cut arrives, its send thread
when a result is ready) waits for the running thread's time slice instead of preempting it in the middle of an
invoke; the woken thread's work waits in the socket's buffer meanwhile. On the virtual fleet, whose emulated boards
share host cores, the bottleneck stage's execute thread had been switched out 5 times a frame, 2 with this (what
the quota's throttling takes), and the pipeline reached a larger share of its prediction (interleaved rounds of
demo runs: medians 84% and 90% against 75% and 79%; README, "Stages as batch work"). That measurement does not
tell the board's own threads from the other boards sharing its core; on a real board of one core the saving is
the first part only (fewer switches and caches refilled mid-invoke), inferred, not measured. Threads an import
started (idle pools) keep their policy; the threads that run frames all share one, so none holds Python's lock
at a disadvantage. A policy chosen by whoever started the process (`chrt`) is kept.

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


def run_as_batch_work() -> None:
    """A process that runs the stream, first thing in its main() (before it starts a thread: on Linux the policy
    is the calling thread's, and the threads it starts inherit it). Any user may choose SCHED_BATCH; where there is
    none (not Linux), it is refused, or the process was started under another policy than the default, the
    process runs as it would have."""
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_BATCH"):
        try:
            if os.sched_getscheduler(0) == os.SCHED_OTHER:
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError:
            pass
