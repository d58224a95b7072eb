"""`python -m dnnpipe serve` as a real process over real stage processes on loopback, with `local` devices:
the happy path, devices killed, frozen, slowed down or joining, serve interrupted and resumed. Every run's
OUT must hold every input exactly once, equal to the model's outputs, and leave no process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import h5py
import pytest

from helpers import ROOT, assert_clean_error, run_script
from dnnpipe.runtime.local import free_ports
from serve_setup import Served, make_served

INPUTS = 500
FPS = "150"  # about 3.5 s of inputs: long enough to act on a running pipeline


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

    def pid(self, stage: int, epoch_line: int = 0) -> int:
        """The pid of a stage as serve announced it (in its first epoch by default)."""
        found = [line for line in self.lines if line.startswith(f"serve: stage {stage} on device")]
        return int(found[epoch_line].rsplit(" ", 1)[1])

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


def stage_processes(root: Path) -> list[int]:
    """Processes working in one of the test's device folders: stages that outlived serve."""
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
    while stage_processes(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not stage_processes(root), f"stage processes left behind: {stage_processes(root)}"


def serve_run(served: Served, tmp_path: Path, devices=(1, 2, 3, 4), extra: tuple[str, ...] = (),
              inputs: int = INPUTS, registry: Optional[Path] = None, speed: bool = False) -> tuple[Run, Path]:
    """serve in the background; without `speed`, re-planning for measured speeds is practically off (a
    threshold of 100x), so a test of one fault is not disturbed by this shared host's timing noise."""
    registry = registry or served.registry(list(devices), tmp_path / "registry.json")
    out = tmp_path / "out.h5"
    args = served.args(registry, out, "--num-inputs", str(inputs), "--fps", FPS, "--progress-timeout", "2",
                       *(() if speed else ("--threshold", "100")), *extra)
    return Run(args), out


def finish(run: Run, served: Served, out: Path, inputs: int = INPUTS) -> str:
    code, stdout, stderr = run.wait()
    assert code == 0, f"{stdout}\n{stderr}"
    served.check(out, inputs)
    assert f"{inputs} of {inputs} results stored" in stdout and "0 duplicates" in stdout
    assert_no_orphans(served.root)
    return stdout


def test_serve_stores_every_result_once_in_input_order(served, tmp_path):
    run, out = serve_run(served, tmp_path, inputs=40, extra=())
    stdout = finish(run, served, out, 40)
    assert "epoch 1: first result" in stdout and "0 switches" in stdout


def kill_stage(stage: int) -> Callable[[Run], None]:
    return after(0.5, lambda run: os.kill(run.pid(stage), signal.SIGKILL))


@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(4, marks=pytest.mark.slow)])
def test_a_killed_stage_is_re_planned_away_and_nothing_is_lost(served, tmp_path, stage):
    run, out = serve_run(served, tmp_path)
    run.on("epoch 1: first result", kill_stage(stage))
    stdout = finish(run, served, out)
    device = stage  # the plan puts stage k on device k
    assert f"device {device} lost: stage {stage} " in stdout
    assert "epoch 2: first result" in stdout
    replans = [line for line in stdout.splitlines() if f"re-plan (device {device} lost)" in line]
    assert replans and f", {device}]" not in replans[0].split(":", 2)[2].split(", bottleneck")[0]


@pytest.mark.slow
def test_a_frozen_stage_is_detected_by_its_silence(served, tmp_path):
    run, out = serve_run(served, tmp_path)
    run.on("epoch 1: first result", after(0.5, lambda run: os.kill(run.pid(3), signal.SIGSTOP)))
    stdout = finish(run, served, out)
    assert "device 3 lost: stage 3 sent no heartbeat" in stdout


@pytest.mark.slow
def test_a_slow_device_is_measured_and_planned_around(served, tmp_path):
    run, out = serve_run(served, tmp_path, extra=("--emulate-speed", "--emulate-change", "0.5:2=0.05"), speed=True)
    stdout = finish(run, served, out)
    assert "device 2 now emulates speed 0.05" in stdout
    replans = [line for line in stdout.splitlines() if "re-plan (measured speed" in line and "device 2" in line]
    assert replans, stdout
    stages = json.loads(replans[0].split("): ", 1)[1].split(", bottleneck")[0])
    before = json.loads(stdout.split("re-plan (start): ", 1)[1].split(", bottleneck")[0])
    units = {d: e - s + 1 for s, e, d in stages}
    assert units.get(2, 0) < {d: e - s + 1 for s, e, d in before}[2]


@pytest.mark.slow
def test_a_device_that_joins_is_planned_in(served, tmp_path):
    ports = dict(zip((1, 2, 3, 4), free_ports(4)))
    registry = served.registry([1, 2, 3], tmp_path / "registry.json", ports)

    def join(run: Run) -> None:
        served.registry([1, 2, 3, 4], registry, ports)
        run.process.send_signal(signal.SIGHUP)

    run, out = serve_run(served, tmp_path, registry=registry, speed=True)
    run.on("epoch 1: first result", after(0.5, join))
    stdout = finish(run, served, out)
    assert "device 4 joined" in stdout
    assert "re-plan (device 4 joined)" in stdout and "epoch 2: first result" in stdout


@pytest.mark.slow
def test_interrupted_serve_stops_its_stages_and_resumes(served, tmp_path):
    run, out = serve_run(served, tmp_path)
    run.on("epoch 1: first result", after(1.0, lambda run: run.process.send_signal(signal.SIGINT)))
    code, stdout, stderr = run.wait()
    assert code == 130, stdout + stderr
    assert_no_orphans(served.root)
    with h5py.File(out) as f:
        stored = int(f.attrs["stored"])
        assert 0 < stored < INPUTS and not f.attrs["complete"]
    run, out = serve_run(served, tmp_path, extra=("--resume",))
    stdout = finish(run, served, out)
    assert f"resumed: {stored} of {INPUTS} results already in" in stdout


def test_no_plan_for_the_devices_is_one_line(served, tmp_path):
    config = json.loads(served.config.read_text())
    config["device_config"]["M"] = [0.001] * 4
    small = tmp_path / "config.json"
    small.write_text(json.dumps(config))
    registry = served.registry([1, 2], tmp_path / "registry.json")
    args = served.args(registry, tmp_path / "out.h5")
    args[args.index("--config") + 1] = str(small)
    assert_clean_error(run_script("dnnpipe", *args, timeout=60), "no plan can serve the remaining devices [1, 2]")


@pytest.mark.slow
def test_stages_stop_on_their_own_when_serve_is_killed(served, tmp_path):
    """SIGKILL leaves serve no chance to clean up: the stages notice their control channel closing and stop."""
    run, _ = serve_run(served, tmp_path)
    run.on("epoch 1: first result", after(0.5, lambda run: run.process.kill()))
    code, stdout, _ = run.wait()
    assert code == -signal.SIGKILL and "epoch 1: first result" in stdout
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


@pytest.mark.slow
def test_a_device_whose_port_is_taken_is_planned_around(served, tmp_path):
    """Its stage cannot listen, exits before it comes up: the device is lost and the run goes on without it."""
    ports = dict(zip((1, 2, 3, 4), free_ports(4)))
    registry = served.registry([1, 2, 3, 4], tmp_path / "registry.json", ports)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports[3]))
        squatter.listen(1)
        run, out = serve_run(served, tmp_path, registry=registry, inputs=60)
        stdout = finish(run, served, out, 60)
    assert "device 3 lost: stage 3 exited with status 1 before it came up" in stdout


@pytest.mark.slow
def test_a_device_taken_out_of_the_registry_is_planned_away(served, tmp_path):
    ports = dict(zip((1, 2, 3, 4), free_ports(4)))
    registry = served.registry([1, 2, 3, 4], tmp_path / "registry.json", ports)

    def leave(run: Run) -> None:
        served.registry([1, 3, 4], registry, ports)
        run.process.send_signal(signal.SIGHUP)

    run, out = serve_run(served, tmp_path, registry=registry)
    run.on("epoch 1: first result", after(0.5, leave))
    stdout = finish(run, served, out)
    assert f"device 2 lost: device 2 was removed from {registry}" in stdout
