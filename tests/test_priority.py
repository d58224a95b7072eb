"""runtime/priority.py: a process of background work lowers itself, and only itself."""

from __future__ import annotations

import os
import sys

import pytest

from dnnpipe.runtime.priority import LOWEST_PRIORITY
from helpers import run_python

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's"),
    pytest.mark.skipif(sys.platform.startswith("linux") and os.getpriority(os.PRIO_PROCESS, 0) >= LOWEST_PRIORITY,
                       reason="the tests run at the lowest priority already: nothing could be seen lowered"),
]

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


def test_a_background_process_is_lowered_with_the_threads_it_starts_and_its_parent_keeps_its_priority():
    before = os.getpriority(os.PRIO_PROCESS, 0)
    done = run_python(CHILD)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(LOWEST_PRIORITY)] * 2
    assert os.getpriority(os.PRIO_PROCESS, 0) == before
