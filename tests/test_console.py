"""What every command shares: an interrupt is a clean stop, never a lock left half-held."""

from __future__ import annotations

import _thread
import argparse
import queue
import signal
import sys
import threading
from types import FrameType
from typing import Iterator

import pytest

from dnnpipe import console


def frames_of(action) -> dict[str, FrameType]:
    """The frames of the standard library's lock code that `action` runs, by function name."""
    seen: dict[str, FrameType] = {}

    def record(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code.co_filename in (threading.__file__, queue.__file__):
            seen.setdefault(frame.f_code.co_name, frame)

    sys.setprofile(record)
    try:
        action()
    finally:
        sys.setprofile(None)
    return seen


@pytest.fixture
def lock_frames() -> dict[str, FrameType]:
    """A timed-out `queue.get`: the frames of `Condition.wait` taking its lock back and of the queue."""
    frames = frames_of(lambda: pytest.raises(queue.Empty, queue.Queue().get, timeout=0.001))
    assert {"get", "wait", "_acquire_restore", "__exit__"} <= set(frames)
    return frames


@pytest.fixture
def tripped(monkeypatch) -> Iterator[list[int]]:
    signals: list[int] = []
    monkeypatch.setattr(_thread, "interrupt_main", signals.append)
    yield signals


@pytest.fixture
def handlers() -> Iterator[None]:
    """run_command installs its handlers for good: put back pytest's."""
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGINT, previous[0])
    signal.signal(signal.SIGTERM, previous[1])


@pytest.mark.parametrize("where", ["_acquire_restore", "__exit__", "get"])
def test_an_interrupt_in_lock_code_is_held_back_and_tripped_again(lock_frames, tripped, where):
    console._interrupt(signal.SIGINT, lock_frames[where])  # raised here, the lock would be left half-held
    assert tripped == [signal.SIGINT]


def test_an_interrupt_ends_a_blocking_wait_and_code_outside_lock_code(lock_frames, tripped):
    for frame in (lock_frames["wait"], sys._getframe(), None):
        with pytest.raises(KeyboardInterrupt):
            console._interrupt(signal.SIGTERM, frame)
    assert tripped == []


def test_an_interrupt_held_back_is_raised_at_the_first_step_outside(lock_frames, handlers):
    signal.signal(signal.SIGINT, console._interrupt)
    with pytest.raises(KeyboardInterrupt):
        console._interrupt(signal.SIGINT, lock_frames["_acquire_restore"])
        for _ in range(1000):
            pass


@pytest.mark.parametrize("inherited", [signal.default_int_handler, signal.SIG_IGN])
def test_a_command_handles_sigint_and_sigterm_unless_ctrl_c_was_ignored(inherited, handlers):
    signal.signal(signal.SIGINT, inherited)
    assert console.run_command(lambda args: 0, argparse.Namespace(), "test") == 0
    assert signal.getsignal(signal.SIGTERM) is console._interrupt
    expected = console._interrupt if inherited is signal.default_int_handler else signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is expected


def test_an_interrupted_command_says_so_and_exits_130(handlers, capsys):
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    assert console.run_command(interrupted, argparse.Namespace(), "test") == 130
    assert capsys.readouterr().err == "test: interrupted\n"
