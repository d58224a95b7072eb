"""One epoch of serve: one set of running stages and the controller's links to them.

The controller is "stage 0" on the input hop and "stage K+1" on the result hop; it listens for the last
stage's results and for every stage's control channel on fresh ports each epoch, so nothing from an old
epoch can reach a new one. Every link passes the pipeline key handshake before a byte of data flows.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from ..deploy.registry import Device
from ..errors import DnnpipeError
from ..manifest import MANIFEST_FILE, Manifest, TensorSpec
from ..frameio import FrameReader, FrameWriter
from ..protocol import Kind, ProtocolError
from ..runtime.control import CONTROLLER, LineReader
from ..runtime.transport import dial
from ..runtime.handshake import HandshakeError, LinkAuth, ProbeClosed, connect_side, listen_side, manifest_identity
from .delivery import Ledger
from .detect import SpeedModel, StageState, find_lost
from .options import ServeOptions
from .processes import StageProcess, stop_all
from .results import ResultStore

POLL_SECONDS = 0.05
FINISH_SECONDS = 5.0  # after the last result, how long the stages get to end on their own


class Host(Protocol):
    """What an epoch needs from the controller that runs it."""

    options: ServeOptions
    ledger: Ledger
    credit: threading.Condition  # guards the ledger and the store; notified on every result
    store: ResultStore
    duplicates: int
    result_times: list[float]
    devices: dict[int, Device]
    key: Optional[bytes]
    stage_sockets: dict[int, socket.socket]

    def echo(self, text: str) -> None: ...

    def inputs(self, index: int, specs: Sequence[TensorSpec]) -> list[np.ndarray]: ...

    def pace(self) -> None: ...

    def paced_ms(self, device: int, units: tuple[int, int]) -> Optional[float]: ...

    def check_adaptation(self, epoch: Epoch) -> None: ...

    def announce(self, epoch: Epoch) -> None: ...


class EpochFailed(Exception):
    def __init__(self, device: Optional[int], reason: str):
        super().__init__(reason)
        self.device, self.reason = device, reason


class Epoch:
    """The stages of one plan and the controller's links to them."""

    def __init__(self, controller: Host, manifest: Manifest, devices: dict[int, Device]):
        self.c, self.manifest = controller, manifest
        o = controller.options
        host = o.controller_host
        identity = manifest_identity((o.folder / MANIFEST_FILE).read_bytes())
        self.auth = lambda sender, receiver: (None if controller.key is None else
                                              LinkAuth(controller.key, identity, sender, receiver))
        self.control_listeners = {s.stage: _listen(host) for s in manifest.stages}  # one each: auth is per stage
        self.result_listener = _listen(host)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.link_error: Optional[tuple[float, str]] = None
        self.first_result: Optional[float] = None
        self.last_result: Optional[float] = None
        self.ended = False  # the last stage sent END
        self.announced = False  # its first result was reported
        self.closed = False
        self.started = time.monotonic()
        self.epoch = controller.ledger.switch()
        self.sockets: list[socket.socket] = []
        now = time.monotonic()
        stages = manifest.stages
        self.states = [StageState(s.stage, s.device, now) for s in stages]
        self.processes: list[StageProcess] = []
        self.threads = [threading.Thread(target=self._guarded, args=(self._receive,), daemon=True),
                        threading.Thread(target=self._guarded, args=(self._send,), daemon=True)]
        control = [threading.Thread(target=self._control, args=(s.stage,), daemon=True) for s in stages]
        for thread in control:
            thread.start()
        for k in range(len(stages), 0, -1):
            spec = stages[k - 1]
            argv = self._argv(spec.stage, devices, [s.device for s in stages])
            try:
                self.processes.append(StageProcess(k, devices[spec.device], argv, o.ssh))
            except (OSError, DnnpipeError) as e:
                self.close()
                raise EpochFailed(spec.device, f"cannot start stage {k}: {getattr(e, 'strerror', None) or e}") \
                    from None
        for thread in self.threads:
            thread.start()
        self.threads += control

    def _argv(self, k: int, devices: dict[int, Device], order: Sequence[int]) -> list[str]:
        o, device = self.c.options, devices[order[k - 1]]
        argv = [device.interpreter, "runtime_engine.py", "--stage", str(k), "--model-path",
                o.model_path.resolve().name, "--model-name", o.model_name, "--log-dir", "logs",
                "--bind-addr", "127.0.0.1" if device.is_local else "0.0.0.0", "--bind-port", str(device.runtime_port),
                "--control-host", o.controller_host, "--control-port",
                str(self.control_listeners[k].getsockname()[1]), "--connect-timeout", f"{o.connect_timeout:g}"]
        if o.insecure:
            argv.append("--insecure")
        else:  # until serve's own links use TLS (runtime.transport.secure / accept_link / secure_dial)
            argv.append("--no-tls")
        if k < len(order):
            following = devices[order[k]]
            argv += ["--next-host", _reach(following), "--next-port", str(following.runtime_port)]
        else:
            argv += ["--next-host", o.controller_host, "--next-port", str(self.result_listener.getsockname()[1])]
        pace = self.c.paced_ms(device.device_id, self.manifest.stage(k).units)
        if pace is not None:
            argv += ["--pace-ms", f"{pace:.6g}"]
        return argv

    # --- control channel ---------------------------------------------------------------------

    def _accept(self, listener: socket.socket, auth: Optional[LinkAuth], what: str,
                deadline: Optional[float] = None) -> Optional[socket.socket]:
        """The first connection that proves it is the expected end of this link; others are dropped."""
        listener.settimeout(POLL_SECONDS * 4)
        while not self.stop.is_set() and (deadline is None or time.monotonic() < deadline):
            try:
                sock, (host, port) = listener.accept()[:2]
            except socket.timeout:
                continue
            except OSError:
                return None
            if auth is not None:
                try:
                    listen_side(sock, auth)
                except HandshakeError as e:
                    sock.close()
                    if not isinstance(e, ProbeClosed):
                        self.c.echo(f"serve: dropped {host}:{port} on the {what}: {e}")
                    continue
            sock.settimeout(None)
            self.sockets.append(sock)
            return sock
        return None

    def _control(self, stage: int) -> None:
        """Stage k's control channel: hello, heartbeats with stage times, and how it ended."""
        sock = self._accept(self.control_listeners[stage], self.auth(stage, CONTROLLER), f"stage {stage} control")
        if sock is None:
            return
        reader = LineReader(sock, f"stage {stage} control")
        state = self.states[stage - 1]
        try:
            while True:
                message = reader.read()
                if message is None:
                    break
                if message["kind"] == "hello" and message.get("stage") == stage:
                    with self.lock:
                        state.hello, state.last_beat = True, time.monotonic()
                        self.c.stage_sockets[stage] = sock
                elif state.hello:
                    self._update(state, message)
        except (OSError, DnnpipeError):
            pass
        with self.lock:
            if state.ended is None and state.hello:
                state.ended = "silent"

    def _update(self, state: StageState, message: dict) -> None:
        with self.lock:
            if message["kind"] == "beat":
                times = message.get("times")
                sent = message.get("sent")
                state.last_beat = time.monotonic()
                if isinstance(sent, int):
                    state.sent = sent
                if isinstance(times, list):
                    state.times += [float(t) for t in times if isinstance(t, (int, float)) and t >= 0]
                    del state.times[:-SpeedModel.window]
            elif message["kind"] == "done":
                state.ended = "done"
            elif message["kind"] == "error":
                state.ended, state.message = "error", str(message.get("message", ""))[:500]

    # --- data links --------------------------------------------------------------------------

    def _guarded(self, body: Callable[[], None]) -> None:
        """A link thread's failure always reaches watch(), never ends the thread silently."""
        try:
            body()
        except Exception as e:  # noqa: BLE001 - reported, and the epoch is restarted
            self._failed(f"{body.__name__}: {type(e).__name__}: {e}")

    def _failed(self, why: str) -> None:
        with self.lock:
            if self.link_error is None and not self.stop.is_set():
                self.link_error = (time.monotonic(), why)

    def _send(self) -> None:
        c, o = self.c, self.c.options
        first = c.devices[self.manifest.stages[0].device]
        address = (_reach(first), first.runtime_port)
        sock = _connect(address, o.connect_timeout, self.stop)
        if sock is None:
            self._failed(f"cannot reach stage 1 at {address[0]}:{address[1]}")
            return
        self.sockets.append(sock)
        auth = self.auth(0, 1)
        if auth is not None:
            try:
                connect_side(sock, auth)
            except HandshakeError as e:
                self._failed(f"stage 1 at {address[0]}:{address[1]} refused the link: {e}")
                return
        specs = self.manifest.inputs
        writer = FrameWriter(sock, specs, f"stage 1 at {address[0]}:{address[1]}", sock.gettimeout())
        try:
            while not self.stop.is_set():
                with c.credit:
                    wire, index = c.ledger.wire_sequence, c.ledger.next_input()
                    if index is None:
                        if c.ledger.done:
                            writer.end(wire)
                            return
                        c.credit.wait(POLL_SECONDS)
                        continue
                c.pace()
                writer.send(wire, time.time_ns(), c.inputs(index, specs))
        except ProtocolError as e:  # names stage 1 and what failed
            self._failed(str(e))

    def _receive(self) -> None:
        c, o = self.c, self.c.options
        last = len(self.manifest.stages)
        sock = self._accept(self.result_listener, self.auth(last, last + 1), "result link",
                            time.monotonic() + o.connect_timeout)
        if sock is None:
            if not self.stop.is_set():
                self._failed(f"the last stage did not connect within {o.connect_timeout:g} s")
            return
        specs = self.manifest.outputs
        reader = FrameReader(sock, specs, f"results from stage {len(self.manifest.stages)}", None)
        buffers = [np.empty(s.shape, s.dtype) for s in specs]
        try:
            while not self.stop.is_set():
                frame = reader.read(buffers)
                if frame.kind == Kind.END:
                    self.ended = True
                    return
                with c.credit:
                    index = c.ledger.result(self.epoch, frame.sequence)
                    if index is None:
                        c.duplicates += 1
                    else:
                        c.store.write(index, buffers, c.ledger.first_unstored)
                        c.result_times.append(time.monotonic())
                        self.last_result = time.monotonic()
                        self.first_result = self.first_result or self.last_result
                    c.credit.notify_all()
        except DnnpipeError as e:
            self._failed(str(e))

    # --- watching ----------------------------------------------------------------------------

    def watch(self) -> None:
        """Return when every result is stored; raise EpochFailed on a fault, or Replanned on a better plan."""
        o = self.c.options
        while True:
            if self.c.ledger.done:
                return
            now = time.monotonic()
            with self.lock:
                lost = find_lost(self.states, now, o.progress_timeout, o.connect_timeout)
                link_error = self.link_error
                errors = [s for s in self.states if s.ended == "error"]
            if lost is not None:
                raise EpochFailed(*lost)
            for p in self.processes:
                status = p.exited()
                if status is not None and status < 0:
                    raise EpochFailed(p.device.device_id, f"stage {p.stage} was killed by signal {-status}")
                if status and not self.states[p.stage - 1].hello:  # it could not even start: port taken, ...
                    raise EpochFailed(p.device.device_id, f"stage {p.stage} exited with status {status} before it "
                                                          f"came up (see {p.device.remote_dir}/{p.log_rel})")
            if link_error is not None and now - link_error[0] > o.progress_timeout:
                raise EpochFailed(None, link_error[1])
            if errors and now - max(s.last_beat for s in errors) > o.progress_timeout:
                raise EpochFailed(None, f"stage {errors[0].stage}: {errors[0].message}")
            if self.c.ledger.in_flight and now - (self.last_result or self.started) > o.connect_timeout:
                raise EpochFailed(None, f"no result for {o.connect_timeout:g} s with {self.c.ledger.in_flight} "
                                        f"inputs in flight, every stage alive (--connect-timeout)")
            self.c.check_adaptation(self)
            time.sleep(POLL_SECONDS)

    def finish(self) -> None:
        """After the last result: the END frame flows through; give the stages a moment to end cleanly."""
        self.c.announce(self)
        deadline = time.monotonic() + FINISH_SECONDS
        while time.monotonic() < deadline and any(p.exited() is None for p in self.processes if p.process):
            time.sleep(POLL_SECONDS)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stop.set()
        for sock in list(self.sockets):
            _shutdown(sock)
        for listener in (*self.control_listeners.values(), self.result_listener):
            listener.close()
        stop_all(self.processes)
        for thread in self.threads:
            if thread.ident is not None:
                thread.join(5)


def _listen(host: str) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(16)
    return listener


def _reach(device: Device) -> str:
    return "127.0.0.1" if device.is_local else device.host


def _connect(address: tuple[str, int], timeout: float, stop: threading.Event) -> Optional[socket.socket]:
    """The runtime's dial, given up early when the epoch stops."""
    sock, _ = dial(*address, timeout, stop=stop)
    if sock is not None:
        sock.settimeout(60.0)
    return sock


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
