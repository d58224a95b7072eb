"""runtime/stage.py's StageLoop alone: its three threads over real socket pairs with a tiny runner (no
interpreter, no processes, no TensorFlow); the whole stage process is tests/test_runtime.py's."""

import os
import socket
import sys
import threading
import time
from typing import Optional

import h5py
import numpy as np
import pytest

from dnnpipe.manifest import StageSpec, TensorSpec
from dnnpipe.protocol import Kind, PeerError
from dnnpipe.runtime.metrics import summarise
from dnnpipe.runtime.stage import DeviceTurn, StageLoop
from dnnpipe.runtime.transport import Downstream, Upstream

IN = TensorSpec("x", "x", (1, 3), "float32")
OUT = TensorSpec("y", "y", (1, 3), "float32")
SPEC = StageSpec(2, 2, (2, 3), "stage_2.tflite", "0" * 64, (IN,), (OUT,))
NAME = "[stage 2]"
SECONDS = 20  # a deadline on every wait: a broken loop fails the test, never hangs it


def double(buffers):
    return [buffers[0] * 2]


class Links:
    """The loop's upstream and downstream, each a socket pair: the test is both neighbours."""

    def __init__(self, loop: StageLoop):
        up_near, up_far = socket.socketpair()
        down_near, down_far = socket.socketpair()
        self.sockets = [up_near, up_far, down_near, down_far]
        loop.upstream = Upstream(up_near, "the previous stage", SPEC.inputs, SECONDS)
        loop.downstream = Downstream(down_near, "the next stage", SPEC.outputs, SECONDS)
        self.previous = Downstream(up_far, NAME, SPEC.inputs, SECONDS)  # what stage 1 would send
        self.following = Upstream(down_far, NAME, SPEC.outputs, SECONDS)  # what stage 3 would read

    def close(self):
        for sock in self.sockets:
            sock.close()


def running(loop: StageLoop, source, sink) -> threading.Thread:
    thread = threading.Thread(target=loop.run, args=(source, sink), daemon=True)
    thread.start()
    return thread


@pytest.fixture
def relay():
    """A middle stage: receive, infer, send."""
    loop = StageLoop(NAME, SPEC, double, queue_size=2, say=lambda line: None)
    links = Links(loop)
    thread = running(loop, loop.receive, loop.send)
    yield loop, links, thread
    loop.abort("test over")
    thread.join(SECONDS)
    links.close()


def test_frames_pass_in_order_through_the_runner_and_the_end_follows(relay):
    loop, links, thread = relay
    inputs = [np.arange(3, dtype="float32").reshape(1, 3) + 10 * i for i in range(7)]  # more than the queues hold
    sender = threading.Thread(target=lambda: [links.previous.send(i, 1000 + i, [x]) for i, x in enumerate(inputs)]
                              + [links.previous.end(len(inputs))], daemon=True)
    sender.start()
    out = [np.empty((1, 3), dtype="float32")]
    for i, x in enumerate(inputs):
        frame = links.following.read(out)
        assert (frame.kind, frame.sequence, frame.origin_ns) == (Kind.DATA, i, 1000 + i)
        np.testing.assert_array_equal(out[0], x * 2)
    assert links.following.read(out).kind == Kind.END
    sender.join(SECONDS)
    thread.join(SECONDS)
    assert not thread.is_alive() and loop.error is None
    assert loop.sent == len(inputs) and [t.sequence for t in loop.timings] == list(range(len(inputs)))


def test_a_runner_that_fails_stops_the_stage_and_tells_the_next(relay):
    loop, links, thread = relay
    loop.runner = lambda buffers: (_ for _ in ()).throw(RuntimeError("the delegate broke"))
    links.previous.send(0, 0, [np.ones((1, 3), dtype="float32")])
    with pytest.raises(PeerError, match=r"\[stage 2\] RuntimeError: the delegate broke"):
        links.following.read([np.empty((1, 3), dtype="float32")])
    thread.join(SECONDS)
    assert not thread.is_alive()
    assert loop.error == "[stage 2] RuntimeError: the delegate broke" and loop.sent == 0


def test_an_error_from_the_previous_stage_is_passed_on_as_it_is(relay):
    loop, links, thread = relay
    links.previous.send(0, 0, [np.ones((1, 3), dtype="float32")])
    links.previous.error(1, "[stage 1] input file vanished")
    out = [np.empty((1, 3), dtype="float32")]
    with pytest.raises(PeerError, match=r"\[stage 1\] input file vanished"):
        for _ in range(2):  # the frame before the error may pass or be dropped: the stage stops at once
            assert links.following.read(out).kind == Kind.DATA
    thread.join(SECONDS)
    assert not thread.is_alive() and "[stage 1] input file vanished" in (loop.error or "")


def test_a_frame_that_breaks_the_protocol_names_the_previous_stage(relay):
    loop, links, thread = relay
    links.sockets[1].sendall(b"not a frame at all, long enough for a header")
    thread.join(SECONDS)
    assert not thread.is_alive()
    assert loop.error is not None and loop.error.startswith("[stage 2]") and "the previous stage" in loop.error


def test_abort_wakes_a_stage_waiting_for_its_upstream(relay):
    loop, links, thread = relay
    loop.abort("role replaced")
    thread.join(SECONDS)
    assert not thread.is_alive() and loop.error == "role replaced"


def test_the_planned_time_is_recorded_and_a_new_pace_takes_effect(relay):
    loop, links, thread = relay
    out = [np.empty((1, 3), dtype="float32")]
    loop.pace_ms = 2.0
    links.previous.send(0, 0, [np.ones((1, 3), dtype="float32")])
    links.following.read(out)
    loop.pace_ms = 5.0  # as a controller's "pace" command sets it
    links.previous.send(1, 0, [np.ones((1, 3), dtype="float32")])
    links.following.read(out)
    links.previous.end(2)
    assert links.following.read(out).kind == Kind.END
    thread.join(SECONDS)
    assert [t.planned_ms for t in loop.timings] == [2.0, 5.0]


def test_a_first_and_last_stage_reads_its_inputs_and_writes_its_results(tmp_path):
    """Without links: the data file is the source, the results file the sink; the file says it is complete."""
    data = np.arange(12, dtype="float32").reshape(4, 3)
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["images"] = data
    loop = StageLoop("[stage 1]", SPEC, double, queue_size=2, say=lambda line: None)
    thread = running(loop, lambda: loop.read_inputs(tmp_path / "data.h5", 6),  # cycles through the 4 rows
                     lambda: loop.write_results(tmp_path / "out.h5"))
    thread.join(SECONDS)
    assert not thread.is_alive() and loop.error is None
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert bool(f.attrs["complete"])
        np.testing.assert_array_equal(f["y"][:], np.concatenate([data, data[:2]]) * 2)


def test_a_missing_data_file_fails_the_stage_with_its_name(tmp_path):
    loop = StageLoop("[stage 1]", SPEC, double, queue_size=2, say=lambda line: None)
    thread = running(loop, lambda: loop.read_inputs(tmp_path / "gone.h5", None),
                     lambda: loop.write_results(tmp_path / "out.h5"))
    thread.join(SECONDS)
    assert not thread.is_alive()
    assert loop.error is not None and loop.error.startswith("[stage 1]") and "gone.h5" in loop.error
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert not bool(f.attrs["complete"])  # a partial file says so


def test_an_interrupted_stage_writes_the_results_it_holds_and_says_they_are_partial(tmp_path, monkeypatch):
    """Ctrl-C: the sink writes what it was given before the process exits (results are kept a block at a time)."""
    import _thread

    from dnnpipe.interrupts import handled

    from dnnpipe.runtime import dataio

    closed, close = threading.Event(), dataio.ResultWriter.close

    def slow_close(writer, complete=False):  # a close that takes a while: run() must wait for it, not exit
        time.sleep(0.3)
        close(writer, complete)
        closed.set()

    monkeypatch.setattr(dataio.ResultWriter, "close", slow_close)

    data = np.arange(30, dtype="float32").reshape(10, 3)
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["images"] = data
    release, frames = threading.Event(), []

    def runner(buffers):
        frames.append(1)
        if len(frames) == 5:  # once the sink took the first four results: interrupt, and hold this frame
            deadline = time.monotonic() + SECONDS
            while len(loop.timings) < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            _thread.interrupt_main()
            release.wait(SECONDS)
        return double(buffers)

    loop = StageLoop("[stage 1]", SPEC, runner, queue_size=2, say=lambda line: None)
    try:
        with pytest.raises(KeyboardInterrupt), handled():  # Ctrl-C as a stage's command takes it
            loop.run(lambda: loop.read_inputs(tmp_path / "data.h5", None),
                     lambda: loop.write_results(tmp_path / "out.h5"))
        assert closed.is_set()  # the results file was closed before the interrupt went on
    finally:
        release.set()
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert not bool(f.attrs["complete"])
        np.testing.assert_array_equal(f["y"][:], data[:4] * 2)


def relay_frames(links: Links, thread: threading.Thread, frames: int) -> None:
    """Frames and END through a running relay, every result read, the relay finished."""
    for i in range(frames):
        links.previous.send(i, 0, [np.ones((1, 3), dtype="float32")])
    links.previous.end(frames)
    out = [np.empty((1, 3), dtype="float32")]
    while links.following.read(out).kind == Kind.DATA:
        pass
    thread.join(SECONDS)


def test_the_stage_counts_its_cpu_per_frame_and_the_inferences_share(relay):
    loop, links, thread = relay
    relay_frames(links, thread, 5)
    summary = summarise(2, loop.timings, False, loop.cpu_seconds)
    assert loop.cpu_seconds > 0 and summary.cpu_ms_per_frame == pytest.approx(loop.cpu_seconds * 1000 / 5)
    assert summary.inference_cpu_ms is not None and 0 <= summary.inference_cpu_ms <= summary.cpu_ms_per_frame
    assert summary.frame_cpu_ms == pytest.approx(summary.cpu_ms_per_frame - summary.inference_cpu_ms)
    assert "CPU" in summary.describe()


class Into:
    """A runner that writes into the result buffers itself (as StageRunner.into does)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, buffers):
        raise AssertionError("the loop must use into")

    def into(self, buffers, results):
        self.calls += 1
        np.multiply(buffers[0], 3, out=results[0])


def test_a_runner_with_into_fills_the_result_buffers_itself():
    runner = Into()
    loop = StageLoop(NAME, SPEC, runner, queue_size=2, say=lambda line: None)
    links = Links(loop)
    thread = running(loop, loop.receive, loop.send)
    try:
        links.previous.send(0, 0, [np.arange(3, dtype="float32").reshape(1, 3)])
        links.previous.end(1)
        out = [np.empty((1, 3), dtype="float32")]
        assert links.following.read(out).kind == Kind.DATA
        np.testing.assert_array_equal(out[0], [[0, 3, 6]])
        assert links.following.read(out).kind == Kind.END and runner.calls == 1
    finally:
        loop.abort("test over")
        thread.join(SECONDS)
        links.close()


def test_an_unpaced_stage_reports_no_pacing_however_its_threads_are_scheduled(relay):
    """Pacing is the sleep to a planned time; without a plan nothing is paced, even when the executor waits for
    the CPU after handing its input buffer back (a quota-limited board: the receive thread runs first)."""
    loop, links, thread = relay
    relay_frames(links, thread, 6)
    assert len(loop.timings) == 6 and all(t.emulation_ms == 0.0 and t.planned_ms == 0.0 for t in loop.timings)


def test_the_device_serves_the_oldest_plans_frame_first():
    """Two roles overlap on one device at a barrier: when the device comes free, a frame of the old plan (lower
    rank) goes before a frame of the new plan that waited longer; with no old frame waiting, the new one runs."""
    device = DeviceTurn()
    order: list[int] = []

    def frame(rank: int) -> None:
        with device.turn(rank):
            order.append(rank)

    def waiting(count: int) -> bool:
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline:
            with device.lock:
                if len(device._waiting) == count:
                    return True
            time.sleep(0.001)
        return False

    with device.turn(1):  # an old frame holds the device
        new = threading.Thread(target=frame, args=(2,))
        new.start()
        assert waiting(1)
        old = threading.Thread(target=frame, args=(1,))  # the next old frame comes after the new one
        old.start()
        assert waiting(2)
    for thread in (new, old):
        thread.join(SECONDS)
    assert order == [1, 2]
    frame(2)  # nothing older waits: the new plan's frame takes the free device at once
    assert order == [1, 2, 2] and not device._waiting


def test_the_device_is_held_only_for_a_frame_that_can_start():
    """The device is kept for a role's next frame only when one waits ahead of any END and a result buffer is
    free: otherwise (a drained role, or one backed up behind a slow neighbour) the other role would wait the
    hold out on every frame."""
    loop = StageLoop(NAME, SPEC, double, queue_size=2, say=lambda line: None)
    assert not loop._frame_ready()
    loop.inbox.put("a frame")
    assert loop._frame_ready()
    loop._end_inbox()
    assert loop._frame_ready()  # the frame is still ahead of END
    loop.inbox.get()
    assert not loop._frame_ready()  # only END is left
    backed_up = StageLoop(NAME, SPEC, double, queue_size=2, say=lambda line: None)
    backed_up.inbox.put("a frame")
    while not backed_up.output_buffers.empty():
        backed_up.output_buffers.get_nowait()
    assert not backed_up._frame_ready()


def test_a_role_cut_while_it_paces_gives_the_device_back_at_once(relay):
    """The rest of a dead role's paced frame is not the device's time: the role that replaces it starts at once."""
    loop, links, thread = relay
    loop.pace_ms = 60_000.0
    links.previous.send(0, 0, [np.ones((1, 3), dtype="float32")])
    deadline = time.monotonic() + SECONDS
    while loop.device.free_at < time.perf_counter() + 30 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert loop.device.free_at > time.perf_counter() + 30  # in its pacing sleep
    loop.abort("role replaced")
    thread.join(SECONDS)
    assert not thread.is_alive() and loop.device.free_at <= time.perf_counter()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread priorities by thread id are Linux's")
def test_a_role_cut_in_its_invoke_gives_the_device_back_and_finishes_at_its_own_priority(relay):
    """An invoke cannot be cut short: the aborted role's frame yields the device to the role that replaces it at
    once. It keeps its thread's priority: lowered, it would take Python's lock back at nice 19 when its invoke
    returned and could stall the new role's threads in the same process (runtime.priority)."""
    loop, links, thread = relay
    inside, release, finished = threading.Event(), threading.Event(), threading.Event()
    priorities: list[int] = []

    def invoke(buffers):
        inside.set()
        release.wait(SECONDS)
        priorities.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        finished.set()
        return [buffers[0] * 2]

    loop.runner = invoke
    links.previous.send(0, 0, [np.ones((1, 3), dtype="float32")])
    assert inside.wait(SECONDS)
    before = os.getpriority(os.PRIO_PROCESS, 0)
    loop.abort("role replaced")
    # the role that replaces it has the device at once, the cut frame still in its invoke
    new = StageLoop(NAME, SPEC, double, queue_size=2, say=lambda line: None, device=loop.device, rank=1)
    new_links = Links(new)
    new_thread = running(new, new.receive, new.send)
    try:
        new_links.previous.send(0, 0, [np.ones((1, 3), dtype="float32")])
        out = [np.empty((1, 3), dtype="float32")]
        assert new_links.following.read(out).kind == Kind.DATA and not finished.is_set()
        np.testing.assert_array_equal(out[0], 2 * np.ones((1, 3)))
    finally:
        release.set()
        new.abort("test over")
        new_thread.join(SECONDS)
        new_links.close()
    thread.join(SECONDS)
    assert not thread.is_alive() and priorities == [before]


def test_a_device_given_back_stays_the_next_frames_whatever_the_cut_frame_does_after():
    """A cut frame gives the device back while still in its invoke; when that invoke ends, its pacing, a second
    give-back and the end of its turn must leave the frame that took the device (and its clock) alone."""
    device = DeviceTurn()
    new_has_it, new_may_end = threading.Event(), threading.Event()
    entered: list[int] = []

    def frame(rank: int, hold: Optional[threading.Event] = None) -> None:
        with device.turn(rank) as holder:
            entered.append(rank)
            assert device.pace(holder, time.perf_counter() + 0.001)
            if hold is not None:
                new_has_it.set()
                hold.wait(SECONDS)

    new = threading.Thread(target=frame, args=(2, new_may_end), daemon=True)
    later = threading.Thread(target=frame, args=(3,), daemon=True)
    with device.turn(1) as old:
        assert device.pace(old, time.perf_counter() + 60)
        device.give_back(old)  # cut in its invoke
        assert device.free_at <= time.perf_counter()
        new.start()
        assert new_has_it.wait(SECONDS)
        clock = device.free_at
        assert not device.pace(old, time.perf_counter() + 60) and device.free_at == clock
        device.give_back(old)  # again, when its invoke ends: no effect
        later.start()
    time.sleep(0.1)
    assert entered == [2]  # the old frame's turn ended, but the new frame still has the device
    new_may_end.set()
    for thread in (new, later):
        thread.join(SECONDS)
    assert entered == [2, 3]
