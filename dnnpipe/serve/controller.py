"""serve, the controller: keeps one pipeline running over a changing cluster and stores every result once.

The imperative shell around dnnpipe.serve.delivery (the ledger) and dnnpipe.serve.detect (the rules).
One *epoch* is one set of running stages and their connections:

    deploy what changed -> start one stage per planned device -> inputs to stage 1, results from stage K
    -> watch heartbeats and results -> on a fault: stop every stage, re-plan without the device, re-cut,
    ship, start the next epoch, which replays from the first unstored input.

The controller is "stage 0" on the input hop and "stage K+1" on the result hop; it listens for the last
stage's results and for every stage's control channel on fresh ports each epoch, so nothing from an old
epoch can reach a new one.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..config import Config, load_config
from ..deploy.deployer import DeployOptions, deploy
from ..deploy.registry import Device, load_registry
from ..deploy.transport import SshOptions
from ..errors import ConfigError, DnnpipeError, NoPlanError
from ..layout import config_paths
from ..manifest import MANIFEST_FILE, Manifest, TensorSpec, read_manifest
from ..planfile import write_plan
from ..planner.replan import ClusterChange, replan
from ..protocol import FrameReader, Kind, send_frame
from ..pipeline_key import stage_key
from ..runtime.control import CONTROLLER, LineReader, encode
from ..runtime.handshake import HandshakeError, LinkAuth, ProbeClosed, connect_side, listen_side, manifest_identity
from ..runtime.dataio import input_datasets
from .delivery import Ledger
from .detect import SpeedModel, StageState, find_lost, speed_outliers, stage_median, worth_switching
from .processes import StageProcess, stop_all
from .recut import Recutter
from .results import ResultStore

Echo = Callable[[str], None]
POLL_SECONDS = 0.05
FINISH_SECONDS = 5.0  # after the last result, how long the stages get to end on their own
MEASURE_SECONDS = 0.2  # how often measured speeds are evaluated (the heartbeat period)


class NoPlan(DnnpipeError):
    """No plan can serve the remaining devices."""


@dataclass(frozen=True)
class ServeOptions:
    registry: Path
    model_path: Path
    model_name: str
    config: Path
    data_path: Path
    output_path: Path
    num_inputs: Optional[int] = None
    fps: Optional[float] = None
    resume: bool = False
    window: int = 8  # inputs in flight at most (credits)
    progress_timeout: float = 3.0  # a stage silent this long is frozen
    connect_timeout: float = 30.0  # how long a stage may take to come up
    threshold: float = 0.10  # re-plan for speed when the new bottleneck is this much better
    cooldown: float = 3.0  # no re-plan for speed this soon after a switch (hysteresis)
    emulate_speed: bool = False  # each stage emulates its device's C from the config, times emulation_scale
    emulation_scale: float = 1.0
    keras_model: Optional[Path] = None  # to convert stages from when there is no whole model.tflite to slice
    controller_host: str = "127.0.0.1"  # the address the devices reach this machine at
    ssh: SshOptions = field(default_factory=SshOptions)
    emulate_changes: tuple[tuple[float, int, float], ...] = ()  # (after s, device, C): a device slows down
    max_restarts: int = 3  # epochs that fail without a device to blame, in a row, before giving up
    insecure: bool = False  # links without the pipeline key handshake (stages get --insecure too)

    @property
    def folder(self) -> Path:
        return self.model_path / self.model_name


@dataclass
class Switch:
    """One re-plan and what it cost, in seconds from the moment the fault was detected."""

    reason: str
    removed: list[int]
    stages: list[list[int]]
    predicted_throughput: float
    replan_s: float = 0.0
    cut_s: float = 0.0
    ship_s: float = 0.0
    first_result_s: Optional[float] = None
    detected_at: float = 0.0  # monotonic


@dataclass
class ServeSummary:
    total: int
    stored: int
    resumed_from: int
    seconds: float
    stages: list[list[int]]
    predicted_throughput: float
    switches: list[Switch]
    duplicates: int
    result_times: list[float]  # monotonic time of every result stored, for throughput before/after
    start_throughput: float  # predicted by the plan the run started with

    def describe(self) -> str:
        rate = (self.stored - self.resumed_from) / self.seconds if self.seconds > 0 else 0.0
        return (f"serve: summary: {self.stored} of {self.total} results stored (resumed from {self.resumed_from}), "
                f"{self.duplicates} duplicates dropped, {len(self.switches)} switches, {self.seconds:.1f} s, "
                f"{rate:.1f} results/s; final plan {self.stages} predicted {self.predicted_throughput:.1f} inf/s")


class EpochFailed(Exception):
    def __init__(self, device: Optional[int], reason: str):
        super().__init__(reason)
        self.device, self.reason = device, reason


class Epoch:
    """The stages of one plan and the controller's links to them."""

    def __init__(self, controller: Controller, manifest: Manifest, devices: dict[int, Device]):
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
        self.threads = [threading.Thread(target=self._receive, daemon=True),
                        threading.Thread(target=self._send, daemon=True)]
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
        if k < len(order):
            following = devices[order[k]]
            argv += ["--next-host", _reach(following), "--next-port", str(following.runtime_port)]
        else:
            argv += ["--next-host", o.controller_host, "--next-port", str(self.result_listener.getsockname()[1])]
        speed = self.c.emulated_speed(device.device_id)
        if speed is not None:
            argv += ["--emulate-speed", f"{speed:.6g}"]
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
        try:
            while not self.stop.is_set():
                with c.credit:
                    wire, index = c.ledger.wire_sequence, c.ledger.next_input()
                    if index is None:
                        if c.ledger.done:
                            send_frame(sock, Kind.END, wire, 0)
                            return
                        c.credit.wait(POLL_SECONDS)
                        continue
                c.pace()
                send_frame(sock, Kind.DATA, wire, time.time_ns(), specs, c.inputs(index, specs))
        except OSError as e:
            self._failed(f"sending to stage 1 at {address[0]}:{address[1]}: {e.strerror or e}")

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
                        self.first_result = self.first_result or time.monotonic()
                    c.credit.notify_all()
        except DnnpipeError as e:
            self._failed(str(e))

    # --- watching ----------------------------------------------------------------------------

    def watch(self) -> None:
        """Return when every result is stored; raise EpochFailed on a fault, or _Replan on a better plan."""
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
            if link_error is not None and now - link_error[0] > o.progress_timeout:
                raise EpochFailed(None, link_error[1])
            if errors and now - max(s.last_beat for s in errors) > o.progress_timeout:
                raise EpochFailed(None, f"stage {errors[0].stage}: {errors[0].message}")
            self.c.check_adaptation(self)
            time.sleep(POLL_SECONDS)

    def finish(self) -> None:
        """After the last result: the END frame flows through; give the stages a moment to end cleanly."""
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


class Replanned(Exception):
    """The epoch ends because a better plan was found (a slow device, or one that joined)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Controller:
    def __init__(self, options: ServeOptions, echo: Echo = print):
        self.options, self.echo = options, echo
        o = options
        self.config_file, self.plan_file = config_paths(o.config, o.model_name)
        self.config: Config = load_config(self.config_file)
        self.devices = self._read_registry()
        self.removed: set[int] = set()
        self.recutter = Recutter(o.folder, o.keras_model, lambda _: None)
        f, self.datasets = input_datasets(o.data_path, read_manifest(o.folder).inputs)
        self._data_file = f
        self.rows = self.datasets[0].shape[0]
        self.total = o.num_inputs or self.rows
        self.store = ResultStore(o.output_path, read_manifest(o.folder).outputs, self.total, o.resume)
        self.ledger = Ledger(self.total, o.window, self.store.stored)
        self.credit = threading.Condition()
        self.duplicates = 0
        self.result_times: list[float] = []
        self.stage_sockets: dict[int, socket.socket] = {}
        self.key = stage_key(o.folder, None, o.insecure)  # the pipeline key beside the manifest
        self.speeds: dict[int, float] = {}  # device -> C the planner assumes (measured, with hysteresis)
        self.outlier_runs: dict[int, int] = {}  # device -> evaluations in a row it was out of the band
        self.measured_at = 0.0
        self.emulation: dict[int, float] = {}  # device -> C emulated, when emulating
        self.switches: list[Switch] = []
        self.stages: list[list[int]] = [[*s.units, s.device] for s in read_manifest(o.folder).stages]
        self.predicted = self.start_predicted = 0.0
        self.code_shipped: set[int] = set()  # devices that have the runtime code
        self.last_switch = time.monotonic()
        self.started_pacing = time.monotonic()
        self.sent_paced = 0
        self._registry_mtime = _mtime(o.registry)
        self._hup = False
        self.pending: tuple[list[list[int]], float] = ([], 0.0)
        self.started = time.monotonic()
        self.serving_since: Optional[float] = None  # the first result of the run
        self.changes = sorted(o.emulate_changes)

    # --- helpers the epoch uses --------------------------------------------------------------

    def inputs(self, index: int, specs: Sequence[TensorSpec]) -> list[np.ndarray]:
        row = index % self.rows
        return [np.asarray(d[row], dtype=s.dtype).reshape(s.shape) for d, s in zip(self.datasets, specs)]

    def pace(self) -> None:
        if self.options.fps:
            self.sent_paced += 1
            time.sleep(max(0.0, self.started_pacing + self.sent_paced / self.options.fps - time.monotonic()))

    def emulated_speed(self, device: int) -> Optional[float]:
        if device in self.emulation:
            return self.emulation[device] * self.options.emulation_scale
        if not self.options.emulate_speed:
            return None
        return self.config.cluster.C[device - 1] * self.options.emulation_scale

    def _read_registry(self) -> dict[int, Device]:
        registry = load_registry(self.options.registry)
        return {d: device for d, device in registry.items() if 1 <= d <= self.config.cluster.N}

    def absent(self) -> set[int]:
        return (set(range(1, self.config.cluster.N + 1)) - set(self.devices)) | self.removed

    # --- the run -----------------------------------------------------------------------------

    def run(self) -> ServeSummary:
        started = self.started = time.monotonic()
        resumed_from = self.ledger.first_unstored
        if resumed_from:
            self.echo(f"serve: resumed: {resumed_from} of {self.total} results already in {self.options.output_path}")
        previous = signal.signal(signal.SIGHUP, self._on_hup) if _main_thread() else None
        try:
            self._switch("start", None)
            failures = 0
            while not self.ledger.done:
                epoch: Optional[Epoch] = None
                try:
                    epoch = self._start_epoch()
                    epoch.watch()
                    epoch.finish()
                    failures = 0
                except EpochFailed as e:
                    detected = time.monotonic()
                    who = f"device {e.device} lost" if e.device is not None else "pipeline failed"
                    self.echo(f"serve: {who}: {e.reason} (stored {self.ledger.first_unstored} of {self.total})")
                    if epoch is not None:
                        epoch.close()
                    failures = 0 if e.device is not None else failures + 1
                    if failures > self.options.max_restarts:
                        raise DnnpipeError(f"the pipeline failed {failures} times in a row without a device to "
                                           f"blame; last: {e.reason}") from None
                    if e.device is not None:
                        self.removed.add(e.device)
                    self._switch(who, detected)
                except Replanned as r:
                    detected = time.monotonic()
                    if epoch is not None:
                        epoch.close()
                    self._switch(r.reason, detected, self.pending)
                finally:
                    if epoch is not None:
                        epoch.close()
            return self._summary(started, resumed_from)
        finally:
            self.store.close()
            self._data_file.close()
            if previous is not None:
                signal.signal(signal.SIGHUP, previous)

    def _summary(self, started: float, resumed_from: int) -> ServeSummary:
        return ServeSummary(self.total, self.ledger.first_unstored, resumed_from, time.monotonic() - started,
                            self.stages, self.predicted, self.switches, self.duplicates, self.result_times,
                            self.start_predicted)

    def _switch(self, reason: str, detected: Optional[float],
                planned: Optional[tuple[list[list[int]], float]] = None) -> None:
        """Re-plan for the devices present, re-cut and ship what changed (the switch's middle part); a device
        that cannot be shipped to is lost too, and planned around."""
        while True:
            failed = self._plan(reason, detected, planned)
            if failed is None:
                return
            device, why = failed
            self.echo(f"serve: device {device} lost: {why}")
            self.removed.add(device)
            reason, planned = f"device {device} lost", None

    def _plan(self, reason: str, detected: Optional[float],
              planned: Optional[tuple[list[list[int]], float]]) -> Optional[tuple[int, str]]:
        began = time.perf_counter()
        if planned is None:
            try:
                result = replan(self.config, self.stages, ClusterChange(removed=frozenset(self.absent()),
                                                                        speeds=dict(self.speeds)))
            except (ConfigError, NoPlanError, ValueError) as e:
                raise NoPlan(f"no plan can serve the remaining devices "
                             f"{sorted(set(self.devices) - self.absent()) or 'none'}: {e}") from None
            new = result.plan
            if new.stages != self.stages or detected is None:
                self.echo(f"serve: re-plan ({reason}): {new.stages}, bottleneck {new.bottleneck:.3f} ms "
                          f"({new.throughput:.1f} inf/s predicted), planned in {result.plan.planning_time_ms:.1f} ms")
            stages, predicted = new.stages, new.throughput
        else:
            stages, predicted = planned
        replan_s = time.perf_counter() - began
        switch = Switch(reason, sorted(self.removed), stages, predicted, replan_s, detected_at=detected or 0.0)
        cut_started = time.perf_counter()
        if stages != [[*s.units, s.device] for s in read_manifest(self.options.folder).stages]:
            cut = self.recutter.cut(stages, f"serve re-plan ({reason})")
            self.echo(f"serve: cut {len(stages)} sub-models by {cut.method} in {cut.seconds:.2f} s")
            self.plan_written(stages)
        switch.cut_s = time.perf_counter() - cut_started
        ship_started = time.perf_counter()
        failed = self._ship()
        if failed is not None:
            return failed
        switch.ship_s = time.perf_counter() - ship_started
        self.stages, self.predicted = stages, predicted
        if detected is not None:
            self.switches.append(switch)
        else:
            self.start_predicted = predicted
        return None

    def plan_written(self, stages: list[list[int]]) -> None:
        """The plan beside the config follows the running one (it is shipped with the sub-models)."""
        if self.plan_file.is_file():
            from ..planner.plan import make_plan
            from ..planner.problem import Problem

            problem = Problem.from_config(self.config)
            write_plan(make_plan(problem, [(s - 1, e, d - 1) for s, e, d in stages], "serve"), self.plan_file)

    def _ship(self) -> Optional[tuple[int, str]]:
        """Send what the planned devices lack; the first device that failed, and why."""
        o = self.options
        started = time.perf_counter()
        # The runtime code does not change while serving: once every planned device has it, only model files
        # are compared (hashing ~80 code files per device would cost a switch about half a second).
        planned = {s.device for s in read_manifest(o.folder).stages}
        deployment = deploy(DeployOptions(o.registry, o.model_name, o.model_path, o.config, ssh=o.ssh,
                                          runtime_code=not planned <= self.code_shipped))
        if deployment.failed:
            bad = deployment.failed[0]
            return bad.device.device_id, f"shipping failed: {bad.error or next(iter(bad.failed.values()))}"
        self.code_shipped |= planned
        sent = sum(len(r.sent) for r in deployment.reports)
        self.echo(f"serve: shipped {sent} files to {len(deployment.reports)} devices "
                  f"({sum(len(r.skipped) for r in deployment.reports)} already there) in "
                  f"{time.perf_counter() - started:.2f} s")
        return None

    def _start_epoch(self) -> Epoch:
        manifest = read_manifest(self.options.folder)
        epoch = Epoch(self, manifest, self.devices)
        self.last_switch = time.monotonic()
        self.started_pacing, self.sent_paced = time.monotonic(), 0
        for p in sorted(epoch.processes, key=lambda p: p.stage):
            self.echo(f"serve: stage {p.stage} on device {p.device.device_id} "
                      f"(units {manifest.stage(p.stage).units[0]}-{manifest.stage(p.stage).units[1]}) pid {p.pid}")
        self.echo(f"serve: switch: epoch {epoch.epoch} running {len(manifest.stages)} stages, replaying from input "
                  f"{self.ledger.first_unstored}")
        return epoch

    # --- adaptation (speed, joins) -----------------------------------------------------------

    def _on_hup(self, signum: int, frame: object) -> None:
        self._hup = True

    def check_adaptation(self, epoch: Epoch) -> None:
        """Between polls: note a switch's first result; re-read the registry; re-plan for measured speeds."""
        if epoch.first_result is not None and not epoch.announced:
            epoch.announced = True
            self.serving_since = self.serving_since or epoch.first_result
            since = f"{epoch.first_result - epoch.started:.2f} s after its start"
            if self.switches and self.switches[-1].first_result_s is None:
                s = self.switches[-1]
                s.first_result_s = epoch.first_result - s.detected_at
                since += f", {s.first_result_s:.2f} s after the fault was detected"
            self.echo(f"serve: epoch {epoch.epoch}: first result {since}")
        self._emulate_changes(epoch)
        mtime = _mtime(self.options.registry)
        if self._hup or mtime != self._registry_mtime:
            self._hup, self._registry_mtime = False, mtime
            try:
                devices = self._read_registry()
            except ConfigError as e:
                self.echo(f"serve: registry not re-read: {e}")
                return
            joined = sorted(set(devices) - set(self.devices))
            self.devices = devices
            self.removed -= set(joined)
            if joined:
                self.echo(f"serve: device {', '.join(map(str, joined))} joined")
                self._consider(f"device {', '.join(map(str, joined))} joined", force_check=True)
        self._measure(epoch)

    def _emulate_changes(self, epoch: Epoch) -> None:
        """Scripted slow-downs (tests, benchmarks): the device's stage is told over its control channel."""
        while self.changes and self.serving_since and time.monotonic() - self.serving_since >= self.changes[0][0]:
            _, device, speed = self.changes.pop(0)
            self.emulation[device] = speed
            stage = next((s.stage for s in epoch.manifest.stages if s.device == device), None)
            self.echo(f"serve: device {device} now emulates speed {speed:g}"
                      f"{'' if stage is None else f' (stage {stage})'}")
            if stage is not None:
                self.command(stage, {"kind": "emulate", "speed": speed * self.options.emulation_scale})

    def _measure(self, epoch: Epoch) -> None:
        """Speeds from the stage times the control channel reports, against the profile (with hysteresis)."""
        now = time.monotonic()
        if now - self.measured_at < MEASURE_SECONDS:
            return
        self.measured_at = now
        model, profile = SpeedModel(), self.config.profile
        measured: dict[int, float] = {}
        predicted: dict[int, float] = {}
        beliefs: dict[int, float] = {}
        profiled: dict[int, float] = {}
        with epoch.lock:
            medians = {s.stage: stage_median(s.times, model) for s in epoch.states}
        for spec in epoch.manifest.stages:
            median = medians[spec.stage]
            if median is None:
                continue
            d = spec.device
            row = profile.E_device[d - 1] if profile.E_device is not None else profile.E
            profiled[d] = 1.0 if profile.E_device is not None else self.config.cluster.C[d - 1]
            beliefs[d] = self.speeds.get(d, profiled[d])
            predicted[d] = float(sum(row[spec.units[0] - 1:spec.units[1]])) / beliefs[d]
            measured[d] = median
        outliers = speed_outliers(predicted, measured, beliefs, profiled, model)
        self.outlier_runs = {d: self.outlier_runs.get(d, 0) + 1 for d in outliers}
        settled = {d: c for d, c in outliers.items() if self.outlier_runs[d] >= model.dwell}
        if not settled or now - self.last_switch < self.options.cooldown:
            return
        self.speeds.update(settled)
        self.outlier_runs = {}
        self._consider("measured speed " + ", ".join(f"device {d} {c:.3g}" for d, c in sorted(settled.items())))

    def _consider(self, reason: str, force_check: bool = False) -> None:
        """Switch when the re-planned bottleneck beats the running plan's by more than the threshold."""
        try:
            result = replan(self.config, self.stages, ClusterChange(removed=frozenset(self.absent()),
                                                                    speeds=dict(self.speeds)))
        except (ConfigError, NoPlanError, ValueError):
            return
        if result.plan.stages == self.stages:
            return
        if worth_switching(result.previous_bottleneck, result.plan.bottleneck, self.options.threshold):
            self.echo(f"serve: re-plan ({reason}): {result.plan.stages}, bottleneck {result.plan.bottleneck:.3f} ms "
                      f"against {result.previous_bottleneck or float('nan'):.3f} ms running "
                      f"(planned in {result.plan.planning_time_ms:.1f} ms)")
            self.pending = (result.plan.stages, result.plan.throughput)
            raise Replanned(reason)

    def command(self, stage: int, message: dict) -> None:
        """Send a control command to a running stage (the benchmark and tests slow a device down this way)."""
        sock = self.stage_sockets.get(stage)
        if sock is not None:
            try:
                sock.sendall(encode(message))
            except OSError as e:
                self.echo(f"serve: cannot reach stage {stage}'s control channel: {e.strerror or e}")


def serve(options: ServeOptions, echo: Echo = print) -> ServeSummary:
    return Controller(options, echo).run()


def _listen(host: str) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(16)
    return listener


def _reach(device: Device) -> str:
    return "127.0.0.1" if device.is_local else device.host


def _connect(address: tuple[str, int], timeout: float, stop: threading.Event) -> Optional[socket.socket]:
    deadline, delay = time.monotonic() + timeout, 0.05
    while time.monotonic() < deadline and not stop.is_set():
        try:
            sock = socket.create_connection(address, timeout=2.0)
        except OSError:
            time.sleep(delay)
            delay = min(2 * delay, 0.5)
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(60.0)
        return sock
    return None


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _mtime(path: Path) -> Optional[float]:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
