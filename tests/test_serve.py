"""`python -m dnnpipe serve` as a real process over real device agents on loopback (`local` devices): the happy
path, an agent killed, frozen, a device slowed down or joining, serve interrupted and resumed, serve killed. Every
run's OUT must hold every input exactly once, equal to the model's outputs, and leave no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import h5py
import pytest

from helpers import POLICY_VISIBLE, ROOT, assert_clean_error, run_script
from dnnpipe.config import load_config
from dnnpipe.serve.decide import staying_links
from dnnpipe.testbed.local import free_ports
from serve_setup import Served, make_served

INPUTS = 300
FPS = "150"  # about 2 s of inputs: long enough to act on a running pipeline


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    return make_served(tmp_path_factory.mktemp("serve"), [1.0, 1.0, 1.0, 1.0])


class Run:
    """serve running in the background; its lines as they come, and actions on the first line matching."""

    def __init__(self, args: list[str]):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
        self.process = subprocess.Popen([sys.executable, "-m", "dnnpipe", *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        self.lines: list[str] = []
        self.actions: list[tuple[str, Callable[[Run], None]]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def on(self, fragment: str, action: Callable[[Run], None]) -> None:
        self.actions.append((fragment, action))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            for fragment, action in list(self.actions):
                if fragment in line:
                    self.actions.remove((fragment, action))
                    threading.Thread(target=action, args=(self,), daemon=True).start()

    def pid(self, device: int) -> int:
        """The pid of a device's agent as serve announced it."""
        found = [line for line in self.lines if line.startswith(f"serve: agent on device {device} up, pid")]
        return int(found[-1].rsplit(" ", 1)[1])

    def wait(self, timeout: float = 90) -> tuple[int, str, str]:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("serve did not finish:\n" + "\n".join(self.lines)) from None
        self.reader.join(5)
        assert self.process.stderr is not None
        return self.process.returncode, "\n".join(self.lines), self.process.stderr.read()


def after(seconds: float, then: Callable[[Run], None]) -> Callable[[Run], None]:
    def act(run: Run) -> None:
        time.sleep(seconds)
        then(run)
    return act


def agent_processes(root: Path) -> list[int]:
    """Processes working in one of the test's device folders: agents that outlived serve."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(Path(os.readlink(entry / "cwd"))).startswith(str(root)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def assert_no_orphans(root: Path) -> None:
    deadline = time.monotonic() + 10
    while agent_processes(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not agent_processes(root), f"agents left behind: {agent_processes(root)}"


def serve_run(served: Served, tmp_path: Path, devices=(1, 2, 3, 4), extra: tuple[str, ...] = (),
              inputs: int = INPUTS, registry: Optional[Path] = None, speed: bool = False) -> tuple[Run, Path]:
    """serve in the background; without `speed`, re-planning for measured speeds is practically off (a
    threshold of 100x), and an agent is lost for its missing heartbeats after 2 s, not 0.5, so a test of one fault
    is not disturbed by this shared host's timing noise."""
    registry = registry or served.registry(list(devices), tmp_path / "registry.json")
    out = tmp_path / "out.h5"
    args = served.args(registry, out, "--num-inputs", str(inputs), "--fps", FPS, "--progress-timeout", "2",
                       *(() if speed else ("--threshold", "100")), *extra)
    return Run(args), out


def cutting_processes(work: Path) -> list[int]:
    """serve's cutting processes (serve/cutter.py) that write into `work`: none outlives serve."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if b"dnnpipe.serve.cutter" in command and any(arg.startswith(bytes(work)) for arg in command):
            found.append(int(entry.name))
    return found


def finish(run: Run, served: Served, out: Path, inputs: int = INPUTS) -> str:
    code, stdout, stderr = run.wait()
    assert code == 0, f"{stdout}\n{stderr}"
    served.check(out, inputs)
    assert f"{inputs} of {inputs} results stored" in stdout and "0 duplicates" in stdout
    assert_no_orphans(served.root)
    # background cuts were the cutting process's (it never failed), which left nothing behind
    assert "serve's own process" not in stdout, stdout
    work = out.parent / "serve_work" / served.name
    assert not list(work.glob("cuts.*")) and not cutting_processes(work)
    return stdout


def test_serve_stores_every_result_once_in_input_order(served, tmp_path):
    before = {p: p.read_bytes() for p in (served.parts / served.name).iterdir()}
    run, out = serve_run(served, tmp_path, inputs=40)
    policies: dict[int, object] = {}
    seen = threading.Event()

    def policy(device: int) -> object:
        try:
            return os.sched_getscheduler(run.pid(device))
        except OSError as e:  # the agent is gone already: named in the failure
            return e

    if POLICY_VISIBLE:  # agents run as batch work (runtime.priority), serve as it was started
        run.on("generation 1: first result",
               lambda run: (policies.update({d: policy(d) for d in (1, 2, 3, 4)}), seen.set()))
    stdout = finish(run, served, out, 40)
    if POLICY_VISIBLE:
        assert seen.wait(10) and policies == {d: os.SCHED_BATCH for d in (1, 2, 3, 4)}, policies
    assert "generation 1: first result" in stdout and "0 switches" in stdout
    assert {p: p.read_bytes() for p in (served.parts / served.name).iterdir()} == before  # the partition only read
    assert json.loads((tmp_path / "serve_work" / served.name / "serve_plan.json").read_text())["generation"] == 1


def test_a_killed_agent_is_planned_away_at_once_and_nothing_is_lost(served, tmp_path):
    run, out = serve_run(served, tmp_path)
    run.on("generation 1: first result", after(0.4, lambda run: os.kill(run.pid(2), signal.SIGKILL)))
    stdout = finish(run, served, out)
    assert "device 2 lost: its " in stdout  # its control link closed, or its process exited
    assert "generation 2: first result" in stdout and "switch: generation 2 runs 3 stages (at once" in stdout
    replan = line_with(stdout, "re-plan (device 2 lost")
    assert ", 2]" not in replan.split("): ", 1)[1]


def test_a_loss_once_serve_is_ready_for_it_needs_no_cut_or_push(served, tmp_path):
    """serve says when every plan for a loss is loaded ahead; a loss after that switches with nothing to push."""
    run, out = serve_run(served, tmp_path, inputs=1200)
    run.on("serve: ready for a loss", after(0.1, lambda run: os.kill(run.pid(2), signal.SIGKILL)))
    stdout = finish(run, served, out, 1200)
    ready = line_with(stdout, "ready for a loss")
    assert "any one of devices 1, 2, 3 and 4 is loaded ahead" in ready or "devices 1, 2 and 3 is loaded" in ready
    switch = line_with(stdout, "switch: generation 2 runs")
    assert "at once" in switch and "cut and pushed first" not in switch


def test_two_agents_killed_together_are_both_counted(served, tmp_path):
    def kill_two(run: Run) -> None:
        os.kill(run.pid(2), signal.SIGKILL)
        os.kill(run.pid(3), signal.SIGKILL)

    run, out = serve_run(served, tmp_path)
    run.on("generation 1: first result", after(0.4, kill_two))
    stdout = finish(run, served, out)
    assert "device 2 lost" in stdout and "device 3 lost" in stdout
    final = json.loads(stdout.split("final plan ", 1)[1].split(" predicted")[0])
    assert {d for _, _, d in final} <= {1, 4}


def test_a_frozen_agent_is_detected_by_its_missing_heartbeats(served, tmp_path):
    run, out = serve_run(served, tmp_path)
    frozen: list[int] = []

    def freeze(run: Run) -> None:
        frozen.append(run.pid(3))
        os.kill(frozen[-1], signal.SIGSTOP)

    run.on("generation 1: first result", after(0.4, freeze))
    try:
        stdout = finish(run, served, out)
        # serve stopped it (after the recovery, or at its close at the latest), not the clean-up below
        with pytest.raises(ProcessLookupError):
            os.kill(frozen[0], 0)
    finally:  # a frozen agent cannot stop on its own: left behind, it would count as every later test's orphan
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert "device 3 lost: no heartbeat for" in stdout and "generation 2: first result" in stdout


def test_a_slow_device_is_measured_and_switched_behind_a_barrier(served, tmp_path):
    run, out = serve_run(served, tmp_path, inputs=600,
                         extra=("--emulate-speed", "--emulate-change", "0.3:2=0.05"), speed=True)
    stdout = finish(run, served, out, 600)
    assert "device 2 now emulates speed 0.05" in stdout
    replan = line_with(stdout, "re-plan (measured speed")
    assert "device 2" in replan and "behind a barrier" in stdout
    # the new roles were loaded while the old plan served; only then the barrier
    assert stdout.index(replan) < stdout.index("every new role loaded beside the running plan") < \
        stdout.index("switch: generation 2")
    # the slowed device's work shrinks: its units' profiled time, not their count (a cheap tail of more units can
    # be its best share: 13 units 61-73 after 12 units 26-37 in one run that measured it at 0.062)
    profile = load_config(served.config).profile

    def work(stages: list[list[int]]) -> float:
        row = profile.E_device[1] if profile.E_device is not None else profile.E
        return sum(sum(row[s - 1:e]) for s, e, d in stages if d == 2)

    before = plan_in(line_with(stdout, "re-plan (start)"))
    assert work(plan_in(replan)) < work(before), stdout


def test_a_device_lost_while_it_drains_the_old_plan_has_those_inputs_replayed(served, tmp_path):
    """A planned switch moves the plan off a slowed device, which still drains the old plan's queued frames
    behind the barrier; killed then, those inputs were neither delivered nor replayed (the loss of an idle device
    switches nothing, and the old route's faults were of a past generation: a 30 s stall, with a live feed a
    hang). Now the loss is the running pipeline's fault too: an aborting switch replays them. Every result once."""
    run, out = serve_run(served, tmp_path, inputs=600,
                         extra=("--emulate-speed", "--emulate-change", "0.3:2=0.003"), speed=True)
    run.on("switch: generation 2", lambda run: os.kill(run.pid(2), signal.SIGKILL))
    stdout = finish(run, served, out, 600)
    assert "device 2 lost" in stdout
    assert "no result for" not in stdout  # before: those inputs waited out the 30 s stall (a live feed: forever)
    replan = line_with(stdout, "re-plan (measured speed")
    if 2 not in {d for _, _, d in plan_in(replan)}:  # device 2 only drained: its loss alone is the replay's cause
        assert "it still ran a draining plan's frames" in stdout or "pipeline failed" in stdout, stdout


def line_with(stdout: str, text: str) -> str:
    """serve's first line saying `text`: missing, the failure shows what serve said."""
    found = next((line for line in stdout.splitlines() if text in line), None)
    assert found is not None, f"serve never said {text!r}:\n{stdout}"
    return found


def plan_in(line: str) -> list[list[int]]:
    """The stages a "re-plan (...): [[...]], N inf/s predicted" line names."""
    return json.loads(line.split("): ", 1)[1].split("]], ", 1)[0] + "]]")


def test_a_device_that_joins_is_planned_in_behind_a_barrier(served, tmp_path):
    ports = dict(zip((1, 2, 3, 4), free_ports(4)))
    registry = served.registry([1, 2, 3], tmp_path / "registry.json", ports)

    def join(run: Run) -> None:
        served.registry([1, 2, 3, 4], registry, ports)
        run.process.send_signal(signal.SIGHUP)

    run, out = serve_run(served, tmp_path, registry=registry, speed=True, inputs=900, extra=("--threshold", "0.01"))
    run.on("generation 1: first result", after(0.3, join))
    stdout = finish(run, served, out, 900)
    # re-read on the signal, or first for the registry's new mtime if serve's loop saw it before the signal
    assert "registry re-read: 1 new device(s) [4]" in stdout
    assert "device 4 joined" in stdout and "re-plan (device 4 joined)" in stdout
    assert "generation 2: first result" in stdout
    assert stdout.index("every new role loaded beside the running plan") < stdout.index("switch: generation 2")
    # the links of the plan before that the joined plan has too, up to where the chains part, went on (NEXT)
    start, joined = (plan_in(line_with(stdout, f"re-plan ({why})"))
                     for why in ("start", "device 4 joined"))
    stays = staying_links([d for *_, d in start], [d for *_, d in joined])
    assert f"({sum(stays)} links kept across them)" in stdout, stdout


def test_a_lost_device_that_answers_again_is_re_admitted_on_sighup(served, tmp_path):
    run, out = serve_run(served, tmp_path, speed=True, inputs=900, extra=("--threshold", "0.01"))
    run.on("generation 1: first result", after(0.3, lambda run: os.kill(run.pid(2), signal.SIGKILL)))
    run.on("generation 2: first result", after(0.2, lambda run: run.process.send_signal(signal.SIGHUP)))
    stdout = finish(run, served, out, 900)
    assert "probing lost [2]" in stdout and "device 2 joined" in stdout


def test_interrupted_serve_stops_its_agents_and_resumes(served, tmp_path):
    run, out = serve_run(served, tmp_path)
    run.on("generation 1: first result", after(0.7, lambda run: run.process.send_signal(signal.SIGINT)))
    code, stdout, stderr = run.wait()
    assert code == 130, stdout + stderr
    assert_no_orphans(served.root)
    with h5py.File(out) as f:
        stored = int(f.attrs["stored"])
        assert 0 < stored < INPUTS and not f.attrs["complete"]
    run, out = serve_run(served, tmp_path, extra=("--resume",))
    stdout = finish(run, served, out)
    assert f"resumed: {stored} of {INPUTS} results already in" in stdout


def test_agents_stop_on_their_own_when_serve_is_killed(served, tmp_path):
    """SIGKILL leaves serve no chance to clean up: the agents see their control link close and stop."""
    run, _ = serve_run(served, tmp_path)
    run.on("generation 1: first result", after(0.3, lambda run: run.process.kill()))
    code, stdout, _ = run.wait()
    assert code == -signal.SIGKILL and "generation 1: first result" in stdout
    assert_no_orphans(served.root)


def test_no_plan_for_the_devices_is_one_line(served, tmp_path):
    config = json.loads(served.config.read_text())
    config["device_config"]["M"] = [0.001] * 4
    small = tmp_path / "config.json"
    small.write_text(json.dumps(config))
    registry = served.registry([1, 2], tmp_path / "registry.json")
    args = served.args(registry, tmp_path / "out.h5")
    args[args.index("--config") + 1] = str(small)
    assert_clean_error(run_script("dnnpipe", *args, timeout=60), "no plan can serve the remaining devices [1, 2]")
    assert_no_orphans(served.root)


def test_bad_inputs_are_one_line_errors(served, tmp_path):
    registry = served.registry([1, 2, 3, 4], tmp_path / "registry.json")
    out = tmp_path / "out.h5"
    assert_clean_error(run_script("dnnpipe", *served.args(registry, out, "--emulate-change", "1:9=0.5"), timeout=60),
                       "--emulate-change: device 9 is not in the config")
    with h5py.File(out, "w") as f:
        f.attrs.update({"num_inputs": 7, "stored": 3})
    assert_clean_error(run_script("dnnpipe", *served.args(registry, out, "--num-inputs", "9", "--resume"), timeout=60),
                       f"{out}: cannot resume: it was made for 7 inputs, this run has 9")
    bare = tmp_path / "bare"
    shutil.copytree(served.parts, bare)
    (bare / served.name / "pipeline.key").unlink()
    args = served.args(registry, out)
    args[args.index("--model-path") + 1] = str(bare)
    assert_clean_error(run_script("dnnpipe", *args, timeout=60), "pipeline key not found")
    args[args.index("--model-path") + 1] = str(tmp_path / "nonexistent")
    assert_clean_error(run_script("dnnpipe", *args, timeout=60), f"{tmp_path / 'nonexistent' / served.name}: model "
                                                                 f"folder not found")


class LiveFeed:
    """A Feed whose inputs arrive over time and whose end is known only when it comes (the inference service's
    kind), optionally failing to take a result (a full disk)."""

    def __init__(self, rows, total: int, fail_at: Optional[int] = None):
        self.rows, self.total, self.fail_at = rows, total, fail_at
        self.started = time.monotonic()
        self.delivered: dict[int, object] = {}
        self.abandoned: dict[int, str] = {}

    def wait_input(self, index: int, timeout: float):
        due = self.started + index / 200  # 200 inputs a second arrive
        if index >= self.total:
            return None
        if time.monotonic() < due:
            time.sleep(min(timeout, due - time.monotonic()))
            return None
        return [self.rows[index % len(self.rows)]]

    def exhausted(self, index: int) -> bool:
        return index >= self.total

    def deliver(self, index: int, outputs: list) -> None:
        if index == self.fail_at:
            from dnnpipe.errors import DnnpipeError
            raise DnnpipeError(f"out.h5: cannot write row {index} (No space left on device)")
        assert index not in self.delivered
        self.delivered[index] = outputs[0][0].copy()

    def abandon(self, index: int, reason: str) -> None:
        self.abandoned[index] = reason


def live_options(served: Served, tmp_path: Path):
    from dnnpipe.serve.options import ServeOptions

    registry = served.registry([1, 2, 3], tmp_path / "registry.json")
    return ServeOptions(registry=registry, model_path=served.parts, model_name=served.name, config=served.config,
                        data_path=served.data, output_path=tmp_path / "unused.h5", threshold=100.0,
                        work_dir=tmp_path / "serve_work")


def test_a_live_feed_is_served_to_its_end_without_a_total_up_front(served, tmp_path):
    import numpy as np

    from dnnpipe.serve.controller import serve

    with h5py.File(served.data) as f:
        rows = f["images"][:]
    feed = LiveFeed(rows, 150)
    summary = serve(live_options(served, tmp_path), echo=lambda line: None, feed=feed)
    assert summary.stored == 150 and sorted(feed.delivered) == list(range(150)) and not feed.abandoned
    expected = next(iter(served.expected.values()))
    for index, got in feed.delivered.items():
        np.testing.assert_allclose(got, expected[index % len(rows)], rtol=1e-4, atol=1e-4)
    assert not (tmp_path / "unused.h5").exists()
    assert_no_orphans(served.root)


def test_a_feed_that_cannot_take_a_result_ends_serve_at_once_without_a_retry(served, tmp_path):
    from dnnpipe.errors import DnnpipeError
    from dnnpipe.serve.controller import serve

    with h5py.File(served.data) as f:
        rows = f["images"][:]
    lines: list[str] = []
    with pytest.raises(DnnpipeError, match="No space left on device"):
        serve(live_options(served, tmp_path), echo=lines.append, feed=LiveFeed(rows, 150, fail_at=20))
    assert not [line for line in lines if "pipeline failed" in line or "re-plan (" in line and "start" not in line]
    assert_no_orphans(served.root)


def test_ready_for_a_loss_is_said_once_when_every_plan_for_a_loss_is_loaded_and_taken_back_when_one_is_dropped(
        served, tmp_path):
    from dataclasses import replace
    from types import SimpleNamespace

    from dnnpipe.serve.controller import Controller
    from dnnpipe.serve.decide import Prepare, State, Switched, decide

    lines: list[str] = []
    readiness: list[bool] = []
    controller = Controller(live_options(served, tmp_path), lines.append)
    controller.events = SimpleNamespace(ready_for_loss=readiness.append)  # type: ignore[assignment]
    try:
        partition = tuple((s.units[0], s.units[1], s.device) for s in controller.manifest.stages)
        controller.state = State(partition, frozenset({1, 2, 3, 4}), frozenset())  # as serve starts
        start = controller.planner(frozenset(), {})
        assert start is not None
        controller.state, _ = decide(State(start.stages, frozenset({1, 2, 3, 4}), frozenset()), Switched(),
                                     controller.planner)
        needed = sorted({(d, (s, e)) for plan in controller.state.contingency.values() for s, e, d in plan.stages})
        route = SimpleNamespace(generation=1, first_result=None, announced=False)
        dialled: list = []
        controller.stream = SimpleNamespace(route=route, dial_ahead=lambda g, firsts: dialled.append(g))  # type: ignore[assignment]
        for device, units in needed:
            controller._sub_models(("prepared", device, units))
        controller._announce_covered(5.0)
        assert lines == []  # no first result said yet
        route.first_result, route.announced = 4.0, True
        controller._sub_models(("unloaded", *needed[0]))
        controller._announce_covered(5.0)
        assert lines == []  # one missing
        controller._sub_models(("prepared", *needed[0]))
        controller._announce_covered(5.5)
        controller._announce_covered(6.0)
        assert len(lines) == 1 and lines[0].startswith("serve: ready for a loss: the plan for the loss of any one of")
        assert "1.50 s after generation 1's first result" in lines[0] and dialled == [2]  # the plans' input links
        controller.pushed.update(needed)
        controller._sub_models(("unloaded", *needed[-1]))
        assert controller.deferred[-1] == Prepare(*needed[-1])  # still needed: pushed again
        controller._announce_covered(7.0)
        assert len(lines) == 2 and lines[1] == (f"serve: no longer ready for a loss: 1 sub-model(s) of its plans not "
                                                f"loaded on device {needed[-1][0]}; pushing them")
        controller._sub_models(("unloaded", 9, (1, 1)))  # one no plan needs: not pushed again
        assert controller.deferred[-1] == Prepare(*needed[-1]) and (9, (1, 1)) not in controller.pushed
        controller._sub_models(("prepared", *needed[-1]))
        controller.state = replace(controller.state)  # the same plans: said again only once they are all back
        controller._announce_covered(8.0)
        assert len(lines) == 3 and "ready for a loss" in lines[2]
        assert readiness == [True, False, True]  # the metric (dnnpipe_ready_for_loss) follows the lines
    finally:
        if controller.file_feed is not None:
            controller.file_feed.close()


def test_contingency_pushes_go_to_the_push_loop_one_at_a_time_once_the_switch_is_over(served, tmp_path):
    """The controller's hand-over (its choice is decide.next_push's): nothing before the new plan's first result or
    while a planned switch is pending; then one push at a time, the next only once the loop is idle again; a push
    for a device lost meanwhile is dropped and may be asked for again."""
    from dataclasses import replace
    from types import SimpleNamespace

    from dnnpipe.serve.controller import Controller
    from dnnpipe.serve.decide import State, Switched, decide

    controller = Controller(live_options(served, tmp_path), lambda line: None)
    try:
        partition = tuple((s.units[0], s.units[1], s.device) for s in controller.manifest.stages)
        controller.state = State(partition, frozenset({1, 2, 3}), frozenset({4}))  # as serve starts
        start = controller.planner(frozenset({4}), {})
        assert start is not None
        controller.state = replace(controller.state, stages=start.stages)
        controller.state, actions = decide(controller.state, Switched(), controller.planner)
        controller._carry_out(actions, 0.0)
        wanted = list(controller.deferred)
        assert len(wanted) >= 3
        pushed: list = []

        def push(action, background: bool = False) -> float:
            if background:  # the push loop's cuts are the cutting process's (else nothing is pushed: it fails)
                pushed.append(action)
            return 0.0  # the cut's CPU: the loop rests PUSH_REST_MIN

        controller._push = push  # type: ignore[method-assign]
        route = SimpleNamespace(first_result=None)
        controller.stream = SimpleNamespace(route=route)  # type: ignore[assignment]
        controller._push_contingencies()
        assert controller.pushes.empty()  # no first result yet
        route.first_result = 1.0
        controller.pending = object()  # type: ignore[assignment]
        controller._push_contingencies()
        assert controller.pushes.empty()  # a planned switch is pending
        controller.pending = None
        controller._push_contingencies()
        controller._push_contingencies()
        assert controller.pushes.qsize() == 1  # one at a time
        lost = wanted[1].device
        controller.state = replace(controller.state, devices=controller.state.devices - {lost},
                                   absent=controller.state.absent | {lost})
        asked: list[tuple[int, int]] = []  # before each push the loop waits until that board loaded its last one

        def settled(device: int) -> bool:
            asked.append((device, len(pushed)))
            return [d for d, _ in asked].count(device) % 2 == 0  # loaded on the second look

        controller.fleet = SimpleNamespace(settled=settled, closed=threading.Event())  # type: ignore[assignment]
        loop = threading.Thread(target=controller._push_loop, daemon=True)
        loop.start()
        deadline = time.monotonic() + 20
        while controller.deferred and time.monotonic() < deadline:
            if controller.push_idle.wait(0.05):
                controller._push_contingencies()
        controller.pushes.put(None)
        loop.join(20)
        assert pushed[0] == wanted[0] and [p for p in wanted if p.device != lost] == pushed
        assert asked == [(p.device, k) for k, p in enumerate(pushed) for _ in range(2)]  # asked before each push
        assert all((p.device, p.units) not in controller.pushed for p in wanted if p.device == lost)
    finally:
        if controller.file_feed is not None:
            controller.file_feed.close()
