"""runtime/priority.py: background work runs at the lowest priority on a thread of its own, and the caller's
thread keeps its priority (on Linux a nice value is per thread and, without privilege, cannot be lowered again)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from dnnpipe.runtime.priority import LOWEST_PRIORITY, in_background, lower_thread

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's"),
    pytest.mark.skipif(os.getpriority(os.PRIO_PROCESS, 0) >= LOWEST_PRIORITY,
                       reason="the tests run at the lowest priority already: nothing could be seen lowered"),
]


def own_priority() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_background_work_runs_lowered_and_the_caller_keeps_its_priority():
    before = own_priority()
    seen = in_background(lambda: (own_priority(), threading.current_thread().name), "first invoke")
    assert seen == (LOWEST_PRIORITY, "first invoke")
    assert own_priority() == before


def test_background_work_raises_in_the_caller():
    def fails() -> None:
        raise ValueError("the sub-model does not run")

    with pytest.raises(ValueError, match="does not run"):
        in_background(fails, "first invoke")


def test_without_a_thread_to_be_had_the_work_is_done_at_the_callers_priority(monkeypatch):
    def no_thread(self) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    before = own_priority()
    assert in_background(own_priority, "first invoke") == before


def test_a_thread_is_lowered_by_its_id():
    ready, done = threading.Event(), threading.Event()
    ids: list[int] = []

    def body() -> None:
        ids.append(threading.get_native_id())
        ready.set()
        done.wait(5)

    thread = threading.Thread(target=body)
    thread.start()
    try:
        assert ready.wait(5)
        lower_thread(ids[0])
        assert os.getpriority(os.PRIO_PROCESS, ids[0]) == LOWEST_PRIORITY
        assert own_priority() < LOWEST_PRIORITY
    finally:
        done.set()
        thread.join()
