"""runtime/priority.py: a process of background work lowers itself, and only itself; a process that runs the
stream is batch work, with every thread it starts."""

from __future__ import annotations

import os
import sys

import pytest

from dnnpipe.runtime.priority import LOWEST_PRIORITY
from helpers import POLICY_VISIBLE, run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="per-thread nice values and scheduling policies are Linux's")

CHILD = """
import os, threading
from dnnpipe.runtime.priority import lower_this_process
lower_this_process()
seen = []
started = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
started.start()
started.join()
print(os.getpriority(os.PRIO_PROCESS, 0), seen[0])
"""


@pytest.mark.skipif(sys.platform.startswith("linux") and os.getpriority(os.PRIO_PROCESS, 0) >= LOWEST_PRIORITY,
                    reason="the tests run at the lowest priority already: nothing could be seen lowered")
def test_a_background_process_is_lowered_with_the_threads_it_starts_and_its_parent_keeps_its_priority():
    before = os.getpriority(os.PRIO_PROCESS, 0)
    done = run_python(CHILD)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(LOWEST_PRIORITY)] * 2
    assert os.getpriority(os.PRIO_PROCESS, 0) == before


BATCH_CHILD = """
import os, threading
from dnnpipe.runtime.priority import run_as_batch_work
before = os.sched_getscheduler(0)
run_as_batch_work()
seen = []
started = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(threading.get_native_id())))
started.start()
started.join()
print(before, os.sched_getscheduler(0), seen[0], os.getpriority(os.PRIO_PROCESS, 0))
"""


@pytest.mark.skipif(not POLICY_VISIBLE, reason="the tests run under another scheduling policy: no change to see")
def test_a_process_that_runs_the_stream_is_batch_work_with_the_threads_it_starts_and_keeps_its_nice_value():
    done = run_python(BATCH_CHILD)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(os.SCHED_OTHER), *[str(os.SCHED_BATCH)] * 2,
                                   str(os.getpriority(os.PRIO_PROCESS, 0))]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


CHOSEN_CHILD = """
import os
from dnnpipe.runtime.priority import run_as_batch_work
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # as `chrt -i 0` would start it
run_as_batch_work()
print(os.sched_getscheduler(0))
"""


def test_a_policy_chosen_by_whoever_started_the_process_is_kept():
    done = run_python(CHOSEN_CHILD)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(os.SCHED_IDLE)]
