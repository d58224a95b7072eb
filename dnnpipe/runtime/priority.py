"""How the kernel schedules a process: the stream's processes as batch work, background work at the lowest priority.

A process that runs the stream on a board (a stage, an agent, the profiling timer that measures what they will
pay) runs under SCHED_BATCH: a thread of it that wakes (its receive thread when a cut arrives, its send thread
when a result is ready) waits for the running thread's time slice instead of preempting it in the middle of an
invoke. On a board of one core each such preemption is a context switch and caches refilled in the invoke, pure
loss to a stage whose throughput is its CPU per frame; the woken thread's work waits in the socket's buffer
meanwhile. On the virtual fleet, where emulated boards share a host core, the boards' processes no longer preempt
one another on each wake-up either (a real board has its cores to itself). Measured on the fleet (tiny model,
TLS, the paper's cluster, nine demo runs of one plan each way, interleaved): the pipeline at 75-92% of its
prediction (median 85%) against 71-90% (median 79%) (README, "Stages as batch work").
Every thread of such a process has the same policy, so none holds Python's lock at a disadvantage.

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
    none (not Linux) or it is refused, the process runs as it would have."""
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_BATCH"):
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError:
            pass
