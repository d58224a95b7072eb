"""serve, the controller: keeps one pipeline running over a changing cluster and stores every result once.

The imperative shell around dnnpipe.serve.delivery (the ledger) and dnnpipe.serve.detect (the rules).
One *epoch* (dnnpipe.serve.epoch) is one set of running stages and their connections:

    deploy what changed -> start one stage per planned device -> inputs to stage 1, results from stage K
    -> watch heartbeats and results -> on a fault: stop every stage, re-plan without the device, re-cut,
    ship, start the next epoch, which replays from the first unstored input.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..config import Config, load_config
from ..deploy.deployer import DeployOptions, deploy
from ..deploy.registry import Device, load_registry
from ..errors import ConfigError, DnnpipeError, NoPlanError
from ..layout import config_paths
from ..manifest import TensorSpec, read_manifest
from ..planfile import write_plan
from ..planner.replan import ClusterChange, replan
from ..pipeline_key import stage_key
from ..runtime.control import encode
from ..runtime.dataio import input_datasets, to_wire
from .delivery import Ledger
from .detect import SpeedModel, speed_outliers, stage_median, worth_switching
from .epoch import Epoch, EpochFailed
from .options import ServeOptions
from .recut import Recutter
from .results import ResultStore

Echo = Callable[[str], None]
MEASURE_SECONDS = 0.2  # how often measured speeds are evaluated (the heartbeat period)
CACHE_BYTES = 256 << 20  # DATA up to this size is read once


class NoPlan(DnnpipeError):
    """No plan can serve the remaining devices."""


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
        self.key = stage_key(o.folder, None, o.insecure)  # the pipeline key beside the manifest
        self.changes = sorted(o.emulate_changes)
        outside = [d for _, d, _ in self.changes if not 1 <= d <= self.config.cluster.N]
        if outside:
            raise ConfigError(f"--emulate-change: device {outside[0]} is not in the config (devices 1.."
                              f"{self.config.cluster.N})")
        self.recutter = Recutter(o.folder, o.keras_model, lambda _: None)
        manifest = read_manifest(o.folder)
        f, self.datasets = input_datasets(o.data_path, manifest.inputs)
        self._data_file = f
        self.rows = self.datasets[0].shape[0]
        size = sum(d.size * d.dtype.itemsize for d in self.datasets)
        # DATA in memory when it is small: reading a row through HDF5 costs the source more than sending it
        self.cached = [d[:] for d in self.datasets] if size <= CACHE_BYTES else None
        self.total = o.num_inputs or self.rows
        try:
            self.store = ResultStore(o.output_path, manifest.outputs, self.total, o.resume, echo)
        except DnnpipeError:
            f.close()
            raise
        self.ledger = Ledger(self.total, o.window, self.store.stored)
        self.credit = threading.Condition()
        self.duplicates = 0
        self.result_times: list[float] = []
        self.stage_sockets: dict[int, socket.socket] = {}
        self.speeds: dict[int, float] = {}  # device -> C the planner assumes (measured, with hysteresis)
        self.outlier_runs: dict[int, int] = {}  # device -> evaluations in a row it was out of the band
        self.measured_at = 0.0
        self.emulation: dict[int, float] = {}  # device -> C emulated, when emulating
        self.switches: list[Switch] = []
        self.stages: list[list[int]] = [[*s.units, s.device] for s in manifest.stages]
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

    # --- helpers the epoch uses --------------------------------------------------------------

    def inputs(self, index: int, specs: Sequence[TensorSpec]) -> list[np.ndarray]:
        row = index % self.rows
        if self.cached is None:
            data = [d[row] for d in self.datasets]
        else:
            data = [d[row] for d in self.cached]
        return [to_wire(s, d) for d, s in zip(data, specs)]

    def pace(self) -> None:
        if self.options.fps:
            self.sent_paced += 1
            time.sleep(max(0.0, self.started_pacing + self.sent_paced / self.options.fps - time.monotonic()))

    def paced_ms(self, device: int, units: tuple[int, int]) -> Optional[float]:
        """The planned time of an emulated device's stage (the runtime's --pace-ms): its units' profiled time
        at the device's emulated speed; None when not emulating."""
        if device in self.emulation:
            speed = self.emulation[device]
        elif self.options.emulate_speed:
            speed = self.profiled_speed(device)
        else:
            return None
        return self.profiled_ms(device, units) / (speed * self.options.emulation_scale)

    def profiled_speed(self, device: int) -> float:
        """The speed profiled_ms is at: C[d], or 1 with per-device rows (they are the device's own times)."""
        return 1.0 if self.config.profile.E_device is not None else self.config.cluster.C[device - 1]

    def profiled_ms(self, device: int, units: tuple[int, int]) -> float:
        """The units' time at C = 1 (or on the device itself, with per-device rows)."""
        profile = self.config.profile
        row = profile.E_device[device - 1] if profile.E_device is not None else profile.E
        return float(sum(row[units[0] - 1:units[1]]))

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
                    self.store.check()  # a storage fault ends serve: it is not the pipeline's to retry
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
            try:
                self.store.close()  # raises the storage fault that ended the run, if one did
            finally:
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
        self.store.check()  # a failed write ends serve at once, with its one line
        self.announce(epoch)
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
            gone = sorted({s.device for s in epoch.manifest.stages} - set(devices))
            self.devices = devices
            self.removed -= set(joined)
            if gone:  # taken out of the registry while it runs a stage: as good as lost
                raise EpochFailed(gone[0], f"device {gone[0]} was removed from {self.options.registry}")
            if joined:
                self.echo(f"serve: device {', '.join(map(str, joined))} joined")
                self._consider(f"device {', '.join(map(str, joined))} joined")
        self._measure(epoch)

    def announce(self, epoch: Epoch) -> None:
        """Say when an epoch's first result arrived (once; also when the epoch ends before a poll saw it)."""
        if epoch.first_result is not None and not epoch.announced:
            epoch.announced = True
            self.serving_since = self.serving_since or epoch.first_result
            since = f"{epoch.first_result - epoch.started:.2f} s after its start"
            if self.switches and self.switches[-1].first_result_s is None:
                s = self.switches[-1]
                s.first_result_s = epoch.first_result - s.detected_at
                since += f", {s.first_result_s:.2f} s after the fault was detected"
            self.echo(f"serve: epoch {epoch.epoch}: first result {since}")

    def _emulate_changes(self, epoch: Epoch) -> None:
        """Scripted slow-downs (tests, benchmarks): the device's stage is told over its control channel."""
        while self.changes and self.serving_since and time.monotonic() - self.serving_since >= self.changes[0][0]:
            _, device, speed = self.changes.pop(0)
            self.emulation[device] = speed
            spec = next((s for s in epoch.manifest.stages if s.device == device), None)
            self.echo(f"serve: device {device} now emulates speed {speed:g}"
                      f"{'' if spec is None else f' (stage {spec.stage})'}")
            pace = None if spec is None else self.paced_ms(device, spec.units)
            if spec is not None and pace is not None:
                self.command(spec.stage, {"kind": "pace", "ms": pace})

    def _measure(self, epoch: Epoch) -> None:
        """Speeds from the stage times the control channel reports, against the profile (with hysteresis)."""
        now = time.monotonic()
        if now - self.measured_at < MEASURE_SECONDS:
            return
        self.measured_at = now
        model = SpeedModel()
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
            profiled[d] = self.profiled_speed(d)
            beliefs[d] = self.speeds.get(d, profiled[d])
            predicted[d] = self.profiled_ms(d, spec.units) / beliefs[d]
            measured[d] = median
        outliers = speed_outliers(predicted, measured, beliefs, profiled, model)
        self.outlier_runs = {d: self.outlier_runs.get(d, 0) + 1 for d in outliers}
        settled = {d: c for d, c in outliers.items() if self.outlier_runs[d] >= model.dwell}
        if not settled or now - self.last_switch < self.options.cooldown:
            return
        self.speeds.update(settled)
        self.outlier_runs = {}
        self._consider("measured speed " + ", ".join(f"device {d} {c:.3g}" for d, c in sorted(settled.items())))

    def _consider(self, reason: str) -> None:
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


def _mtime(path: Path) -> Optional[float]:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
