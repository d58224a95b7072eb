"""One pipeline stage's schedule: receive (or read inputs), infer, send (or write results).

Links to the neighbouring stages are dnnpipe.runtime.transport's; this module owns only the order of work.
Three threads joined by queues bounded by fixed pools of tensor buffers: when a later stage is
slow, its sender blocks, the queues fill, the receiver stops reading and TCP pushes back on the
stage before it, so memory stays bounded all along the pipeline. The stage's role comes from its
position in the manifest (first reads the data file, last writes results), never from its number.
"""

from __future__ import annotations

import gc
import math
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from ..errors import DnnpipeError
from ..interpreter import StageRunner
from ..manifest import MANIFEST_FILE, StageSpec, read_manifest, sha256_file
from ..pipeline_key import stage_key, tls_context
from ..protocol import Kind, PeerError
from .dataio import ResultWriter, input_datasets, read_inputs
from .metrics import FrameTiming, StageSummary, summarise, write_log
from .control import CONTROLLER, ControlLink
from .handshake import LinkAuth, manifest_identity
from .argv import Value
from .transport import Downstream, Say, Upstream, accept_upstream, connect_downstream, listen

POLL_SECONDS = 0.1
STOP_SECONDS = 2.0  # an interrupted stage waits this long for its threads (the sink writes the results it holds)
HOLD_SECONDS = 0.005  # how long a device is kept for the older role's next frame (DeviceTurn.turn)


@dataclass
class Work:
    """One frame on its way through a stage's threads: its tensors (pooled buffers) and what it cost."""

    sequence: int
    origin_ns: int
    buffers: list
    timing: FrameTiming
    queued: float = 0.0  # perf_counter when it was queued (the wait before the next thread took it)


@dataclass(frozen=True)
class EndOfStream:
    """The sentinel after the last frame, between the threads."""


END = EndOfStream()


class DeviceTurn:
    """What the stages one device runs at once share (an agent's old and new roles overlap at a barrier): one frame
    at a time, on the device's own clock, the oldest plan's first. The old plan's frames come before the barrier in
    the input sequence; served first, its results keep their pace while it drains and the new plan's frames take
    the device whenever the old role has none ready, so the new pipeline fills in the old one's idle moments.
    Taken in turns instead (whichever thread woke first), a slowed device spent every other frame on the new plan
    and the old plan's results, still due, came twice as far apart."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards free_at and the turns
        self.free_at = 0.0  # when the emulated device finished its previous frame
        self._changed = threading.Condition(self.lock)
        self._holder: Optional[object] = None  # the frame that has the device (a token), None when it is free
        self._waiting: list[int] = []  # the rank (plan generation) of each frame waiting for the device
        self._held: Optional[tuple[int, float]] = None  # (rank, until): kept for a role whose next frame is ready

    @contextmanager
    def turn(self, rank: int = 0, again: Callable[[], bool] = lambda: False) -> Iterator[object]:
        """The device, for one frame, once no frame of a lower rank waits for it. again(): whether this role has its
        next frame ready as this one ends; then the device is kept for it for up to HOLD_SECONDS, the moment its
        thread takes to come back (a waiting frame of a newer plan, already woken, would otherwise slip in)."""
        with self._changed:
            self._waiting.append(rank)
            try:
                while True:
                    held = self._held is not None and self._held[0] < rank and time.perf_counter() < self._held[1]
                    if not (self._holder is not None or held or min(self._waiting) < rank):
                        break
                    self._changed.wait(max(0.0, self._held[1] - time.perf_counter()) if held and self._held
                                       else None)
            except BaseException:
                self._waiting.remove(rank)
                self._changed.notify_all()  # a frame of a higher rank may have waited behind this one
                raise
            self._waiting.remove(rank)
            holder = self._holder = object()
            self._held = None
        try:
            yield holder
        finally:
            with self._changed:
                if self._holder is holder:  # (not given back already)
                    self._holder = None
                    if again():
                        self._held = (rank, time.perf_counter() + HOLD_SECONDS)
                self._changed.notify_all()

    def pace(self, holder: object, until: float) -> bool:
        """The frame's planned end on the device's clock, set only while the frame still has the device (False once
        it was given back: the clock is the next frame's then)."""
        with self._changed:
            if self._holder is not holder:
                return False
            self.free_at = until
            return True

    def give_back(self, holder: object) -> None:
        """The device free now, though the frame that had it is still in its invoke (a role cut after a loss: the
        interpreter cannot cancel one, so the frame finishes beside the next one)."""
        with self._changed:
            if self._holder is holder:
                self._holder = None
                self.free_at = min(self.free_at, time.perf_counter())
                self._changed.notify_all()


class StageFailed(DnnpipeError):
    """The stage stopped on an error; the message starts with the stage that failed first."""


@dataclass(frozen=True)
class RunOptions:
    """The options every stage of one run shares (the one source of them: StageOptions extends it); run-local
    passes them to each stage process."""

    num_inputs: Optional[int] = None
    fps: Optional[float] = None
    num_threads: Optional[int] = None
    delegate: Optional[str] = None
    timeout: float = 60.0
    connect_timeout: float = 60.0
    queue_size: int = 4
    key_file: Optional[Path] = None
    insecure: bool = False
    tls: bool = True  # links inside mutual TLS with pipeline.crt (off: --no-tls; both neighbours must agree)

    def flags(self) -> list[tuple[str, Value]]:
        """Each field as its stage flag (--num-inputs for num_inputs, ...); TLS is every stage's default, so only
        its absence is passed (--no-tls)."""
        return [("--no-tls", not self.tls and not self.insecure) if f.name == "tls" else
                (f"--{f.name.replace('_', '-')}", getattr(self, f.name)) for f in fields(RunOptions)]


@dataclass(frozen=True, kw_only=True)
class StageOptions(RunOptions):
    stage: int
    folder: Path  # model_path / model_name, holding manifest.json
    bind_addr: str = "0.0.0.0"
    bind_port: Optional[int] = None
    next_host: Optional[str] = None
    next_port: Optional[int] = None
    data_path: Optional[Path] = None
    output_path: Optional[Path] = None
    log_dir: Optional[Path] = None
    pace_ms: Optional[float] = None  # the emulated device's planned time for this stage: stage time = max(host, this)
    control_host: Optional[str] = None  # a controller (serve) to send heartbeats to and take commands from
    control_port: Optional[int] = None


class StageLoop:
    """The order of work of one stage over links and an interpreter already made: three threads joined by
    bounded queues. A Stage runs one for its whole life; a device agent runs one per role it is given."""

    def __init__(self, name: str, spec: StageSpec, runner: Callable, queue_size: int, say: Say = print,
                 pace_ms: Optional[float] = None, fps: Optional[float] = None, device: Optional[DeviceTurn] = None,
                 rank: int = 0):
        self.name, self.spec, self.runner, self.say = name, spec, runner, say
        self.device, self.rank = device or DeviceTurn(), rank  # rank: its plan's generation on a shared device
        self.queue_size, self.fps = queue_size, fps
        self.stop = threading.Event()
        self.error: Optional[str] = None
        self._lock = threading.Lock()
        # SimpleQueue (C) hand-offs: queue.Queue's Python locking cost a stage ~0.05 ms of CPU a frame (issue 27).
        # The pools bound them: a frame in either queue holds one of the pool's queue_size + 2 buffer sets.
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._end_queued = False  # END is in the inbox, behind any frames still there
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.input_buffers = self._pool(spec.inputs)
        self.output_buffers = self._pool(spec.outputs)
        self.timings: list[FrameTiming] = []
        self.upstream: Optional[Upstream] = None
        self.downstream: Optional[Downstream] = None
        self.pace_ms = pace_ms  # a controller may change it while running
        self.sent = 0
        # At the end of the stream: the generation the downstream link goes on as (a device agent's link that
        # stays across a switch), decided at that moment; None sends END.
        self.continue_as: Callable[[], Optional[int]] = lambda: None
        self.continued_as: Optional[int] = None
        self.cpu_seconds = 0.0  # the process's CPU time while run() ran (every thread: CPU per frame)
        self._turn: Optional[object] = None  # this role's hold of the device (DeviceTurn.give_back checks it still is)

    def _pool(self, specs) -> queue.SimpleQueue:
        pool: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self.queue_size + 2):
            pool.put([np.empty(spec.shape, dtype=spec.dtype) for spec in specs])
        return pool

    def run(self, source: Callable[[], None], sink: Callable[[], None]) -> None:
        """Until the end of the stream or the first failure (then `error` says why)."""
        threads = [self._thread(source), self._thread(self._execute), self._thread(sink)]
        began = time.process_time()
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(POLL_SECONDS)
        except KeyboardInterrupt:
            self.fail(f"{self.name} interrupted")
            deadline = time.monotonic() + STOP_SECONDS
            for thread in reversed(threads):  # the sink first: it writes the results it holds, marked partial
                thread.join(max(0.0, deadline - time.monotonic()))
            raise
        finally:
            self.cpu_seconds += time.process_time() - began

    def _thread(self, body: Callable[[], None]) -> threading.Thread:
        name = getattr(body, "func", body).__name__
        def guarded() -> None:
            try:
                body()
            except PeerError as e:  # already names the stage it came from
                self.fail(str(e))
            except DnnpipeError as e:  # transport errors name this stage already
                self.fail(str(e) if str(e).startswith(self.name) else f"{self.name} {e}")
            except Exception as e:  # noqa: BLE001 - any failure must stop the stage, not hang it
                self.fail(f"{self.name} {type(e).__name__}: {e}")

        return threading.Thread(target=guarded, name=f"{self.name} {name}", daemon=True)

    def fail(self, message: str) -> None:
        with self._lock:
            if self.error is None:
                self.error = message
        self.stop.set()
        if self.upstream is not None:
            self.upstream.shutdown()

    def abort(self, message: str) -> None:
        """Stop now, both links cut (an agent's role replaced after a device loss: nothing more is sent); the
        threads waiting on a queue are woken at once rather than at their next poll."""
        self.fail(message)
        turn = self._turn
        if turn is not None:
            self.device.give_back(turn)
        for box in (self.inbox, self.outbox, self.input_buffers, self.output_buffers):
            box.put_nowait(END)
        if self.downstream is not None:
            self.downstream.shutdown()

    def _end_inbox(self) -> None:
        self._end_queued = True
        self._put(self.inbox, END)

    def _frame_ready(self) -> bool:
        """Whether the next frame can start at once (the device is held for it): a frame in the inbox ahead of
        any END, and a result buffer free (a role backed up behind a slow neighbour cannot use the device)."""
        if self.stop.is_set() or self.output_buffers.empty():
            return False
        return self.inbox.qsize() > (1 if self._end_queued else 0)

    def _put(self, box: queue.SimpleQueue, item: Any) -> bool:
        if self.stop.is_set():
            return False
        box.put(item)
        return True

    def _get(self, box: queue.SimpleQueue) -> Any:
        while not self.stop.is_set():
            try:
                item = box.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            return None if self.stop.is_set() else item
        return None

    def read_inputs(self, data_path: Path, num_inputs: Optional[int]) -> None:
        started = time.perf_counter()
        inputs = read_inputs(data_path, self.spec.inputs, num_inputs)
        for sequence, arrays in enumerate(inputs):
            if self.fps and self.stop.wait(max(0.0, started + sequence / self.fps - time.perf_counter())):
                return
            buffers = self._get(self.input_buffers)
            if buffers is None:
                return
            for buffer, array in zip(buffers, arrays):
                np.copyto(buffer, array)
            if not self._put(self.inbox, Work(sequence, time.time_ns(), buffers, FrameTiming(sequence),
                                              time.perf_counter())):
                return
        self._end_inbox()

    def receive(self) -> None:
        assert self.upstream is not None
        while True:
            buffers = self._get(self.input_buffers)
            if buffers is None:
                return
            began = time.perf_counter()
            frame = self.upstream.read(buffers)
            if frame.kind in (Kind.END, Kind.NEXT):  # NEXT: a device agent's link goes on (agent.py hands it on)
                self._end_inbox()
                return
            timing = FrameTiming(frame.sequence, receive_ms=(time.perf_counter() - began) * 1000,
                                 received=time.time())
            if not self._put(self.inbox, Work(frame.sequence, frame.origin_ns, buffers, timing, time.perf_counter())):
                return

    def _execute(self) -> None:
        # Pacing follows the emulated device's own clock: it starts a frame when the frame has arrived and
        # it finished the previous one (or, held back by the next stage, when a result buffer is free) and
        # ends it planned ms later. Sleeping until that absolute deadline, instead of a sleep proportional
        # to the measured time, keeps host noise from being multiplied by 1/C, and a late wake-up on a busy
        # host does not push back the frames after it. The sleep wakes at once on stop. Frames of every role of
        # the device take turns (self.device), so two roles that overlap at a barrier share one device.
        while True:
            item = self._get(self.inbox)
            if item is None:
                return
            if isinstance(item, EndOfStream):
                self._put(self.outbox, END)
                return
            timing = item.timing
            timing.queue_wait_ms = (time.perf_counter() - item.queued) * 1000
            try:
                results, start = self.output_buffers.get_nowait(), item.queued
            except queue.Empty:
                results, start = self._get(self.output_buffers), time.perf_counter()
            if results is None or isinstance(results, EndOfStream):  # stopped (abort puts END in every queue)
                return
            with self.device.turn(self.rank, self._frame_ready) as self._turn:
                if self.stop.is_set():  # cut while it waited for the device: no frame of a dead role on its clock
                    return
                start = max(start, self.device.free_at)
                timing.infer_start = time.time()
                began, began_cpu = time.perf_counter(), time.thread_time()
                into = getattr(self.runner, "into", None)  # a StageRunner copies straight into the result buffers
                if into is not None:
                    into(item.buffers, results)
                else:
                    for result, output in zip(results, self.runner(item.buffers)):
                        np.copyto(result, output)  # the interpreter reuses its output memory on the next call
                inference = time.perf_counter() - began
                pace = self.pace_ms / 1000 if self.pace_ms else 0.0  # a controller may change it
                if self.stop.is_set() or not self.device.pace(self._turn, start + pace):
                    self.device.give_back(self._turn)  # cut in its invoke: free from now (an abort gave it back then)
                    return
                timing.inference_cpu_ms = (time.thread_time() - began_cpu) * 1000
                self.input_buffers.put(item.buffers)
                left, slept = start + pace - time.perf_counter(), 0.0
                if left > 0:
                    asleep = time.perf_counter()
                    if self.stop.wait(left):  # cut: the rest of a dead role's frame is not the device's time
                        self.device.give_back(self._turn)  # (an abort did already: the next role may have it)
                        return
                    slept = time.perf_counter() - asleep
            timing.inference_ms = inference * 1000
            # Only the pacing sleep: on a board of 0.12 cores the receive thread woken by the buffer just freed
            # ran first, and that wait (8 ms a frame) was reported as pacing in runs that paced nothing.
            timing.emulation_ms = slept * 1000
            timing.planned_ms = pace * 1000
            timing.infer_end = time.time()
            if not self._put(self.outbox, Work(item.sequence, item.origin_ns, results, timing)):
                return

    def send(self) -> None:
        downstream = self.downstream
        assert downstream is not None
        while True:
            item = self._get(self.outbox)
            if item is None:  # stopped by an error elsewhere in this stage: tell the next stage
                downstream.error(self.sent, self.error or f"{self.name} stopped")
                return
            if isinstance(item, EndOfStream):
                self.continued_as = self.continue_as()
                downstream.end(self.sent, self.continued_as)
                return
            timing = item.timing
            timing.send_start = time.time()
            began = time.perf_counter()
            downstream.send(item.sequence, item.origin_ns, item.buffers)
            timing.send_ms = (time.perf_counter() - began) * 1000
            self.output_buffers.put(item.buffers)
            self.timings.append(timing)
            self.sent += 1

    def write_results(self, output_path: Optional[Path]) -> None:
        writer = ResultWriter(output_path, self.spec.outputs)
        complete = False
        try:
            while True:
                item = self._get(self.outbox)
                if item is None or isinstance(item, EndOfStream):
                    complete = item is not None
                    return
                timing = item.timing
                began = time.perf_counter()
                writer.write(item.sequence, item.buffers)
                timing.send_ms = (time.perf_counter() - began) * 1000
                timing.latency_ms = (time.time_ns() - item.origin_ns) / 1e6
                self.output_buffers.put(item.buffers)
                self.timings.append(timing)
        finally:
            writer.close(complete)


class Stage:
    def __init__(self, options: StageOptions, say: Say = print):
        self.options = options
        self.say = say
        manifest = read_manifest(options.folder)
        self.spec = manifest.stage(options.stage)
        self.first = options.stage == 1
        self.last = options.stage == len(manifest.stages)
        self.name = f"[stage {options.stage}]"
        self._check_options()
        key = stage_key(options.folder, options.key_file, options.insecure)
        identity = manifest_identity((options.folder / MANIFEST_FILE).read_bytes())
        self.upstream_auth = None if key is None else LinkAuth(key, identity, options.stage - 1, options.stage)
        self.downstream_auth = None if key is None else LinkAuth(key, identity, options.stage, options.stage + 1)
        tls = options.tls and not options.insecure  # --insecure: neither the key handshake nor TLS
        self.tls_listen = tls_context(options.folder, server_side=True) if tls else None
        self.tls_connect = tls_context(options.folder, server_side=False) if tls else None
        self.control: Optional[ControlLink] = None
        self.loop: Optional[StageLoop] = None

    def _check_options(self) -> None:
        o = self.options
        if self.first and o.data_path is not None:
            input_datasets(o.data_path, self.spec.inputs)[0].close()  # fail now on a bad file, not mid-run
        elif self.first and o.bind_port is None:
            raise DnnpipeError(f"{self.name} the first stage needs --data-path (HDF5: dataset 'images', or one per "
                               f"input name) or "
                               f"--bind-port to receive its inputs on")
        if not self.first and o.bind_port is None:
            raise DnnpipeError(f"{self.name} a stage after the first needs --bind-port to receive on")
        if (not self.last or o.next_host is not None or o.next_port is not None) and \
                (o.next_host is None or o.next_port is None):
            raise DnnpipeError(f"{self.name} a stage before the last (or a last stage sending its results on) "
                               f"needs --next-host and --next-port")
        if (o.control_host is None) != (o.control_port is None):
            raise DnnpipeError(f"{self.name} --control-host and --control-port go together")
        for flag, value in (("--timeout", o.timeout), ("--connect-timeout", o.connect_timeout), ("--fps", o.fps),
                            ("--pace-ms", o.pace_ms)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise DnnpipeError(f"{self.name} {flag} must be a finite number > 0, got {value}")
        for flag, count in (("--queue-size", o.queue_size), ("--num-inputs", o.num_inputs),
                            ("--num-threads", o.num_threads)):
            if count is not None and count < 1:
                raise DnnpipeError(f"{self.name} {flag} must be at least 1, got {count}")
        if o.pace_ms is not None and o.pace_ms / 1000 >= o.timeout:
            raise DnnpipeError(f"{self.name} --pace-ms {o.pace_ms:g} is not below --timeout {o.timeout:g} s")

    def run(self) -> StageSummary:
        o = self.options
        receives = o.bind_port is not None and not (self.first and o.data_path is not None)
        listener = listen(self.name, o.bind_addr, o.bind_port) if receives and o.bind_port is not None else None
        upstream: Optional[Upstream] = None
        downstream: Optional[Downstream] = None
        timings: list[FrameTiming] = []
        try:
            if o.control_host is not None and o.control_port is not None:
                auth = None if self.upstream_auth is None else replace(self.upstream_auth, sender=o.stage,
                                                                                receiver=CONTROLLER)
                self.control = ControlLink(self.name, o.stage, o.control_host, o.control_port, o.connect_timeout,
                                           timings, self._command, self._lost, auth)
            path = o.folder / self.spec.file
            if not path.is_file():
                raise DnnpipeError(f"{self.name} {path}: sub-model not found")
            if sha256_file(path) != self.spec.sha256:
                raise DnnpipeError(f"{self.name} {path}: sha256 differs from the manifest (stale or damaged file)")
            runner = StageRunner(path, self.spec, o.num_threads, o.delegate)
            if o.next_host is not None and o.next_port is not None:  # the next stage, or a controller
                downstream = connect_downstream(self.name, o.next_host, o.next_port, self.spec.outputs,
                                                o.connect_timeout, o.timeout, self.say, self.downstream_auth,
                                                self.tls_connect)
            if listener is not None:
                upstream = accept_upstream(self.name, listener, self.spec.inputs, o.connect_timeout,
                                           o.timeout, self.say, self.upstream_auth, self.tls_listen)
        except DnnpipeError as e:
            if self.control is not None:
                self.control.close(str(e))
            raise
        finally:
            if listener is not None:
                listener.close()
        loop = self.loop = StageLoop(self.name, self.spec, runner, o.queue_size, self.say, o.pace_ms, o.fps)
        loop.timings = timings
        loop.upstream, loop.downstream = upstream, downstream
        if upstream is not None:
            source: Callable[[], None] = loop.receive
        elif o.data_path is not None:
            source = partial(loop.read_inputs, o.data_path, o.num_inputs)
        else:  # _check_options already refused a first stage without data
            raise DnnpipeError(f"{self.name} the first stage needs --data-path")
        sink = partial(loop.write_results, o.output_path) if downstream is None else loop.send
        self.say(f"{self.name} running")
        gc.collect()  # what is garbage now is not kept for good by the freeze
        gc.freeze()  # this process's long-lived objects (modules, interpreter, TLS) out of every collection's way
        try:
            loop.run(source, sink)
        finally:
            for link in (upstream, downstream):
                if link is not None:
                    link.close()
            if self.control is not None:
                self.control.close(loop.error)
        if loop.error:
            raise StageFailed(loop.error)
        summary = summarise(o.stage, loop.timings, self.last and downstream is None,  # latency where written
                            loop.cpu_seconds)
        if o.log_dir is not None:
            write_log(o.log_dir, o.stage, loop.timings, summary)
        return summary

    def _lost(self, message: str) -> None:
        if self.loop is not None:
            self.loop.fail(message)

    def _command(self, command: dict) -> None:
        """A controller's command (already validated by the control link)."""
        if command["kind"] == "pace" and self.loop is not None:
            self.loop.pace_ms = command["ms"]
            self.say(f"{self.name} now paced at {command['ms']:g} ms a frame")
