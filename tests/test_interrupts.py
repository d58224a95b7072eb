"""An interrupt is a clean stop, never a lock of the standard library left half-held."""

from __future__ import annotations

import linecache
import queue
import signal
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import Callable, Iterator

import pytest

from dnnpipe import interrupts
from dnnpipe.interrupts import Interrupts, handled, holds_lock_by_hand

STDLIB = (threading.__file__, queue.__file__, subprocess.__file__)
SECONDS = 10


def decisions(action: Callable[[], object]) -> dict[tuple[str, str], bool]:
    """Run `action` traced: at every line of the standard library's lock code it runs, whether an interrupt
    there would be held back, by (function, line text)."""
    seen: dict[tuple[str, str], bool] = {}

    def trace(frame: FrameType, event: str, arg: object):
        if frame.f_code.co_filename not in STDLIB:
            return None
        if event == "line":
            text = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            seen[frame.f_code.co_qualname, text] = holds_lock_by_hand(frame)
        return trace

    before = sys.gettrace()
    sys.settrace(trace)
    try:
        action()
    finally:
        sys.settrace(before)
    return seen


def at(seen: dict[tuple[str, str], bool], function: str, text: str) -> list[bool]:
    found = [held for (name, line), held in seen.items() if name == function and text in line]
    assert found, f"{function}: no line with {text!r} ran"
    return found


@pytest.mark.parametrize("lock", [threading.Lock, threading.RLock])
def test_a_timed_out_get_is_interrupted_only_where_no_lock_is_half_held(lock):
    waiting = queue.Queue()
    waiting.mutex = lock()  # the queue's condition over either kind of lock
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
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    seen = decisions(lambda: (child.poll(), pytest.raises(subprocess.TimeoutExpired, child.wait, 0.05)))
    child.stdin.close()  # now it ends
    assert all(at(seen, "Popen._internal_poll", ""))
    assert at(seen, "Popen._wait", "_waitpid_lock.acquire(False)") == [True]
    assert at(seen, "Popen._wait", "time.sleep") == [False]
    assert all(at(seen, "Popen._try_wait", ""))  # reaping without blocking
    seen = decisions(child.wait)
    assert not any(at(seen, "Popen._try_wait", "waitpid"))  # blocked until the child ends
    assert all(at(seen, "Popen._handle_exitstatus", ""))


def test_code_outside_the_standard_librarys_lock_code_is_interrupted():
    assert not holds_lock_by_hand(sys._getframe())


@pytest.fixture
def handler() -> Iterator[Interrupts]:
    """The handler installed for SIGINT, as a command has it; pytest's put back after."""
    with handled():
        installed = signal.getsignal(signal.SIGINT)
        assert isinstance(installed, Interrupts)
        yield installed


def test_a_signal_as_condition_wait_takes_its_lock_back_is_raised_after_it_has(handler):
    """The failure seen in CI, made certain: the main thread in `queue.get`, woken, blocked taking the queue's
    lock back while another thread holds it, is sent SIGINT. Raised there, its `with` released the other thread's
    lock ("release unlocked lock"); now it is raised once the lock is back and given up in order."""
    items: queue.Queue[int] = queue.Queue()
    main = threading.main_thread().ident
    failed: list[BaseException] = []

    def main_in(function: str) -> None:
        """Until the main thread is in `function` of the queue's condition (not of `Thread.start`'s)."""
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline:
            frame = sys._current_frames()[main]
            if frame.f_code.co_qualname == function and frame.f_locals.get("self") is items.not_empty:
                return
            time.sleep(0.001)
        raise AssertionError(f"the main thread never came to {function}")

    def put_holding_the_lock() -> None:
        try:
            main_in("Condition.wait")  # waiting for an item, the lock given up
            with items.mutex:
                items._put(1)
                items.not_empty.notify()
                main_in("Condition._acquire_restore")  # woken, blocked taking the lock back
                signal.pthread_kill(main, signal.SIGINT)
                time.sleep(0.1)  # the main thread handles it while blocked for the lock
        except BaseException as e:  # noqa: BLE001 (a "release unlocked lock" here is the failure)
            failed.append(e)

    other = threading.Thread(target=put_holding_the_lock)
    with pytest.raises(KeyboardInterrupt) as raised:
        other.start()
        items.get(timeout=SECONDS)
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline:  # the kept signal comes at the first step outside
            time.sleep(0.001)
    other.join(SECONDS)
    assert not failed and not items.mutex.locked()
    assert "_acquire_restore" not in [entry.name for entry in raised.traceback]


@pytest.fixture
def idle() -> Interrupts:
    """A handler not installed, its tripper ended: what it keeps stays in its queue."""
    handler = Interrupts()
    handler.close()
    handler.kept = queue.SimpleQueue()
    return handler


def kept(handler: Interrupts) -> list[int]:
    return [handler.kept.get_nowait() for _ in range(handler.kept.qsize())]


def test_a_signal_inside_the_handler_is_kept_not_raised_through_it(idle, monkeypatch):
    handler = idle

    def nested() -> None:  # the frame a second signal finds while the handler is at work
        handler(signal.SIGTERM, sys._getframe())

    def holds_lock_by_hand(frame: FrameType) -> bool:  # the first signal's step is held; the second's would not be
        if frame.f_code is nested.__code__:
            return False
        nested()
        return True

    monkeypatch.setattr(interrupts, "holds_lock_by_hand", holds_lock_by_hand)
    try:
        handler(signal.SIGINT, sys._getframe())
    except KeyboardInterrupt:  # (uncaught, it would stop the whole test session)
        pytest.fail("the second signal was raised through the first one's handler")
    assert kept(handler) == [signal.SIGTERM, signal.SIGINT]


def test_a_kept_signal_ends_a_blocking_wait_the_main_thread_went_on_to(handler):
    """Sent again as a real signal: a flag alone would be seen only when the wait timed out."""
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        handler.kept.put(signal.SIGINT)  # as the handler keeps one
        threading.Event().wait(SECONDS)
    assert time.monotonic() - began < SECONDS / 2


def test_a_signal_while_the_command_ends_is_kept_not_raised(idle):
    idle.closing = True
    idle(signal.SIGTERM, sys._getframe())  # outside any lock, yet kept: the tripper may still send one
    assert kept(idle) == [signal.SIGTERM]


def test_a_signal_kept_when_the_command_ends_is_raised_there():
    with pytest.raises(KeyboardInterrupt):
        with handled():
            handler = signal.getsignal(signal.SIGTERM)
            handler.kept.put(None)  # its tripper ends first: as if the trip had not come yet
            handler.tripper.join(SECONDS)
            handler.kept.put(signal.SIGTERM)


@pytest.mark.parametrize("inherited", [signal.default_int_handler, signal.SIG_IGN])
def test_ctrl_c_is_handled_unless_it_was_ignored_and_the_handlers_are_put_back(inherited):
    before = signal.signal(signal.SIGINT, inherited), signal.getsignal(signal.SIGTERM)
    try:
        with handled():
            during = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        assert isinstance(during[1], Interrupts)
        assert during[0] is during[1] if inherited is signal.default_int_handler else during[0] is signal.SIG_IGN
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (inherited, before[1])
        assert not during[1].tripper.is_alive()
    finally:
        signal.signal(signal.SIGINT, before[0])
