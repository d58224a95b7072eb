"""The device agent: its control messages checked at the boundary (a hypothesis fuzz of the parser), and real agent
processes driven by the controller's fleet and data path: roles pushed, run, switched at a barrier and aborted,
every result exactly once and equal to the model's."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnnpipe.deploy.registry import Device
from dnnpipe.deploy.ship import DeviceReport, runtime_code, ship_all, uploads_for
from dnnpipe.deploy.transport import SshOptions, transport_for
from dnnpipe.errors import DnnpipeError
from dnnpipe.manifest import MANIFEST_FILE, read_manifest
from dnnpipe.pipeline_key import read_key
from dnnpipe.runtime.agent import Agent, AgentOptions, HandOver, Role, check_role, dial_link, link_identity, vet_link
from dnnpipe.runtime.control import parse_line
from dnnpipe.runtime.handshake import manifest_identity
from dnnpipe.runtime.stage import StageLoop
from dnnpipe.serve.roles import Running, role_messages
from dnnpipe.testbed.local import free_ports
from dnnpipe.serve.cutter import Cutter
from dnnpipe.serve.delivery import Ledger
from dnnpipe.serve.fleet import Fleet
from dnnpipe.serve.stream import Stream
from serve_setup import Served, make_served

PEER = "test peer"


def role(**changes) -> dict:
    message = {"kind": "role", "generation": 3, "stage": 1, "units": [1, 5], "from": 0, "to": 2,
               "host": "127.0.0.1", "port": 5000, "pace": 2.5, "abort": False}
    message.update(changes)
    return message


def test_a_role_is_read_with_every_field_checked():
    assert check_role(role(), 10, PEER) == Role(3, 1, (1, 5), 0, 2, "127.0.0.1", 5000, 2.5, False)
    assert check_role({"kind": "role", "generation": 4, "units": None, "abort": True}, 10, PEER).units is None
    for bad, fragment in ((role(units=[5, 1]), "last unit"), (role(units=[1, 11]), "last unit"),
                          (role(pace=float("inf")), "pace"), (role(pace=1e9), "pace"), (role(pace=True), "pace"),
                          (role(port=0), "port"), (role(host="a b"), "host"), (role(generation=-1), "generation"),
                          (role(abort="yes"), "abort"), (role(generation=1 << 20), "generation"),
                          (role(keep_from=3), "keep_from"), (role(keep_to=True), "keep_to"),
                          (role(keep_to=-1), "keep_to")):
        with pytest.raises(DnnpipeError, match=fragment):
            check_role(bad, 10, PEER)
    kept = check_role(role(keep_from=2, keep_to=None), 10, PEER)  # only an older generation's link can stay
    assert (kept.keep_from, kept.keep_to) == (2, None)
    assert check_role(role(keep_from=2, abort=True), 10, PEER).keep_from is None  # an abort keeps nothing


def test_hostile_lines_are_one_error_each():
    for line in (b'{"kind": "pace", "ms": 1e999}', b"[" * 100_000, b'{"kind": NaN}', b"\xff\xfe", b"[1]", b"{}"):
        try:
            message = parse_line(line, PEER)
        except DnnpipeError as e:
            assert str(e).startswith(PEER)
        else:
            assert "kind" in message and message == json.loads(line)
    assert parse_line(b'{"kind": "pace", "ms": 1e999}', PEER)["ms"] == float("inf")  # parsed, then refused:
    with pytest.raises(DnnpipeError, match="finite"):
        check_role(role(pace=float("inf")), 10, PEER)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000) | st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
                                               lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                                               max_leaves=30).map(lambda v: json.dumps(v).encode()))
def test_fuzz_the_control_parser_and_the_role_check(line):
    """Arbitrary bytes or JSON: a message or the one error type, never another exception."""
    try:
        message = parse_line(line, PEER)
    except DnnpipeError:
        return
    try:
        check_role({**message, "kind": "role"}, 100, PEER)
    except DnnpipeError:
        pass


def test_data_links_prove_their_generation_and_receiver():
    key, model, session = os.urandom(32), b"m" * 32, os.urandom(16)
    assert link_identity(model, session, 1, 2) != link_identity(model, session, 2, 2)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    got: queue.Queue = queue.Queue()

    def serve_one() -> None:
        sock, _ = listener.accept()
        try:
            got.put(vet_link(sock, 2, key, model, lambda: session)[1:])
        except DnnpipeError as e:
            got.put(e)
        sock.close()

    for expected in ((1, 7), (0, 8)):
        threading.Thread(target=serve_one, daemon=True).start()
        dial_link("127.0.0.1", port, expected[0], 2, expected[1], key, model, session, 5.0).close()
        assert got.get(timeout=5) == expected
    threading.Thread(target=serve_one, daemon=True).start()
    with pytest.raises(DnnpipeError, match="refused"):  # a link for device 3 arrives at device 2
        dial_link("127.0.0.1", port, 1, 3, 7, key, model, session, 5.0)
    assert isinstance(got.get(timeout=5), DnnpipeError)
    listener.close()


# --- real agents ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    return make_served(tmp_path_factory.mktemp("agent"), [1.0, 1.0, 1.0])


class ListFeed:
    """A feed of the served data's rows whose inputs arrive over time (a live feed: no total up front)."""

    def __init__(self, rows: np.ndarray, total: int):
        self.rows, self.total, self.delivered = rows, total, {}
        self.gate = total  # inputs from here on have not arrived yet
        self.started = time.monotonic()

    def wait_input(self, index: int, timeout: float):
        if index >= self.total or index >= self.gate:
            time.sleep(min(timeout, 0.01))
            return None
        return [self.rows[index % len(self.rows)]]

    def exhausted(self, index: int) -> bool:
        return index >= self.total

    def deliver(self, index: int, outputs: list) -> None:
        assert index not in self.delivered, f"result {index} delivered twice"
        self.delivered[index] = np.array(outputs[0][0])

    def abandon(self, index: int, reason: str) -> None:
        raise AssertionError(f"input {index} abandoned: {reason}")


@dataclass
class Agents:
    """Real agents on local devices, the controller's fleet and data path, and how the tests drive them."""

    devices: dict
    fleet: Fleet
    stream: Stream
    ledger: Ledger
    cutter: Cutter
    faults: list  # (generation, why) of each route's fault
    kept: list  # generations whose input link stayed from the route before
    running: Optional[Running] = None  # the plan whose roles went out last

    def push(self, device: int, units: tuple[int, int]) -> None:
        flatbuffer = self.cutter.cut(units)
        self.fleet.send(device, {"kind": "model", "units": list(units), "size": len(flatbuffer),
                                 "sha256": hashlib.sha256(flatbuffer).hexdigest()}, flatbuffer)

    def push_all(self, stages: list[tuple[int, int, int]]) -> None:
        for first, last, d in stages:
            self.push(d, (first, last))
        prepared: set = set()
        deadline = time.monotonic() + 30
        while len(prepared) < len(set(stages)) and time.monotonic() < deadline:
            event = self.fleet.events.get(timeout=30)
            if event[0] == "prepared":
                prepared.add((event[1], event[2]))

    def roles(self, generation: int, stages: list[tuple[int, int, int]], abort: bool,
              pace: Optional[dict] = None) -> None:
        """The controller's roles (serve.roles), the plan before being the one whose roles went out last."""
        for device, message in role_messages(
                generation, tuple(stages), abort, self.running,
                lambda d: ("127.0.0.1", self.devices[d].runtime_port if d else self.stream.port),
                lambda d, units: (pace or {}).get(d), self.devices):
            self.fleet.send(device, message)
        self.running = Running(generation, tuple(d for _, _, d in stages))

    def route(self, generation: int, stages: list[tuple[int, int, int]], abort: bool):
        head = self.devices[stages[0][2]]
        return self.stream.open(generation, (head.device_id, "127.0.0.1", head.runtime_port), stages[-1][2], abort,
                                tuple(d for _, _, d in stages))

    def run(self, generation: int, stages: list[tuple[int, int, int]], abort: bool, pace: Optional[dict] = None):
        self.roles(generation, stages, abort, pace)
        return self.route(generation, stages, abort)


@contextmanager
def agents(served: Served, tmp_path, feed, count: int) -> Iterator[Agents]:
    folder = served.parts / served.name
    manifest = read_manifest(folder)
    ports = free_ports(count)
    devices = {d: Device(d, "local", remote_dir=str(tmp_path / f"device_{d}"), runtime_port=ports[d - 1])
               for d in range(1, count + 1)}
    uploads = uploads_for(manifest, folder, served.parts.resolve().name, [], runtime_code())
    assert all(r.ok for r in ship_all([(transport_for(d, SshOptions()), DeviceReport(d, []), uploads)
                                       for d in devices.values()]))
    key, model, session = read_key(folder / "pipeline.key"), manifest_identity((folder / MANIFEST_FILE).read_bytes()), \
        os.urandom(16)
    lines: list[str] = []
    fleet = Fleet("127.0.0.1", key, model, session, served.parts.resolve().name, served.name, 20.0, SshOptions(),
                  lines.append)
    ledger = Ledger(None, 8)
    faults: list[tuple[int, str]] = []
    kept: list[int] = []
    stream = Stream(ledger, feed, manifest.inputs, manifest.outputs, key, model, session, "127.0.0.1", 20.0,
                    lambda: time.sleep(0.004), lambda route, why: faults.append((route.generation, why)),
                    on_kept=kept.append)
    try:
        for device in devices.values():
            fleet.start(device)
        up: set[int] = set()
        try:
            while up != set(devices):
                event = fleet.events.get(timeout=30)
                up |= {event[1]} if event[0] == "up" else set()
        except queue.Empty:
            exits = {d: fleet.exited(d) for d in devices}
            raise AssertionError(f"agents up after 30 s: {sorted(up)}; exit statuses {exits}; serve said "
                                 f"{lines}") from None
        yield Agents(devices, fleet, stream, ledger, Cutter(folder), faults, kept)
    finally:
        stream.close()
        fleet.close()
    for d in devices:
        assert fleet.exited(d) is not None


def rows_of(served: Served) -> np.ndarray:
    import h5py

    with h5py.File(served.data) as f:
        return f["images"][:]


def check_results(served: Served, feed: "ListFeed", total: int) -> None:
    """Every input's result exactly once, equal to the model's."""
    assert sorted(feed.delivered) == list(range(total))
    for index, got in feed.delivered.items():
        np.testing.assert_allclose(got, next(iter(served.expected.values()))[index % len(feed.rows)], rtol=1e-4,
                                   atol=1e-4)


def test_agents_run_roles_switch_at_a_barrier_and_abort(served, tmp_path):
    total = 240
    feed = ListFeed(rows_of(served), total)
    with agents(served, tmp_path, feed, 3) as a:
        units = read_manifest(served.parts / served.name).units
        plan_a = [(1, 30, 1), (31, units, 2)]
        plan_b = [(1, 20, 3), (21, 50, 1), (51, units, 2)]
        plan_c = [(1, 40, 1), (41, units, 3)]
        a.push_all(plan_a + plan_b + plan_c)
        a.run(1, plan_a, abort=True)
        wait_for(lambda: len(feed.delivered) >= 60)
        a.run(2, plan_b, abort=False)  # a barrier: no replay, the stream goes on
        wait_for(lambda: len(feed.delivered) >= 140)
        assert a.ledger.epoch == 1 and a.stream.duplicates == 0
        os.kill(a.fleet.agents[2].pid, 9)  # device 2 lost: abort to a plan without it
        assert wait_for(lambda: any(e[0] == "lost" and e[1] == 2 for e in drain(a.fleet)))
        a.run(3, plan_c, abort=True)
        wait_for(lambda: a.ledger.done, 60)
        wait_for(lambda: a.stream.route is not None and a.stream.route.results_done.is_set())
        check_results(served, feed, total)
        # only the plans the loss ended broke (the controller drops their faults): the killed device's links, and
        # generation 2's input link, which device 3 hangs up as the abort reaches it, maybe before the route closed
        assert all(g == 2 and ("device 2" in why or "device 3" in why) for g, why in a.faults), a.faults


def test_an_agent_says_which_sub_model_it_drops_to_make_room(served, tmp_path):
    """An agent keeps LOADED_SUB_MODELS sub-models loaded; the one it drops for a new one is named before the new one's
    "prepared", so the controller never believes a dropped one is still there."""
    from dnnpipe.runtime.control import LOADED_SUB_MODELS

    whole = read_manifest(served.parts / served.name).whole_model
    assert whole is not None
    ends = sorted(j for j in whole.cuts if j > 0)[:LOADED_SUB_MODELS + 1]
    assert len(ends) == LOADED_SUB_MODELS + 1, "the test model needs more legal cuts"
    with agents(served, tmp_path, ListFeed(rows_of(served), 1), 1) as a:
        seen = []
        for last in ends:
            a.push(1, (1, last))
            while not seen or seen[-1] != ("prepared", 1, (1, last)):
                event = a.fleet.events.get(timeout=30)
                seen.append(event[:3])
        assert [e for e in seen if e[0] == "unloaded"] == [("unloaded", 1, (1, ends[0]))]
        assert seen[-2:] == [("unloaded", 1, (1, ends[0])), ("prepared", 1, (1, ends[-1]))]


def test_a_planned_roles_links_are_dialled_before_the_barrier(served, tmp_path):
    """The next generations' data links are up while the running role still serves (its END not yet sent):
    the switch itself dials nothing. Then two barriers in a row: every result once."""
    total = 120
    feed = ListFeed(rows_of(served), total)
    feed.gate = 40  # inputs from 40 on wait: the running role has no END to finish on
    with agents(served, tmp_path, feed, 2) as a:
        units = read_manifest(served.parts / served.name).units
        plan_a = [(1, 30, 1), (31, units, 2)]
        plan_b = [(1, 50, 2), (51, units, 1)]
        plan_c = [(1, 40, 1), (41, units, 2)]
        a.push_all(plan_a + plan_b + plan_c)
        first = a.run(1, plan_a, abort=True)
        wait_for(lambda: len(feed.delivered) >= 40)
        a.roles(2, plan_b, abort=False)
        a.roles(3, plan_c, abort=False)  # a second planned switch before the first reached its barrier
        wait_for(lambda: a.stream.has_link(2, 1) and a.stream.has_link(3, 2))  # the new last stages' links
        assert not first.results_done.is_set() and len(feed.delivered) == 40  # generation 1 still runs
        a.route(2, plan_b, abort=False)
        a.route(3, plan_c, abort=False)  # its route must not drop generation 2's early link as stale
        feed.gate = total
        wait_for(lambda: a.ledger.done, 60)
        wait_for(lambda: a.stream.route is not None and a.stream.route.results_done.is_set())
        check_results(served, feed, total)
        assert a.ledger.epoch == 1 and a.stream.duplicates == 0 and not a.faults


def test_links_that_stay_go_on_as_the_new_plans_and_are_not_dialled(served, tmp_path):
    """A planned switch that moves the cut between the same two devices keeps every link: the controller's input
    link, the link between the devices and the result link go on as generation 2's after NEXT (each old role says
    which generation its link went on as; the controller counts its own), and generation 2 dials none (no result
    link of it comes in). A switch that appends a device keeps the links up to it and dials the rest. Every
    result once, equal to the model's."""
    total = 150
    feed = ListFeed(rows_of(served), total)
    feed.gate = 50  # generation 1's stream has no END before the barrier
    with agents(served, tmp_path, feed, 3) as a:
        units = read_manifest(served.parts / served.name).units
        plan_a = [(1, 30, 1), (31, units, 2)]
        plan_b = [(1, 50, 1), (51, units, 2)]
        plan_c = [(1, 20, 1), (21, 60, 2), (61, units, 3)]
        a.push_all(plan_a + plan_b + plan_c)
        a.run(1, plan_a, abort=True)
        wait_for(lambda: len(feed.delivered) >= 50)
        # an input link of generation 2 dialled ahead (as for a loss plan's first device) loses to the one that
        # stays: the first device must not read it (the controller hangs it up)
        a.stream.dial_ahead(2, [(1, "127.0.0.1", a.devices[1].runtime_port)])
        wait_for(lambda: a.stream.dialled_ahead(2, 1))
        a.roles(2, plan_b, abort=False)
        time.sleep(0.3)
        assert not a.stream.has_link(2, 2)  # the last device sends generation 2's results on its old link
        a.route(2, plan_b, abort=False)
        feed.gate = 100
        seen: list = []
        wait_for(lambda: len(feed.delivered) >= 100 and {(1, 1), (2, 1)} <= ended(a, seen).keys())
        assert ended(a, seen) == {(1, 1): 2, (2, 1): 2}  # (device, generation) -> the generation its link went on as
        assert a.kept == [2]
        a.roles(3, plan_c, abort=False)
        wait_for(lambda: a.stream.has_link(3, 3))  # the new last device's result link is dialled
        a.route(3, plan_c, abort=False)
        feed.gate = total
        wait_for(lambda: a.ledger.done, 60)
        wait_for(lambda: a.stream.route is not None and a.stream.route.results_done.is_set())
        wait_for(lambda: {(1, 2), (2, 2)} <= ended(a, seen).keys())
        assert {k: v for k, v in ended(a, seen).items() if k[1] == 2} == {(1, 2): 3, (2, 2): None}
        assert a.kept == [2, 3]
        check_results(served, feed, total)
        assert a.ledger.epoch == 1 and a.stream.duplicates == 0 and not a.faults


def test_a_device_lost_right_after_its_links_stayed_is_planned_away_with_every_result_once(served, tmp_path):
    """Generation 2 takes over every link of generation 1 (the cut moved); device 2 is killed while generation 2
    may still be filling on them: the abort to a plan on device 1 alone dials its own links, drops the ones that
    stayed, and replays what was in flight. Every result once, equal to the model's."""
    total = 160
    feed = ListFeed(rows_of(served), total)
    with agents(served, tmp_path, feed, 2) as a:
        units = read_manifest(served.parts / served.name).units
        plan_a = [(1, 30, 1), (31, units, 2)]
        plan_b = [(1, 50, 1), (51, units, 2)]
        plan_c = [(1, units, 1)]
        a.push_all(plan_a + plan_b + plan_c)
        a.run(1, plan_a, abort=True)
        wait_for(lambda: len(feed.delivered) >= 40)
        a.run(2, plan_b, abort=False)
        wait_for(lambda: a.kept == [2])  # the input link went on as generation 2's
        os.kill(a.fleet.agents[2].pid, 9)
        assert wait_for(lambda: any(e[0] == "lost" and e[1] == 2 for e in drain(a.fleet)))
        a.run(3, plan_c, abort=True)
        wait_for(lambda: a.ledger.done, 60)
        wait_for(lambda: a.stream.route is not None and a.stream.route.results_done.is_set())
        check_results(served, feed, total)


def test_the_new_plan_serves_while_the_old_one_drains(served, tmp_path):
    """At a barrier the new role runs at once beside the old one: device 2, the old plan's fast last stage and the
    new plan's only stage, answers new inputs between the old plan's frames, which device 1 (paced at 100 ms a
    frame) still drains; the controller reads the new route's results as they come, before the old route's END,
    so their credits refill the new pipeline at once. Before, the new role waited for the old role's END and the
    controller for the old route's: the new plan started on an empty pipeline. Every result once."""
    total = 40
    feed = ListFeed(rows_of(served), total)
    with agents(served, tmp_path, feed, 2) as a:
        units = read_manifest(served.parts / served.name).units
        plan_a = [(1, 30, 1), (31, units, 2)]
        plan_b = [(1, units, 2)]
        a.push_all(plan_a + plan_b)
        old = a.run(1, plan_a, abort=True, pace={1: 100.0})
        wait_for(lambda: len(feed.delivered) >= 2 and a.ledger.in_flight >= 4)  # device 1 holds a queue
        new = a.run(2, plan_b, abort=False)
        wait_for(lambda: new.first_result is not None or old.results_done.is_set())
        assert new.first_result is not None and not old.results_done.is_set()
        wait_for(lambda: a.ledger.done, 60)
        wait_for(lambda: old.results_done.is_set() and new.results_done.is_set())
        check_results(served, feed, total)
        assert a.ledger.epoch == 1 and a.stream.duplicates == 0 and not a.faults


def test_each_overlapping_role_keeps_its_own_pace(served, tmp_path):
    """Two roles overlap on one device at a barrier (the old one draining, the new one filling): a "pace" command
    paces the role of its generation only, each at its own units' time. Before, it paced every role the agent ran
    at the new stage's time, so the old role drained at a pace planned for other units."""
    folder = served.parts / served.name
    spec = read_manifest(folder).stages[0]
    agent = Agent(AgentOptions(1, folder, "127.0.0.1", 1, 1))
    old, new = (StageLoop(f"[role {g}]", spec, lambda buffers: [], 1, pace_ms=ms, device=agent.device)
                for g, ms in ((1, 100.0), (2, 25.0)))
    agent.loops, agent.generation = {1: old, 2: new}, 3
    agent._live = {g: Role(g, 1, (1, 2)) for g in (1, 2, 3)}
    agent._command({"kind": "pace", "generation": 2, "ms": 5.0}, PEER, None)
    assert (old.pace_ms, new.pace_ms) == (100.0, 5.0)
    agent._command({"kind": "pace", "generation": 1, "ms": 400.0}, PEER, None)
    assert (old.pace_ms, new.pace_ms) == (400.0, 5.0)
    agent._command({"kind": "pace", "generation": 3, "ms": 7.0}, PEER, None)  # its role is still loading
    assert agent._paces == {3: 7.0} and (old.pace_ms, new.pace_ms) == (400.0, 5.0)
    agent._command({"kind": "pace", "generation": 9, "ms": 7.0}, PEER, None)  # no such role: nothing to pace
    assert agent._paces == {3: 7.0}
    agent.generation = 2
    agent._command({"kind": "pace", "ms": 3.0}, PEER, None)  # without a generation: the newest role's
    assert (old.pace_ms, new.pace_ms) == (400.0, 3.0)
    for bad in ({"generation": -1}, {"generation": True}, {"generation": 2, "ms": 0}):
        with pytest.raises(DnnpipeError, match="pace"):
            agent._command({"kind": "pace", "ms": 3.0, **bad}, PEER, None)


def test_loading_a_sub_model_lowers_no_thread(served, monkeypatch):
    """A loaded sub-model's first invoke runs at the loading thread's own priority. At nice 19 it took Python's lock
    back when its invoke returned, and a thread preempted there holds every thread of the agent, the running
    role's included (runtime.priority)."""
    folder = served.parts / served.name
    agent = Agent(AgentOptions(1, folder, "127.0.0.1", 1, 1))
    changed: list[tuple] = []
    monkeypatch.setattr(os, "setpriority", lambda *args: changed.append(args))
    units = (1, read_manifest(folder).units)
    assert agent._load(units, Cutter(folder).cut(units)) == []
    assert units in agent._prepared and changed == []


def test_a_loss_plans_input_link_is_dialled_ahead_and_the_others_hung_up(served, tmp_path):
    """The controller dials the next generation's input link to each possible first device before any loss; the
    aborting switch takes the one of its plan (proven for that generation, so the agent runs on it) and hangs up
    the others. Every result once."""
    total = 80
    feed = ListFeed(rows_of(served), total)
    with agents(served, tmp_path, feed, 2) as a:
        units = read_manifest(served.parts / served.name).units
        plan_a = [(1, 30, 1), (31, units, 2)]
        plan_b = [(1, units, 2)]
        a.push_all(plan_a + plan_b)
        a.run(1, plan_a, abort=True)
        a.stream.dial_ahead(2, [(d, "127.0.0.1", a.devices[d].runtime_port) for d in (1, 2)])
        ahead = dict(a.stream._ahead)
        assert set(ahead) == {(2, 1), (2, 2)}
        wait_for(lambda: all(p.done.is_set() for p in ahead.values()) and len(feed.delivered) >= 20)
        assert all(p.sock is not None for p in ahead.values())
        used = ahead[(2, 2)].sock
        new = a.run(2, plan_b, abort=True)
        wait_for(lambda: a.ledger.done, 60)
        assert new.sockets[0] is used and ahead[(2, 1)].cancel.is_set() and not a.stream._ahead
        wait_for(lambda: new.results_done.is_set())
        check_results(served, feed, total)


def wait_for(condition, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return True


def ended(a: Agents, seen: list) -> dict[tuple[int, int], Optional[int]]:
    """(device, generation) -> the generation its downstream link went on as (None: END), of every role ended so
    far; `seen` keeps the events drained before."""
    seen += [e for e in drain(a.fleet) if e[0] == "ended"]
    return {(e[1], e[2]): e[3] for e in seen}


def drain(fleet: Fleet) -> list:
    found = []
    while True:
        try:
            found.append(fleet.events.get_nowait())
        except queue.Empty:
            return found


def test_a_promised_link_is_the_old_roles_socket_or_nothing_and_never_leaks():
    """HandOver: the new role takes the old role's socket once given; None when the old role ended without
    handing it on (then the new role dials its own); a socket given after the new role was dropped is closed."""
    promised = HandOver(2)
    a, b = socket.socketpair()
    threading.Timer(0.05, promised.give, args=(a,)).start()
    assert promised.take(threading.Event()) is a
    nothing = HandOver(3)
    nothing.give(None)
    assert nothing.take(threading.Event()) is None
    stop = threading.Event()
    stop.set()
    dropped = HandOver(4)
    with pytest.raises(DnnpipeError, match="stopped while the previous role drained"):
        dropped.take(stop)
    c, d = socket.socketpair()
    dropped.give(c)  # the old role hands on after its successor was cut: nobody would take it
    assert c.fileno() == -1
    for s in (a, b, d):
        s.close()
