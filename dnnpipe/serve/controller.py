"""serve, the controller: keeps one pipeline running over a changing cluster of device agents, every result once.

A thin imperative shell. The decisions (which plan, when to switch, what to push ahead of time) are
dnnpipe.serve.decide's pure function; the agents' control links are dnnpipe.serve.fleet's; the data path and the
ledger's replay are dnnpipe.serve.stream's and dnnpipe.serve.delivery's. This module turns what it observes
(control links closing, heartbeats missing, stage times, registry changes) into decide's events and carries out
its actions:

    start one agent per device (once) -> push the plan's sub-models -> roles of generation 1 -> route 1
    a device lost    -> Switch(abort): roles of the next generation to every agent at once, sub-models already
                        there (the plans for the loss of each single device were cut and pushed in the background)
    slower / joined  -> Switch(barrier): END at the next input on the old route, the new route behind it
"""

from __future__ import annotations

import hashlib
import os
import queue
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from ..config import Config, load_config
from ..deploy.registry import Device, load_registry
from ..deploy.ship import DeviceReport, runtime_code, ship_all, uploads_for
from ..deploy.transport import Upload, transport_for
from ..errors import ConfigError, DnnpipeError, NoPlanError
from ..jsonio import write_json
from ..layout import config_paths
from ..manifest import MANIFEST_FILE, read_manifest, sha256_file
from ..keygen import create_certificate
from ..pipeline_key import CERT_FILE, CERT_KEY_FILE, stage_key, tls_context
from ..planner.replan import ClusterChange, replan
from ..runtime.control import CONTROLLER, LOADED_SUB_MODELS
from ..runtime.handshake import manifest_identity
from .cutter import CLOSING, Cutter, CuttingProcessFailed, CutWorker, SubModel
from .decide import Action, GiveUp, Joined, Lost, Measured, Prepare, Proposal, Stages, State, Switch, Switched, \
    crowded, decide, device_names, loss_placed, next_push, not_loaded, placed, uncovered
from .detect import SpeedModel, speed_outliers, stage_time
from ..feeds import Feed, NoEvents, ServeEvents
from .filefeed import FileFeed
from .fleet import Fleet, controller_address
from .options import ServeOptions
from .roles import Running, role_messages
from .stream import Route, Stream

Echo = Callable[[str], None]
POLL_SECONDS = 0.01
MEASURE_SECONDS = 0.2  # how often measured speeds are evaluated
FAULT_GRACE = 0.3  # a role's error waits this long for the loss that caused it before it counts on its own
FINISH_SECONDS = 5.0  # after the last result, how long the END frame gets to flow through
LINK_WAIT = 0.5  # how long a planned switch's barrier waits for the new plan's links to be proven
PUSH_REST = 1.0  # after each contingency push, rest as long as the CPU its cut took (none when it was cut before)
PUSH_REST_MIN = 0.02  # ... and at least this long: the agent loads and warms up what it was sent after the push
STOP_LOST_SECONDS = 1.0  # a lost device's process is stopped at the new plan's first result, or this long after


class NoPlan(DnnpipeError):
    """No plan can serve the remaining devices."""


@dataclass
class SwitchRecord:
    """One switch and what it cost, in seconds from the moment its cause was detected."""

    reason: str
    label: str
    abort: bool
    stages: list[list[int]]
    predicted_throughput: float
    detected_at: float  # monotonic
    replan_s: float = 0.0
    push_s: float = 0.0  # sub-models cut and pushed on the critical path (0 when pushed ahead of time)
    prepare_s: float = 0.0  # a planned switch: sub-models cut, pushed and loaded while the old plan served
    switch_s: float = 0.0  # roles sent and the new route opened
    first_result_s: Optional[float] = None
    switched_at: float = 0.0  # monotonic: the new roles went out (a planned switch's barrier)
    generation: int = 0
    links_kept: int = 0  # links of the plan before that went on as this plan's (NEXT): not dialled again


@dataclass
class ServeSummary:
    total: int
    stored: int
    resumed_from: int
    seconds: float
    stages: list[list[int]]
    predicted_throughput: float  # of the final plan, times --emulation-scale when emulating
    switches: list[SwitchRecord]
    duplicates: int
    result_times: list[float] = field(default_factory=list)  # monotonic time of every result
    start_throughput: float = 0.0

    def describe(self) -> str:
        rate = (self.stored - self.resumed_from) / self.seconds if self.seconds > 0 else 0.0
        return (f"serve: summary: {self.stored} of {self.total} results stored (resumed from {self.resumed_from}), "
                f"{self.duplicates} duplicates dropped, {len(self.switches)} switches "
                f"({sum(s.links_kept for s in self.switches)} links kept across them), {self.seconds:.1f} s, "
                f"{rate:.1f} results/s; final plan {self.stages} predicted {self.predicted_throughput:.1f} inf/s")


@dataclass
class PendingSwitch:
    """A planned switch waiting for its sub-models to be loaded beside the running roles."""

    action: Switch
    detected: float
    replan_s: float
    missing: list[tuple[int, tuple[int, int]]]
    began: float


class Controller:
    def __init__(self, options: ServeOptions, echo: Echo = print, feed: Optional[Feed] = None,
                 events: Optional[ServeEvents] = None):
        self.options, self.echo = options, echo
        o = options
        if not o.folder.is_dir():
            raise ConfigError(f"{o.folder}: model folder not found (--model-path {o.model_path} --model-name "
                              f"{o.model_name})")
        if not (o.folder / MANIFEST_FILE).is_file():
            raise ConfigError(f"{o.folder / MANIFEST_FILE}: not found (partition the model first)")
        self.config_file, _ = config_paths(o.config, o.model_name)
        self.config: Config = load_config(self.config_file)
        self.manifest = read_manifest(o.folder)
        if self.manifest.whole_model is None:
            raise ConfigError(f"{o.folder / MANIFEST_FILE}: no whole model.tflite recorded; serve cuts new plans "
                              f"from it (partition the model again)")
        self.devices = self._read_registry()
        self.options = o = replace(o, controller_host=controller_address(o.controller_host, self.devices.values()))
        self.key = stage_key(o.folder, None, o.insecure)
        self.model = manifest_identity((o.folder / MANIFEST_FILE).read_bytes())
        self.changes = sorted(o.emulate_changes)
        outside = [d for _, d, _ in self.changes if not 1 <= d <= self.config.cluster.N]
        if outside:
            raise ConfigError(f"--emulate-change: device {outside[0]} is not in the config (devices 1.."
                              f"{self.config.cluster.N})")
        self.cutter = Cutter(o.folder)
        self.work = o.work_dir / o.model_name
        self.tls_folder = self._certificate() if o.tls else None
        self.file_feed: Optional[FileFeed] = None
        if feed is None:
            if o.data_path is None or o.output_path is None:
                raise ConfigError("serve needs --data-path and --output-path (the file mode) or --http")
            self.file_feed = FileFeed(o.data_path, self.manifest.inputs, self.manifest.outputs, o.output_path,
                                      o.num_inputs, o.resume)
            feed = self.file_feed
        self.feed = feed
        self.resumed_from = self.file_feed.stored if self.file_feed is not None else 0
        total = self.file_feed.total if self.file_feed is not None else None
        from .delivery import Ledger

        self.ledger = Ledger(total, o.window, self.resumed_from)
        self.events: ServeEvents = events or NoEvents()
        self.session = secrets.token_bytes(16)
        self.emulation: dict[int, float] = {}
        self.switches: list[SwitchRecord] = []
        self.generation = 0
        self.prepared: dict[int, set[tuple[int, int]]] = {}
        self.pushed: set[tuple[int, tuple[int, int]]] = set()
        self.pushes: queue.Queue[Optional[Prepare]] = queue.Queue()
        self.deferred: list[Prepare] = []  # contingency sub-models, pushed while the plan runs
        self.push_idle = threading.Event()  # the push loop waits for its next action: handed one at a time
        self.push_idle.set()
        self.covered: Optional[tuple[int, frozenset]] = None  # (generation, its plans' stages) said to be loaded
        self.outlier_runs: dict[int, int] = {}
        self._times: dict[int, list[float]] = {}  # device -> its last stage times (ms) in the running plan
        self.measured_at = self.last_switch = time.monotonic()
        self.failures = 0
        self.fault: Optional[tuple[float, str]] = None
        self.probing: set[int] = set()
        self._hup = False
        self._registry_mtime = _mtime(o.registry)
        self.serving_since: Optional[float] = None
        self.started_pacing = time.monotonic()
        self.sent_paced = 0
        self.start_predicted = 0.0
        self.predicted = 0.0
        self.state = State((), frozenset(), frozenset(), {}, {}, o.threshold)
        self.running: Stages = ()  # the plan the agents run (decide's state may hold a planned switch's)
        self.plans: dict[int, Stages] = {}  # generation -> its plan, for the generations still running or draining
        # Routes a planned switch left draining behind its barrier, with their devices: a loss or fault there
        # strands their inputs in flight, so it is the running pipeline's fault too (replayed by an abort).
        self.draining: list[tuple[Route, frozenset[int]]] = []
        self.pending: Optional[PendingSwitch] = None
        self.runtime_files: Optional[list[tuple[Path, str]]] = None  # what _ship sends besides the partition

    def _certificate(self) -> Path:
        """Where the pipeline certificate is: beside the manifest when the partition has one, else made once in
        serve's own folder (the partition is only read)."""
        folder = self.options.folder
        if (folder / CERT_FILE).is_file() and (folder / CERT_KEY_FILE).is_file():
            return folder
        own = self.work / "tls"
        create_certificate(own)
        return own

    # --- plans -------------------------------------------------------------------------------

    def _read_registry(self) -> dict[int, Device]:
        registry = load_registry(self.options.registry)
        return {d: device for d, device in registry.items() if 1 <= d <= self.config.cluster.N}

    def planner(self, absent: frozenset[int], speeds: Mapping[int, float]) -> Optional[Proposal]:
        """The planner over the devices present (Section 3's DP; milliseconds)."""
        try:
            result = replan(self.config, [list(s) for s in self.state.stages],
                            ClusterChange(removed=frozenset(d for d in absent if 1 <= d <= self.config.cluster.N),
                                          speeds=dict(speeds)))
        except (ConfigError, NoPlanError, ValueError):
            return None
        plan = result.plan
        return Proposal(tuple((s, e, d) for s, e, d in plan.stages), plan.bottleneck, plan.throughput,
                        result.previous_bottleneck)

    def paced_ms(self, device: int, units: tuple[int, int]) -> Optional[float]:
        """The planned time of an emulated device's stage: its units' profiled time at the device's emulated
        speed (times --emulation-scale); None when not emulating."""
        if device in self.emulation:
            speed = self.emulation[device]
        elif self.options.emulate_speed:
            speed = self.profiled_speed(device)
        else:
            return None
        return self.profiled_ms(device, units) / (speed * self.options.emulation_scale)

    def profiled_speed(self, device: int) -> float:
        return 1.0 if self.config.profile.E_device is not None else self.config.cluster.C[device - 1]

    def profiled_ms(self, device: int, units: tuple[int, int]) -> float:
        profile = self.config.profile
        row = profile.E_device[device - 1] if profile.E_device is not None else profile.E
        return float(sum(row[units[0] - 1:units[1]]))

    def scaled(self, throughput: float) -> float:
        """A plan's predicted throughput as this run can reach it (emulated speeds are scaled)."""
        return throughput * self.options.emulation_scale if self.options.emulate_speed else throughput

    # --- the run -----------------------------------------------------------------------------

    def run(self) -> ServeSummary:
        o = self.options
        started = time.monotonic()
        if self.resumed_from:
            self.echo(f"serve: resumed: {self.resumed_from} of {self.ledger.total} results already in {o.output_path}")
        previous = signal.signal(signal.SIGHUP, self._on_hup) if _main_thread() else None
        tls = None if self.tls_folder is None else (tls_context(self.tls_folder, server_side=True),
                                                    tls_context(self.tls_folder, server_side=False))
        self.fleet = Fleet(o.controller_host, self.key, self.model, self.session, o.model_path.resolve().name,
                           o.model_name, o.connect_timeout, o.ssh, self.echo, None if tls is None else tls[0])
        self.stream = Stream(self.ledger, self.feed, self.manifest.inputs, self.manifest.outputs, self.key,
                             self.model, self.session, o.controller_host, o.connect_timeout, self._pace, self._on_fault,
                             tls, lambda generation: self.fleet.events.put(("kept", CONTROLLER, generation)))
        # before the agents start: its start (imports, the model read) overlaps theirs
        self.cut_worker = CutWorker(o.folder, self.work)
        pusher = threading.Thread(target=self._push_loop, daemon=True, name="serve push")
        pusher.start()
        try:
            try:
                self._start()
                while not self._finished():
                    self._step()
                for event in _drain(self.fleet.events, 0.0):  # links kept whose word came as the run ended
                    if event[0] in ("ended", "kept"):
                        self._count_kept(event)
            except NoPlan as e:
                self._abandon(str(e))
                raise
            return ServeSummary(self.ledger.total or 0, self.ledger.first_unstored, self.resumed_from,
                                time.monotonic() - started, [list(s) for s in self.state.stages],
                                self.scaled(self.predicted), self.switches, self.stream.duplicates,
                                self.stream.result_times, self.scaled(self.start_predicted))
        finally:
            self.pushes.put(None)
            self.stream.close()
            self.fleet.close()
            self.cut_worker.close()
            if self.file_feed is not None:
                self.file_feed.close()
            if previous is not None:
                signal.signal(signal.SIGHUP, previous)

    def _start(self) -> None:
        """Ship the runtime to every device, start every agent, wait for them, push the plan, run it."""
        o = self.options
        self._ship(list(self.devices.values()))
        for device in self.devices.values():
            self.fleet.start(device)
        up: set[int] = set()
        deadline = time.monotonic() + o.connect_timeout
        while up != set(self.devices) and time.monotonic() < deadline:
            try:
                event = self.fleet.events.get(timeout=0.05)
            except queue.Empty:
                for d in set(self.devices) - up:
                    if self.fleet.exited(d) is not None:
                        deadline = min(deadline, time.monotonic() + 0.5)
                continue
            if event[0] == "up":
                up.add(event[1])
                self.echo(f"serve: agent on device {event[1]} up, pid {self.fleet.agents[event[1]].pid}")
            else:
                self._sub_models(event)
        for d in sorted(set(self.devices) - up):
            self.echo(f"serve: device {d} lost: its agent did not come up within {o.connect_timeout:g} s "
                      f"(see {self.devices[d].remote_dir}/logs/agent.out)")
            self.fleet.lose(d)
        absent = frozenset(range(1, self.config.cluster.N + 1)) - up
        self.events.devices_up(len(up))
        manifest_stages: Stages = tuple((s.units[0], s.units[1], s.device) for s in self.manifest.stages)
        self.state = State(manifest_stages, frozenset(up), absent, {}, {}, o.threshold)
        proposal = self.planner(absent, {})
        if proposal is None:
            raise NoPlan(f"no plan can serve the remaining devices {sorted(up) or 'none'}")
        if any(d in absent for _, _, d in manifest_stages):
            stages, throughput = proposal.stages, proposal.throughput
        else:
            stages = manifest_stages
            throughput = 1000.0 / max(proposal.running_ms or proposal.bottleneck_ms, 1e-9)
        self.echo(f"serve: re-plan (start): {[list(s) for s in stages]}, {self.scaled(throughput):.1f} inf/s predicted")
        self._carry_out([Switch(stages, throughput, "start", "start", abort=True)], time.monotonic())
        self.start_predicted = throughput

    def _abandon(self, reason: str) -> None:
        """Every input taken from the feed and not delivered: it cannot be served."""
        with self.stream.credit:
            for index in range(self.ledger.first_unstored, self.ledger.taken):
                if not self.ledger.is_stored(index):
                    self.feed.abandon(index, reason)

    def _finished(self) -> bool:
        route = self.stream.route
        if not self.ledger.done or route is None:
            return False
        route.results_done.wait(FINISH_SECONDS)  # the END flows through (every result is counted already)
        return True

    # --- one step of the loop ----------------------------------------------------------------

    def _step(self) -> None:
        fatal = self.stream.fatal
        if fatal is not None:  # the feed could not take a result: one line, at once, no retry
            if isinstance(fatal, DnnpipeError):
                raise fatal
            raise DnnpipeError(f"cannot deliver a result: {type(fatal).__name__}: {fatal}")
        lost: dict[int, tuple[str, str]] = {}
        joined: set[int] = set()
        pending = _drain(self.fleet.events, POLL_SECONDS)
        now = time.monotonic()
        for event in pending:
            kind, device = event[0], int(event[1])
            if kind == "lost" and device in self.state.devices:
                lost[device] = (f"device {device} lost: {event[2]}", "lost")
            elif kind == "up" and device in self.probing | (set(self.devices) - self.state.devices):
                self.probing.discard(device)
                self._forget(device)  # a new agent holds no sub-model yet
                joined.add(device)
            elif self._sub_models(event):
                continue
            elif kind in ("ended", "kept"):
                self._count_kept(event)
            elif kind == "error" and event[2] in self._live_generations():
                self.fault = self.fault or (now, f"device {device}: {event[3]}")
            elif kind == "error" and event[2] == -1:
                self.echo(f"serve: device {device}: {event[3]}")
            elif kind == "fault" and event[1] in self._live_generations():
                self.fault = self.fault or (now, event[2])
        for device, silent in self.fleet.silent(now, self.options.progress_timeout, self.options.loading_timeout):
            if device in self.state.devices and device not in lost:
                lost[device] = (f"device {device} lost: no heartbeat for {silent:.2f} s (frozen or cut off)", "frozen")
        for device in self.state.devices:
            if device not in lost and self.fleet.exited(device) is not None:
                lost[device] = (f"device {device} lost: its agent exited with status {self.fleet.exited(device)}",
                                "lost")
        if lost:
            for device, (why, _) in sorted(lost.items()):
                self.echo(f"serve: {why} (stored {self.ledger.first_unstored})")
                self.fleet.lose(device)
                self._forget(device)
            label = "frozen" if all(lbl == "frozen" for _, lbl in lost.values()) else "lost"
            reason = "; ".join(why for why, _ in lost.values()) if len(lost) > 1 else next(iter(lost.values()))[0]
            self.fault = None
            if self.pending is not None:  # not yet at its barrier: the loss is decided from the running plan
                self._revert_pending()
            stranded = set(lost) & self._draining_devices()
            generation = self.generation
            self._decide(Lost(frozenset(lost), reason, label), now)
            if stranded and self.generation == generation:  # no switch replayed the draining route's inputs
                self._pipeline_fault(f"{reason} (it still ran a draining plan's frames)", now)
            return
        if joined:
            self.echo(f"serve: device {device_names(joined)} joined")
            self.events.devices_up(len(self.state.devices | joined))
            self._decide(Joined(frozenset(joined)), now)
            return
        if self.fault is not None and now - self.fault[0] > FAULT_GRACE:
            self._pipeline_fault(self.fault[1], now)
            return
        self.fleet.stop_lost(before=now - STOP_LOST_SECONDS)
        self._pending_step(now)
        self._watch_stall(now)
        self._announce()
        self._push_contingencies()
        self._announce_covered(now)
        self._emulate_changes()
        self._registry(now)
        self._measure(now)

    def _count_kept(self, event: tuple[Any, ...]) -> None:
        """An agent's role ended with its downstream link going on as generation g's ("ended", d, g0, g), or the
        controller's input link went on as g's ("kept", 0, g): one link of g's switch not dialled."""
        generation = event[3] if event[0] == "ended" else event[2]
        for record in self.switches:
            if generation is not None and record.generation == generation:
                record.links_kept += 1

    def _draining_devices(self) -> set[int]:
        """Devices of routes still draining behind a planned switch's barrier (finished ones are let go)."""
        self.draining = [(r, d) for r, d in self.draining if not (r.results_done.is_set() or r.stop.is_set())]
        return set().union(*(d for _, d in self.draining))

    def _live_generations(self) -> set[int]:
        """Generations whose faults count: the running one and those still draining."""
        self._draining_devices()
        return {self.generation} | {r.generation for r, _ in self.draining}

    def _sub_models(self, event: tuple[Any, ...]) -> bool:
        """Keep `prepared` true to the agents: a sub-model loaded, or dropped to make room. True when the event
        was one of those."""
        if event[0] == "prepared":
            self.prepared.setdefault(event[1], set()).add(event[2])
        elif event[0] == "unloaded":
            self._unloaded(event[1], event[2])
        else:
            return False
        return True

    def _unloaded(self, device: int, units: tuple[int, int]) -> None:
        """A sub-model the agent dropped to make room is pushed again when serve still needs it there (it comes
        back as the newest, so the agent drops one no plan needs next time), unless the plans want more on that
        device than an agent keeps loaded (pushing it would only drop another they need)."""
        self.prepared.get(device, set()).discard(units)
        self.pushed.discard((device, units))
        pending = self.pending
        switching = set() if pending is None else set(placed(pending.action.stages))
        wanted = switching | loss_placed(self.state)
        if (device, units) not in wanted or device in crowded(wanted, LOADED_SUB_MODELS):
            return
        self.pushed.add((device, units))
        if pending is not None and (device, units) in switching:  # its barrier waits until it is back
            if (device, units) not in pending.missing:
                pending.missing.append((device, units))
            threading.Thread(target=self._push_all, args=([Prepare(device, units)],), daemon=True,
                             name="serve push switch").start()
        else:
            self.deferred.append(Prepare(device, units))

    def _forget(self, device: int) -> None:
        self.stream.forget_ahead(device)
        self.prepared[device] = set()
        self.pushed = {p for p in self.pushed if p[0] != device}
        self.deferred = [p for p in self.deferred if p.device != device]

    def _decide(self, event: Any, detected: float) -> None:
        began = time.perf_counter()
        self.state, actions = decide(self.state, event, self.planner)
        replan_s = time.perf_counter() - began
        if isinstance(event, Joined) and not any(isinstance(a, Switch) for a in actions):
            self.echo(f"serve: the running plan stays (a plan with device {device_names(event.devices)} is not "
                      f"{self.options.threshold:.0%} better)")
        self._carry_out(actions, detected, replan_s)

    def _carry_out(self, actions: list[Action], detected: float, replan_s: float = 0.0) -> None:
        for action in actions:
            if isinstance(action, GiveUp):
                raise NoPlan(action.reason)
            if isinstance(action, Prepare):
                if (action.device, action.units) not in self.pushed:
                    self.pushed.add((action.device, action.units))
                    self.deferred.append(action)  # pushed once the new plan's first result is in
            elif isinstance(action, Switch) and action.abort:
                self.pending = None
                self._switch(action, detected, replan_s)
            elif isinstance(action, Switch):
                self._prepare_switch(action, detected, replan_s)

    def _prepare_switch(self, action: Switch, detected: float, replan_s: float) -> None:
        """A planned switch: the new plan's sub-models are cut and pushed in the background while the old plan
        serves; the barrier goes out only once every agent has its new role loaded (see _pending_step)."""
        self._replanned(action, replan_s)
        missing = not_loaded(placed(action.stages), self.prepared)
        self.pending = PendingSwitch(action, detected, replan_s, missing, time.monotonic())
        if not missing:
            self._pending_step(time.monotonic())
            return
        for device, units in missing:
            self.pushed.add((device, units))
        threading.Thread(target=self._push_all, args=([Prepare(d, u) for d, u in missing],), daemon=True,
                         name="serve push switch").start()

    def _replanned(self, action: Switch, replan_s: float) -> None:
        if action.label != "start":
            self.echo(f"serve: re-plan ({action.reason}): {[list(s) for s in action.stages]}, "
                      f"{self.scaled(action.throughput):.1f} inf/s predicted, planned in {replan_s * 1000:.1f} ms")
            self.events.replanned(action.label)

    def _push_all(self, actions: list[Prepare]) -> None:
        for action in actions:
            self._push_one(action)

    def _push_one(self, action: Prepare) -> float:
        try:
            return self._push(action, background=True)
        except Exception as e:  # a background push: said, never the end of the thread that pushes the next
            if not self.fleet.closed.is_set():
                self.echo(f"serve: cannot push units {action.units} to device {action.device}: {e}")
            return 0.0

    def _pending_step(self, now: float) -> None:
        """The barrier of a planned switch once every new role is loaded (or the switch dropped after
        --connect-timeout: the old plan keeps serving and the next measurement may try again)."""
        pending = self.pending
        if pending is None:
            return
        if not not_loaded(pending.missing, self.prepared):
            self.pending = None
            self.echo(f"serve: every new role loaded beside the running plan ({len(pending.missing)} sub-models cut "
                      f"and pushed in the background, {now - pending.began:.2f} s): barrier")
            self._switch(pending.action, pending.detected, pending.replan_s, prepare_s=now - pending.began)
        elif now - pending.began > self.options.connect_timeout:
            self.echo(f"serve: planned switch dropped: its sub-models were not loaded within "
                      f"{self.options.connect_timeout:g} s; the running plan stays")
            self._revert_pending()

    def _revert_pending(self) -> None:
        """Forget a planned switch that will not happen: decide's state goes back to the running plan, and its
        plans for a loss (dropped when the switch was decided) are computed again and their sub-models pushed."""
        self.pending = None
        self.state, actions = decide(replace(self.state, stages=self.running), Switched(), self.planner)
        self._carry_out(actions, time.monotonic())

    def _switch(self, action: Switch, detected: float, replan_s: float, prepare_s: float = 0.0) -> None:
        """New roles to every agent and a new route: at once (abort) or behind a barrier."""
        self.generation += 1
        g, stages = self.generation, action.stages
        previous = self.stream.route
        running = None if previous is None else Running(previous.generation, tuple(d for _, _, d in self.running))
        if action.abort:
            self.draining = []  # the stream stops every earlier route: their inputs are replayed
        elif previous is not None:
            self.draining.append((previous, frozenset(d for _, _, d in self.running)))
        self.running = stages
        live = self._live_generations()
        self.plans = {k: v for k, v in self.plans.items() if k in live}
        self.plans[g] = stages
        record = SwitchRecord(action.reason, action.label, action.abort, [list(s) for s in stages], action.throughput,
                              detected, replan_s, prepare_s=prepare_s, generation=g)
        if action.abort:
            self._replanned(action, replan_s)  # a planned switch keeps serving on the old plan until the barrier
            self.events.ready(False)
        self.events.ready_for_loss(False)  # the new plan's plans for a loss are loaded after its first result
        push_began = time.perf_counter()
        pushed_now = self._ensure_pushed(stages)
        record.push_s = time.perf_counter() - push_began
        switch_began = time.perf_counter()
        record.switched_at = time.monotonic()
        devices = [d for _, _, d in stages]
        roles = role_messages(g, stages, action.abort, running, self._address, self.paced_ms, self.fleet.up())
        head = self.devices[devices[0]]
        entry = (head.device_id, _reach(head), head.runtime_port)
        if action.abort:  # the replayed inputs go out while the roles do, on the link dialled ahead (the first agent
            # holds it until its role comes): on a loss's critical path the two overlap
            self.route = self.stream.open(g, entry, devices[-1], action.abort, tuple(devices))
        for device, message in roles:
            self.fleet.send(device, message)
        if not action.abort:  # the first role's upstream is the input link, the last one's downstream the results
            self._await_links(g, entry, devices[-1], roles[0][1]["keep_from"] is not None,
                              roles[len(stages) - 1][1]["keep_to"] is not None)
            self.route = self.stream.open(g, entry, devices[-1], action.abort, tuple(devices))
        record.switch_s = time.perf_counter() - switch_began
        self.predicted = action.throughput
        self.last_switch = time.monotonic()
        self.outlier_runs = {}
        self._times = {}  # times of other units (the old plan's) would mix into the new plan's window
        for d in devices:
            self.fleet.take_times(d)
        if action.label != "start":
            self.switches.append(record)
        self._record_plan(stages)
        how = f"at once, replaying from input {self.ledger.first_unstored}" if action.abort else "behind a barrier"
        if pushed_now and action.label != "start":  # at the start nothing could be loaded ahead
            how += f"; {pushed_now} sub-model{'s' if pushed_now > 1 else ''} cut and pushed first, not loaded ahead"
        self.echo(f"serve: switch: generation {g} runs {len(stages)} stages ({how})")
        self.state, actions = decide(replace(self.state, stages=stages), Switched(), self.planner)
        self._carry_out(actions, detected)

    def _address(self, device: int) -> tuple[str, int]:
        """Where a device takes its links (0: the controller's result listener)."""
        if device == 0:
            return self.options.controller_host, self.stream.port
        return _reach(self.devices[device]), self.devices[device].runtime_port

    def _await_links(self, generation: int, first: tuple[int, str, int], last: int, input_stays: bool,
                     results_stay: bool) -> None:
        """A planned switch's barrier waits until the new plan's new links are proven (its input link, dialled
        ahead, and its result link; the agents dial theirs at the same moment), at most LINK_WAIT: their TLS and
        key handshakes cost CPU, which a 2-core host would otherwise spend at the barrier, where every period
        counts. The old plan serves meanwhile. A link that stays (decide.staying_links) is not dialled."""
        if not input_stays:
            self.stream.dial_ahead(generation, [first])
        deadline = time.monotonic() + LINK_WAIT
        while time.monotonic() < deadline and not ((results_stay or self.stream.has_link(generation, last)) and
                                                   (input_stays or self.stream.dialled_ahead(generation, first[0]))):
            time.sleep(POLL_SECONDS / 2)

    def _ensure_pushed(self, stages: Stages) -> int:
        """Every stage's sub-model loaded on its device before the roles go out (normally pushed long before);
        how many had to be pushed now."""
        missing = not_loaded(placed(stages), self.prepared)
        for device, units in missing:
            self.pushed.add((device, units))
            self._push(Prepare(device, units))
        deadline = time.monotonic() + self.options.connect_timeout
        waiting = {d for d, _ in missing}
        while not_loaded(missing, self.prepared) and time.monotonic() < deadline:
            if waiting & {d for d, _ in self.fleet.silent(time.monotonic(), self.options.progress_timeout,
                                                           self.options.loading_timeout)}:
                break  # frozen or cut off: the loop loses it right after the switch
            try:
                event = self.fleet.events.get(timeout=0.05)
            except queue.Empty:
                continue
            if not self._sub_models(event):
                self.fleet.events.put(event)  # handled by the loop after the switch
                time.sleep(0.005)
                if event[0] == "lost" and any(event[1] == d for d, _ in missing):
                    break
        return len(missing)

    def _push(self, action: Prepare, background: bool = False) -> float:
        """What cutting it cost (CPU seconds). self.pushed is the main thread's: the callers mark it."""
        sub_model = self._sub_model(action.units, background)
        self.fleet.send(action.device, {"kind": "model", "units": list(action.units), "size": sub_model.size,
                                        "sha256": sub_model.sha256}, sub_model.payload)
        return sub_model.cpu_s

    def _sub_model(self, units: tuple[int, int], background: bool) -> SubModel:
        """Cut in the cutting process in the background (its file, sent a piece at a time), where it holds up
        nothing of serve's; here on a switch's path (which waits for no other cut), or once that process failed."""
        if background and self.fleet.closed.is_set():
            raise DnnpipeError(CLOSING)  # nothing more is cut, in either process
        if background and not self.cut_worker.broken:
            try:
                return self.cut_worker.cut(units)
            except CuttingProcessFailed as e:
                if not self.fleet.closed.is_set():
                    self.echo(f"serve: {e}; sub-models are cut in serve's own process from now on")
            except DnnpipeError:
                if self.fleet.closed.is_set():
                    raise  # serve is closing: nothing more is cut
        began = time.thread_time()
        flatbuffer = self.cutter.cut(units)
        return SubModel(flatbuffer, len(flatbuffer), hashlib.sha256(flatbuffer).hexdigest(),
                        time.thread_time() - began)

    def _push_loop(self) -> None:
        """Sub-models of the contingency plans, cut and pushed in the background while the pipeline runs."""
        while True:
            action = self.pushes.get()
            if action is None:
                return
            try:
                # One board takes one sub-model in at a time (others meanwhile take theirs): a board of a sliver
                # of a core sent several at once fell behind its stage for seconds.
                deadline = time.monotonic() + self.options.connect_timeout
                while not self.fleet.settled(action.device) and time.monotonic() < deadline \
                        and not self.fleet.closed.is_set():
                    time.sleep(POLL_SECONDS)
                if self.fleet.closed.is_set():
                    continue
                cpu_s = self._push_one(action)
                # Spread out: cut back to back, they took the cores from the stages in bursts a client saw as a gap.
                time.sleep(min(1.0, max(PUSH_REST_MIN, PUSH_REST * cpu_s)))
            finally:
                self.push_idle.set()

    def _pipeline_fault(self, why: str, now: float) -> None:
        """A role or link failed and no device was lost: run the same plan again (a new generation)."""
        self.fault = None
        if self.pending is not None:
            self._revert_pending()
        self.failures += 1
        self.echo(f"serve: pipeline failed: {why} (stored {self.ledger.first_unstored})")
        if self.failures > self.options.max_restarts:
            raise DnnpipeError(f"the pipeline failed {self.failures} times in a row without a device to blame; "
                               f"last: {why}")
        self._carry_out([Switch(self.state.stages, self.predicted, f"pipeline failed: {why}", "lost", abort=True)],
                        now)

    def _on_fault(self, route: Route, why: str) -> None:
        self.fleet.events.put(("fault", route.generation, why))

    def _watch_stall(self, now: float) -> None:
        """Only time with inputs in flight counts (a slow --fps source is not a stall)."""
        with self.stream.credit:
            in_flight = self.ledger.in_flight
            since = self.stream.last_progress
        if in_flight and now - since > self.options.connect_timeout:
            self._pipeline_fault(f"no result for {self.options.connect_timeout:g} s with {in_flight} inputs in "
                                 f"flight, every device alive (--connect-timeout)", now)

    def _announce(self) -> None:
        route = self.stream.route
        if route is not None and route.source_linked.is_set() and route.results_linked.is_set():
            self.events.ready(True)  # every stage of the running plan is up and linked, end to end
        if route is None or route.first_result is None or getattr(route, "announced", False):
            return
        route.announced = True  # type: ignore[attr-defined]
        self.fleet.stop_lost()  # recovered: off the critical path now
        self._dial_ahead(route.generation)
        self.failures = 0
        self.serving_since = self.serving_since or route.first_result
        self.events.ready(True)
        text = f"serve: generation {route.generation}: first result"
        record = next((s for s in self.switches if s.generation == route.generation), None)
        if record is not None:
            record.first_result_s = route.first_result - record.detected_at
            text += f", {record.first_result_s:.3f} s after the {record.label} was detected"
            if record.abort:
                self.events.recovered(record.first_result_s)
        self.echo(text)

    def _push_contingencies(self) -> None:
        """The sub-models of the plans for a loss go out once the switch is over: the new plan has its first result
        and no old plan still drains behind its barrier. Cutting, pushing and loading them beside the stages (on
        the same cores) while both plans ran was what widened the gap a client saw at a planned switch."""
        route = self.stream.route
        if (not self.deferred or not self.push_idle.is_set() or self.pending is not None or route is None
                or route.first_result is None or self._draining_devices()):
            return
        action, self.deferred, stale = next_push(self.deferred, self.state, self.prepared)
        self.pushed -= {(a.device, a.units) for a in stale}  # asked for again, they go out again
        if action is not None:
            self.push_idle.clear()
            self.pushes.put(action)

    def _dial_ahead(self, generation: int) -> None:
        """Off a loss's critical path too: the next generation's input links to the first devices of the plans
        for a loss (each dialled once)."""
        firsts = sorted({p.stages[0][2] for p in self.state.contingency.values()} & set(self.devices))
        self.stream.dial_ahead(generation + 1, [(d, _reach(self.devices[d]), self.devices[d].runtime_port)
                                                for d in firsts])

    def _announce_covered(self, now: float) -> None:
        """Said once per running plan and set of plans for a loss, when every sub-model of those plans is loaded:
        from then on losing one device of the running plan needs no cut or push, only the switch. Taken back if
        one goes missing while the plan runs (an agent dropped it to make room, or a lost idle device changed the
        plans for a loss), and said again once they are all back."""
        plans, route = self.state.contingency, self.stream.route
        if not plans or self.pending is not None or route is None or not getattr(route, "announced", False):
            return
        needed = frozenset(loss_placed(self.state))
        key = (route.generation, needed)
        missing = uncovered(self.state, self.prepared)
        if missing and self.covered is not None and self.covered[0] == route.generation:
            self.covered = None
            self.events.ready_for_loss(False)
            full = crowded(needed, LOADED_SUB_MODELS) & {d for d, _ in missing}
            self.echo(f"serve: no longer ready for a loss: {len(missing)} sub-model(s) of its plans not loaded on "
                      f"device {device_names({d for d, _ in missing})}; " +
                      (f"device {device_names(full)} would need more than an agent keeps loaded "
                       f"({LOADED_SUB_MODELS}): a loss that needs them cuts and pushes them first" if full else
                       "pushing them"))
        if missing or self.covered == key:
            return
        self.covered = key
        self.events.ready_for_loss(True)
        self._dial_ahead(route.generation)  # (the plans may have changed since the first result)
        ahead = len(needed - set(placed(self.state.stages)))
        alone = sorted({d for _, _, d in self.state.stages} - set(plans))
        self.echo(f"serve: ready for a loss: the plan for the loss of any one of devices {device_names(plans)} is "
                  f"loaded ahead ({ahead} sub-models besides the running roles), "
                  f"{max(0.0, now - (route.first_result or now)):.2f} s after generation {route.generation}'s first "
                  f"result" + (f"; no plan survives losing device {device_names(alone)}" if alone else ""))

    def _record_plan(self, stages: Stages) -> None:
        """serve's plan in its own folder (--work-dir); the partition it was given is never written."""
        try:
            self.work.mkdir(parents=True, exist_ok=True)
            write_json(self.work / "serve_plan.json", {"generation": self.generation,
                                                       "stages": [list(s) for s in stages]})
        except OSError as e:
            self.echo(f"serve: cannot record the plan in {self.work}: {e.strerror or e}")

    # --- pacing and emulation ----------------------------------------------------------------

    def _pace(self) -> None:
        if self.options.fps:
            self.sent_paced += 1
            time.sleep(max(0.0, self.started_pacing + self.sent_paced / self.options.fps - time.monotonic()))

    def _emulate_changes(self) -> None:
        """Scripted slow-downs (tests, benchmarks): the device's agent is told its new pace."""
        while self.changes and self.serving_since and time.monotonic() - self.serving_since >= self.changes[0][0]:
            _, device, speed = self.changes.pop(0)
            self.emulation[device] = speed
            self.echo(f"serve: device {device} now emulates speed {speed:g}")
            for generation in sorted(self._live_generations()):  # a role draining beside the running one too,
                stages = self.plans.get(generation, ())  # each at its own units' time (roles not sent yet get
                spec = next(((s, e) for s, e, d in stages if d == device), None)  # theirs when they go out)
                pace = None if spec is None else self.paced_ms(device, spec)
                if pace is not None:
                    self.fleet.send(device, {"kind": "pace", "generation": generation, "ms": pace})

    # --- measured speeds ---------------------------------------------------------------------

    def _measure(self, now: float) -> None:
        """Speeds from the stage times the agents report, against the profile (with hysteresis)."""
        if now - self.measured_at < MEASURE_SECONDS or self.pending is not None:
            return
        self.measured_at = now
        model = SpeedModel()
        measured: dict[int, float] = {}
        predicted: dict[int, float] = {}
        beliefs: dict[int, float] = {}
        profiled: dict[int, float] = {}
        for stage, (first, last, d) in enumerate(self.state.stages, 1):
            frames = self.fleet.take_times(d)
            for t in frames:
                self.events.stage_time(stage, d, t / 1000)
            kept = self._times.setdefault(d, [])
            kept += frames
            del kept[:-model.window]
            median = stage_time(kept, model)
            if median is None:
                continue
            profiled[d] = self.profiled_speed(d)
            beliefs[d] = self.state.speeds.get(d, profiled[d])
            predicted[d] = self.profiled_ms(d, (first, last)) / beliefs[d] / (
                self.options.emulation_scale if self.options.emulate_speed else 1.0)
            measured[d] = median
        outliers = speed_outliers(predicted, measured, beliefs, profiled, model)
        self.outlier_runs = {d: self.outlier_runs.get(d, 0) + 1 for d in outliers}
        settled = {d: c for d, c in outliers.items() if self.outlier_runs[d] >= model.dwell}
        if not settled or now - self.last_switch < (self.options.cooldown if self.switches else 1.0):
            return
        self.outlier_runs = {}
        self._times = {}
        self._decide(Measured(settled), now)

    # --- registry and SIGHUP -----------------------------------------------------------------

    def _on_hup(self, signum: int, frame: object) -> None:
        self._hup = True

    def _registry(self, now: float) -> None:
        """On SIGHUP or a changed registry: new devices start an agent; lost devices still listed are probed by
        starting their agent again; a device that says hello (re)joins (the README states this rule)."""
        mtime = _mtime(self.options.registry)
        if not self._hup and mtime == self._registry_mtime:
            return
        hup, self._hup, self._registry_mtime = self._hup, False, mtime
        try:
            devices = self._read_registry()
        except ConfigError as e:
            self.echo(f"serve: registry not re-read: {e}")
            return
        new = sorted(set(devices) - set(self.devices))
        lost = sorted((set(devices) & set(self.devices)) - self.state.devices - self.probing)
        gone = sorted(self.state.devices - set(devices))
        self.devices.update(devices)
        self.echo(f"serve: {'SIGHUP: ' if hup else ''}registry re-read: {len(new)} new device(s) {new}, probing lost "
                  f"{lost}, removed {gone}")
        self.probing.update(new + lost)
        if new or lost:  # shipped and started in the background: no ssh call on this loop
            self.fleet.admit([devices[d] for d in new + lost], self._ship)
        for d in gone:
            self.fleet.events.put(("lost", d, f"removed from {self.options.registry}"))

    def _ship(self, devices: list[Device]) -> None:
        """The runtime code, the manifest and the pipeline key to each device (hash-checked); no sub-models (they
        are pushed to the agents) and no launch plan: the partition is only read."""
        o = self.options
        if not devices:
            return
        if self.runtime_files is None:  # once: it parses the package's imports, which a join's admit thread did
            self.runtime_files = runtime_code()  # with the interpreter lock held while the stream waited
        uploads = uploads_for(self.manifest, o.folder, o.model_path.resolve().name, [], self.runtime_files)
        if self.tls_folder is not None and self.tls_folder != o.folder:  # the certificate serve made
            prefix = f"{o.model_path.resolve().name}/{o.model_name}"
            uploads += [Upload(self.tls_folder / name, f"{prefix}/{name}", sha256_file(self.tls_folder / name),
                               private=name == CERT_KEY_FILE) for name in (CERT_FILE, CERT_KEY_FILE)]
        jobs = [(transport_for(d, o.ssh), DeviceReport(d, []), uploads) for d in devices]
        started = time.perf_counter()
        reports = ship_all(jobs)
        for report in reports:
            if not report.ok:
                self.echo(f"serve: device {report.device.device_id}: shipping failed: "
                          f"{report.error or next(iter(report.failed.values()))}")
        self.echo(f"serve: shipped {sum(len(r.sent) for r in reports)} files to {len(reports)} devices in "
                  f"{time.perf_counter() - started:.2f} s")


def serve(options: ServeOptions, echo: Echo = print, feed: Optional[Feed] = None,
          events: Optional[ServeEvents] = None) -> ServeSummary:
    return Controller(options, echo, feed, events).run()


def _drain(events: queue.Queue, timeout: float) -> list[tuple[Any, ...]]:
    """Every event waiting (after up to `timeout` for the first): two devices lost together are seen together."""
    try:
        found = [events.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            found.append(events.get_nowait())
        except queue.Empty:
            return found


def _reach(device: Device) -> str:
    return "127.0.0.1" if device.is_local else device.host


def _mtime(path: Path) -> Optional[float]:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
