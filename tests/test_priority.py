"""runtime/priority.py: background work runs at the lowest priority on a thread of its own, and the caller's
thread keeps its priority (on Linux a nice value is per thread and, without privilege, cannot be lowered again)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from dnnpipe.runtime.priority import LOWEST_PRIORITY, in_background, lower_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


def own_priority() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_background_work_runs_lowered_and_the_caller_keeps_its_priority():
    before = own_priority()
    assert before < LOWEST_PRIORITY
    seen = in_background(lambda: (own_priority(), threading.current_thread().name), "first invoke")
    assert seen == (LOWEST_PRIORITY, "first invoke")
    assert own_priority() == before


def test_background_work_raises_in_the_caller():
    def fails() -> None:
        raise ValueError("the sub-model does not run")

    with pytest.raises(ValueError, match="does not run"):
        in_background(fails, "first invoke")


def test_a_thread_lowered_by_its_id_and_an_ended_one_ignored():
    ready, done = threading.Event(), threading.Event()
    ids: list[int] = []

    def body() -> None:
        ids.append(threading.get_native_id())
        ready.set()
        done.wait(5)

    thread = threading.Thread(target=body)
    thread.start()
    ready.wait(5)
    lower_thread(ids[0])
    assert os.getpriority(os.PRIO_PROCESS, ids[0]) == LOWEST_PRIORITY
    done.set()
    thread.join()
    lower_thread(ids[0])  # ended: nothing happens, nothing is raised
