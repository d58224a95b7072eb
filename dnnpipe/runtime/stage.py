"""One pipeline stage as a process: receive (or read inputs), infer, send (or write results).

Three threads joined by bounded queues, with fixed pools of tensor buffers: when a later stage is
slow, its sender blocks, the queues fill, the receiver stops reading and TCP pushes back on the
stage before it, so memory stays bounded all along the pipeline. The stage's role comes from its
position in the manifest (first reads the data file, last writes results), never from its number.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..errors import DnnpipeError
from ..interpreter import StageRunner
from ..manifest import read_manifest, sha256_file
from ..protocol import FrameReader, Kind, PeerError, send_frame
from .dataio import ResultWriter, input_datasets, read_inputs
from .metrics import FrameTiming, StageSummary, summarise, write_log

END = "end-of-stream"
POLL_SECONDS = 0.1
PROBE_SECONDS = 0.3


class StageFailed(DnnpipeError):
    """The stage stopped on an error; the message starts with the stage that failed first."""


@dataclass
class StageOptions:
    stage: int
    folder: Path  # model_path / model_name, holding manifest.json
    bind_addr: str = "0.0.0.0"
    bind_port: Optional[int] = None
    next_host: Optional[str] = None
    next_port: Optional[int] = None
    data_path: Optional[Path] = None
    output_path: Optional[Path] = None
    num_inputs: Optional[int] = None
    fps: Optional[float] = None
    log_dir: Optional[Path] = None
    num_threads: Optional[int] = None
    delegate: Optional[str] = None
    timeout: float = 60.0  # longest wait for a frame, or for a send to progress
    connect_timeout: float = 60.0  # longest wait for the neighbours to come up
    queue_size: int = 4
    emulate_speed: Optional[float] = None  # C of the emulated device: stage time = measured / C


class Stage:
    def __init__(self, options: StageOptions):
        self.options = options
        manifest = read_manifest(options.folder)
        self.spec = manifest.stage(options.stage)
        self.first = options.stage == 1
        self.last = options.stage == len(manifest.stages)
        self.name = f"[stage {options.stage}]"
        self._check_options()
        self.stop = threading.Event()
        self.error: Optional[str] = None
        self._lock = threading.Lock()
        self.inbox: queue.Queue = queue.Queue(options.queue_size)
        self.outbox: queue.Queue = queue.Queue(options.queue_size)
        self.input_buffers = self._pool(self.spec.inputs)
        self.output_buffers = self._pool(self.spec.outputs)
        self.timings: list[FrameTiming] = []
        self.upstream: Optional[socket.socket] = None
        self.downstream: Optional[socket.socket] = None

    def _check_options(self) -> None:
        o = self.options
        if self.first:
            if o.data_path is None:
                raise DnnpipeError(f"{self.name} the first stage needs --data-path (HDF5 with dataset 'images')")
            input_datasets(o.data_path, self.spec.inputs)[0].close()  # fail now on a bad file, not mid-run
        if not self.first and o.bind_port is None:
            raise DnnpipeError(f"{self.name} a stage after the first needs --bind-port to receive on")
        if not self.last and (o.next_host is None or o.next_port is None):
            raise DnnpipeError(f"{self.name} a stage before the last needs --next-host and --next-port")
        if o.emulate_speed is not None and o.emulate_speed <= 0:
            raise DnnpipeError(f"{self.name} --emulate-speed must be > 0, got {o.emulate_speed}")

    def _pool(self, specs) -> queue.Queue:
        pool: queue.Queue = queue.Queue()
        for _ in range(self.options.queue_size + 2):
            pool.put([np.empty(spec.shape, dtype=spec.dtype) for spec in specs])
        return pool

    # --- set-up ------------------------------------------------------------------------------

    def run(self) -> StageSummary:
        listener = None if self.first else self._listen()
        try:
            path = self.options.folder / self.spec.file
            if not path.is_file():
                raise DnnpipeError(f"{self.name} {path}: sub-model not found")
            if sha256_file(path) != self.spec.sha256:
                raise DnnpipeError(f"{self.name} {path}: sha256 differs from the manifest (stale or damaged file)")
            self.runner = StageRunner(path, self.spec, self.options.num_threads, self.options.delegate)
            if not self.last:
                self.downstream = self._connect()
            if listener is not None:
                self.upstream, peer = self._accept(listener)
        finally:
            if listener is not None:
                listener.close()
        if self.upstream is not None:
            source = partial(self._receive, self.upstream, peer)
        elif self.options.data_path is not None:
            source = partial(self._read_inputs, self.options.data_path)
        else:  # _check_options already refused a first stage without data
            raise DnnpipeError(f"{self.name} the first stage needs --data-path")
        sink = self._write_results if self.downstream is None else partial(self._send, self.downstream)
        threads = [self._thread(source), self._thread(self._execute), self._thread(sink)]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(POLL_SECONDS)
        except KeyboardInterrupt:
            self._fail(f"{self.name} interrupted")
            raise
        finally:
            for sock in (self.upstream, self.downstream):
                if sock is not None:
                    sock.close()
        if self.error:
            raise StageFailed(self.error)
        summary = summarise(self.options.stage, self.timings, self.last)
        if self.options.log_dir is not None:
            write_log(self.options.log_dir, self.options.stage, self.timings, summary)
        return summary

    def _listen(self) -> socket.socket:
        o = self.options
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((o.bind_addr, o.bind_port))
            listener.listen(1)
        except OSError as e:
            listener.close()
            raise DnnpipeError(f"{self.name} cannot listen on {o.bind_addr}:{o.bind_port}: "
                               f"{e.strerror or e}") from None
        return listener

    def _accept(self, listener: socket.socket) -> tuple[socket.socket, str]:
        """The upstream stage's connection. One closed without a byte is a readiness probe (the deployer's
        --launch checks ports that way): it is dropped and the stage keeps waiting."""
        o = self.options
        deadline = time.monotonic() + o.connect_timeout
        while True:
            listener.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                sock, (host, port) = listener.accept()
            except socket.timeout:
                raise DnnpipeError(f"{self.name} no upstream stage connected to {o.bind_addr}:{o.bind_port} "
                                   f"within {o.connect_timeout:g} s (--connect-timeout)") from None
            sock.settimeout(PROBE_SECONDS)
            try:
                probe = sock.recv(1, socket.MSG_PEEK) == b""
            except socket.timeout:
                probe = False  # connected and quiet: an upstream stage waiting for its own input
            except OSError:
                probe = True
            if not probe:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock, f"{self.name} upstream {host}:{port}"
            sock.close()

    def _connect(self) -> socket.socket:
        """Retry until the next stage listens, for at most --connect-timeout seconds."""
        o = self.options
        deadline, delay, reason = time.monotonic() + o.connect_timeout, 0.1, "no attempt"
        while time.monotonic() < deadline:
            try:
                sock = socket.create_connection((o.next_host, o.next_port), timeout=min(5.0, o.connect_timeout))
            except OSError as e:
                reason = e.strerror or str(e)
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 1.0)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(o.timeout)
            return sock
        raise DnnpipeError(f"{self.name} cannot reach the next stage at {o.next_host}:{o.next_port} within "
                           f"{o.connect_timeout:g} s ({reason})")

    # --- threads -----------------------------------------------------------------------------

    def _thread(self, body: Callable[[], None]) -> threading.Thread:
        name = getattr(body, "func", body).__name__
        def guarded() -> None:
            try:
                body()
            except PeerError as e:  # already names the stage it came from
                self._fail(str(e))
            except DnnpipeError as e:
                self._fail(f"{self.name} {e}")
            except Exception as e:  # noqa: BLE001 - any failure must stop the stage, not hang it
                self._fail(f"{self.name} {type(e).__name__}: {e}")

        return threading.Thread(target=guarded, name=f"{self.name} {name}", daemon=True)

    def _fail(self, message: str) -> None:
        with self._lock:
            if self.error is None:
                self.error = message
        self.stop.set()
        if self.upstream is not None:
            try:
                self.upstream.shutdown(socket.SHUT_RDWR)  # unblocks the receiver; upstream sees the close
            except OSError:
                pass

    def _put(self, box: queue.Queue, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                box.put(item, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, box: queue.Queue) -> Any:
        while not self.stop.is_set():
            try:
                return box.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
        return None

    def _read_inputs(self, data_path: Path) -> None:
        started = time.perf_counter()
        inputs = read_inputs(data_path, self.spec.inputs, self.options.num_inputs)
        for sequence, arrays in enumerate(inputs):
            if self.options.fps:
                time.sleep(max(0.0, started + sequence / self.options.fps - time.perf_counter()))
            buffers = self._get(self.input_buffers)
            if buffers is None:
                return
            for buffer, array in zip(buffers, arrays):
                np.copyto(buffer, array)
            if not self._put(self.inbox, (sequence, time.time_ns(), buffers, FrameTiming(sequence),
                                          time.perf_counter())):
                return
        self._put(self.inbox, END)

    def _receive(self, upstream: socket.socket, peer: str) -> None:
        reader = FrameReader(upstream, self.spec.inputs, peer, self.options.timeout)
        while True:
            buffers = self._get(self.input_buffers)
            if buffers is None:
                return
            began = time.perf_counter()
            frame = reader.read(buffers)
            if frame.kind == Kind.END:
                self._put(self.inbox, END)
                return
            timing = FrameTiming(frame.sequence, receive_ms=(time.perf_counter() - began) * 1000)
            if not self._put(self.inbox, (frame.sequence, frame.origin_ns, buffers, timing, time.perf_counter())):
                return

    def _execute(self) -> None:
        slowdown = 1.0 / self.options.emulate_speed - 1.0 if self.options.emulate_speed else 0.0
        while True:
            item = self._get(self.inbox)
            if item is None:
                return
            if item == END:
                self._put(self.outbox, END)
                return
            sequence, origin_ns, buffers, timing, queued = item
            timing.queue_wait_ms = (time.perf_counter() - queued) * 1000
            results = self._get(self.output_buffers)
            if results is None:
                return
            timing.infer_start = time.time()
            began = time.perf_counter()
            for result, output in zip(results, self.runner(buffers)):
                np.copyto(result, output)  # the interpreter reuses its output memory on the next call
            inference = time.perf_counter() - began
            self.input_buffers.put(buffers)
            if slowdown > 0:
                time.sleep(inference * slowdown)
            timing.inference_ms = inference * 1000
            timing.emulation_ms = (time.perf_counter() - began - inference) * 1000
            timing.infer_end = time.time()
            if not self._put(self.outbox, (sequence, origin_ns, results, timing)):
                return

    def _send(self, downstream: socket.socket) -> None:
        sent = 0
        while True:
            item = self._get(self.outbox)
            if item is None:  # stopped by an error elsewhere in this stage: tell the next stage
                send_frame(downstream, Kind.ERROR, sent, 0, message=self.error or f"{self.name} stopped")
                return
            if item == END:
                send_frame(downstream, Kind.END, sent, 0)
                return
            sequence, origin_ns, results, timing = item
            began = time.perf_counter()
            try:
                send_frame(downstream, Kind.DATA, sequence, origin_ns, self.spec.outputs, results)
            except OSError as e:
                raise DnnpipeError(f"cannot send to the next stage at {self.options.next_host}:"
                                   f"{self.options.next_port}: {e.strerror or e or 'timed out'}") from None
            timing.send_ms = (time.perf_counter() - began) * 1000
            self.output_buffers.put(results)
            self.timings.append(timing)
            sent += 1

    def _write_results(self) -> None:
        writer = ResultWriter(self.options.output_path, self.spec.outputs)
        try:
            while True:
                item = self._get(self.outbox)
                if item is None or item == END:
                    return
                sequence, origin_ns, results, timing = item
                began = time.perf_counter()
                writer.write(sequence, results)
                timing.send_ms = (time.perf_counter() - began) * 1000
                timing.latency_ms = (time.time_ns() - origin_ns) / 1e6
                self.output_buffers.put(results)
                self.timings.append(timing)
        finally:
            writer.close()
