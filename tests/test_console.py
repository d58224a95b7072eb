"""What every command shares: an interrupt is a clean stop, never a lock left half-held."""

from __future__ import annotations

import _thread
import argparse
import linecache
import queue
import signal
import subprocess
import sys
import threading
from types import FrameType
from typing import Callable, Iterator

import pytest

from dnnpipe import console
from dnnpipe.__main__ import main
from dnnpipe.cli import SUBCOMMANDS, Subcommand

STDLIB = (threading.__file__, queue.__file__, subprocess.__file__)


def decisions(action: Callable[[], object]) -> dict[tuple[str, str], bool]:
    """Run `action` traced: at every line of the standard library's lock code it runs, whether an interrupt
    there would be held back, by (function, line text)."""
    seen: dict[tuple[str, str], bool] = {}

    def trace(frame: FrameType, event: str, arg: object):
        if frame.f_code.co_filename not in STDLIB:
            return None
        if event == "line":
            text = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            seen[frame.f_code.co_qualname, text] = console._holds_lock_by_hand(frame)
        return trace

    sys.settrace(trace)
    try:
        action()
    finally:
        sys.settrace(None)
    return seen


def at(seen: dict[tuple[str, str], bool], function: str, text: str) -> list[bool]:
    found = [held for (name, line), held in seen.items() if name == function and text in line]
    assert found, f"{function}: no line with {text!r} ran"
    return found


@pytest.mark.parametrize("lock", [threading.Lock, threading.RLock])
def test_a_timed_out_get_is_interrupted_only_where_no_lock_is_half_held(lock):
    waiting = queue.Queue()
    waiting.mutex = lock()  # the queue's conditions over either kind of lock
    waiting.not_empty = threading.Condition(waiting.mutex)
    seen = decisions(lambda: pytest.raises(queue.Empty, waiting.get, timeout=0.001))
    assert at(seen, "Condition.wait", "waiter.acquire") == [False, False]  # before the lock is given, and blocked
    for text in ("_release_save()", "gotit = False", "_acquire_restore(saved_state)"):
        assert at(seen, "Condition.wait", text) == [True]
    assert all(at(seen, "Queue.get", ""))
    if lock is threading.Lock:  # an RLock's bookkeeping is in C
        assert all(at(seen, "Condition._acquire_restore", "")) and all(at(seen, "Condition.__exit__", ""))


def test_waiting_for_an_event_or_a_thread_is_interrupted():
    done = threading.Event()
    worker = threading.Thread(target=done.wait, args=(5,))
    seen = decisions(lambda: (worker.start(), done.set(), worker.join()))
    assert not any(at(seen, "Event.wait", "")) and not any(at(seen, "Thread.join", ""))
    assert all(at(seen, "Event.set", ""))  # under the condition's lock, taken by `with`


def test_reaping_a_child_by_hand_is_not_interrupted_but_waiting_for_it_is():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    seen = decisions(lambda: (child.poll(), pytest.raises(subprocess.TimeoutExpired, child.wait, 0.05)))
    child.wait()
    assert all(at(seen, "Popen._internal_poll", ""))
    assert at(seen, "Popen._wait", "_waitpid_lock.acquire(False)") == [True]
    assert at(seen, "Popen._wait", "time.sleep") == [False]


def test_code_outside_the_standard_librarys_lock_code_is_interrupted():
    assert not console._holds_lock_by_hand(sys._getframe())


@pytest.fixture
def tripped(monkeypatch) -> Iterator[list[int]]:
    signals: list[int] = []
    monkeypatch.setattr(_thread, "interrupt_main", signals.append)
    yield signals


def held_frame() -> FrameType:
    """A frame of `Condition._acquire_restore` (a plain lock's), where the CI failure was raised."""
    frames: list[FrameType] = []

    def record(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code.co_qualname == "Condition._acquire_restore":
            frames.append(frame)

    sys.setprofile(record)
    try:
        pytest.raises(queue.Empty, queue.Queue().get, timeout=0.001)
    finally:
        sys.setprofile(None)
    return frames[0]


def test_an_interrupt_held_back_is_tripped_again(tripped):
    console._interrupt(signal.SIGINT, held_frame())
    assert tripped == [signal.SIGINT]
    with pytest.raises(KeyboardInterrupt):
        console._interrupt(signal.SIGTERM, sys._getframe())
    with pytest.raises(KeyboardInterrupt):
        console._interrupt(signal.SIGTERM, None)
    assert tripped == [signal.SIGINT]


@pytest.fixture
def sigint() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_interrupt_held_back_is_raised_at_the_first_step_outside(sigint):
    signal.signal(signal.SIGINT, console._interrupt)
    frame = held_frame()
    with pytest.raises(KeyboardInterrupt):
        console._interrupt(signal.SIGINT, frame)
        for _ in range(1000):
            pass


@pytest.mark.parametrize("inherited", [signal.default_int_handler, signal.SIG_IGN])
def test_a_command_handles_sigint_and_sigterm_unless_ctrl_c_was_ignored_and_puts_them_back(inherited, sigint):
    signal.signal(signal.SIGINT, inherited)
    before = signal.getsignal(signal.SIGTERM)
    during: list[object] = []

    def command(args: argparse.Namespace) -> int:
        during.extend((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
        return 0

    assert console.run_command(command, argparse.Namespace(), "test") == 0
    assert during == [console._interrupt if inherited is signal.default_int_handler else signal.SIG_IGN,
                      console._interrupt]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (inherited, before)


def test_an_interrupted_command_says_so_and_exits_130(capsys):
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    assert console.run_command(interrupted, argparse.Namespace(), "test") == 130
    assert capsys.readouterr().err == "test: interrupted\n"


class Loading(Subcommand):
    def load(self):
        raise KeyboardInterrupt  # as if Ctrl-C came while the command's module imports TensorFlow


def test_an_interrupt_while_a_command_loads_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(SUBCOMMANDS, "demo", Loading(**vars(SUBCOMMANDS["demo"])))
    assert main(["demo", "--help"]) == 130
    assert capsys.readouterr().err == "dnnpipe demo: interrupted\n"
