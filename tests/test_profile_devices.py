"""Per-device profiling: the profiling model and the timer shipped to each device, every unit timed there."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import models
from dnnpipe.config import parse_config
from dnnpipe.deploy.registry import Device
from dnnpipe.deploy.closure import closure
from dnnpipe.errors import DnnpipeError
from dnnpipe.keygen import create_certificate
from dnnpipe.profile.devices import PID, DeviceProfileOptions, DeviceTimes, Outcome, parse_result, profile_device, \
    profile_devices, uploads, with_device_rows
from dnnpipe.profile.devices import link_costs as devices_link_costs
from dnnpipe.profile.costs import unit_times
from dnnpipe.profile.timer import frame_costs, link_costs, time_units
from dnnpipe.planner import Problem, plan
from dnnpipe.testbed.pacing import emulation
from dnnpipe.profile.profiler import profiling_model
from helpers import POLICY_VISIBLE, ROOT

FAST = DeviceProfileOptions(repeats=3, warmup=1, sustain=0.01, seconds=120)


@pytest.fixture(scope="module")
def converted():
    return profiling_model(models.residual_cnn())


def test_the_timer_needs_no_tensorflow():
    modules = closure(ROOT, "dnnpipe.profile.timer")
    assert "dnnpipe.interpreter" in modules
    assert not any(m.startswith(("dnnpipe.partition", "dnnpipe.planner", "dnnpipe.deploy", "dnnpipe.serve"))
                   for m in modules)
    code = "import sys, dnnpipe.profile.timer; print(any(m.startswith('tensorflow') for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_rows_add_up_to_each_device_whole_model_and_C_is_relative_to_device_1():
    one = DeviceTimes(1, 0.1, 10.0, (2.0, 4.0, 6.0))  # units 2, 4, 6 ms after the probe: scaled to 10 ms
    two = DeviceTimes(2, 0.1, 40.0, (1.0, 1.0, 2.0))
    assert one.E == pytest.approx([10 / 6, 20 / 6, 30 / 6])
    devices = [Device(1, "local"), Device(2, "local")]
    config = {"device_config": {"N": 1, "C": [1.0], "M": [50.0, 60.0]},
              "model_config": {"U": 3, "E": [1.0, 1.0, 1.0], "R": [1.0, 1.0, 1.0]}}
    rows = with_device_rows(config, [Outcome(devices[1], two), Outcome(devices[0], one)])
    assert rows["device_config"]["C"] == [1.0, 0.25] and rows["device_config"]["N"] == 2
    assert rows["model_config"]["E_device"][1] == pytest.approx([10.0, 10.0, 20.0])
    assert parse_config(rows, "test").profile.E_device is not None  # the planners read it
    assert "link_cpu" not in rows["device_config"]  # none measured


def test_measured_link_cpu_goes_into_the_config_when_it_has_links():
    one = DeviceTimes(1, 0.1, 10.0, (2.0, 4.0, 6.0), send_ms_per_mb=3.0, receive_ms_per_mb=4.0, frame_ms=0.5)
    two = DeviceTimes(2, 0.1, 40.0, (1.0, 1.0, 2.0), send_ms_per_mb=9.0, receive_ms_per_mb=12.0, frame_ms=None)
    outcomes = [Outcome(Device(2, "local"), two), Outcome(Device(1, "local"), one)]
    config = {"device_config": {"N": 2, "C": [1.0, 1.0], "M": [50.0, 60.0], "B": [100.0, 100.0]},
              "model_config": {"U": 3, "E": [1.0, 1.0, 1.0], "R": [1.0, 1.0, 1.0], "A": [1.0, 2.0, 3.0, 4.0]}}
    rows = with_device_rows(config, outcomes)
    assert rows["device_config"]["link_cpu"] == {"send_ms_per_mb": [3.0, 9.0], "receive_ms_per_mb": [4.0, 12.0],
                                                 "frame_ms": [0.5, 0.0]}
    loaded = parse_config(rows, "test")
    assert loaded.cluster.link_cpu is not None and loaded.cluster.link_cpu.send_ms_per_mb == (3.0, 9.0)
    del config["device_config"]["B"]  # without links the config could not hold it: left out
    assert "link_cpu" not in with_device_rows(config, outcomes)["device_config"]


@pytest.mark.parametrize("log, message", [
    ("timed 10/41 units\n", "without a result: timed 10/41"),
    ("", "its log is empty"),
    ('RESULT {"probe_ms": 0.1, "whole_ms": 1, "units_ms": [1]}', r"1 unit times \(expected 3\)"),
    ('RESULT {"probe_ms": 0.1, "whole_ms": 1, "units_ms": [1, -1, 2]}', "negative"),
    ('RESULT {"probe_ms": 0.1}', "malformed"),
])
def test_a_bad_timer_result_is_refused(log, message):
    with pytest.raises(DnnpipeError, match=message):
        parse_result(1, log, 3)


def test_local_devices_are_profiled_and_a_failing_one_is_named(converted, tmp_path):
    graph, flatbuffer = converted.graph, converted.flatbuffer
    devices = [Device(1, "local", remote_dir=str(tmp_path / "d1"), python=sys.executable),
               Device(2, "local", remote_dir=str(tmp_path / "d2"), python=str(tmp_path / "no-python"))]
    said = []
    outcomes = profile_devices(flatbuffer, devices, graph.U, FAST, said.append)
    assert outcomes[0].times is not None and len(outcomes[0].times.E) == graph.U, said
    times = outcomes[0].times
    assert times.whole_ms > 0 and sum(times.E) == pytest.approx(times.whole_ms, abs=1e-4)
    assert outcomes[1].times is None and "no-python" in outcomes[1].error
    assert any(line.startswith("device 2: FAILED") for line in said)
    assert any(line.startswith("device 1: whole model") for line in said)
    assert (tmp_path / "d1" / "dnnpipe" / "profile" / "timer.py").is_file()
    assert json.loads(json.dumps([o.error for o in outcomes]))  # plain data


def link_config(send=None, receive=None, frame=None):
    """Two devices, three units; cut 1 is 2 MB, cut 2 is 1 MB; 1000 Mbit/s links; each device's link CPU."""
    devices = {"N": 2, "C": [1.0, 1.0], "M": [100, 100], "B": [1000, 1000]}
    if send is not None:
        devices["link_cpu"] = {"send_ms_per_mb": send, "receive_ms_per_mb": receive, "frame_ms": frame or [0, 0]}
    return parse_config({"device_config": devices,
                         "model_config": {"U": 3, "E": [10.0, 10.0, 10.0], "R": [1.0] * 3,
                                          "A": [1e6, 2e6, 1e6, 1e3]}}, "test")


def test_the_prediction_counts_each_device_measured_link_cpu_and_keeps_the_papers():
    stages = [[1, 1, 1], [2, 3, 2]]
    paper, counted = emulation(link_config(), stages, 1.0), emulation(link_config([3.0, 100.0], [1.0, 4.0]),
                                                                       stages, 1.0)
    # stage 1 takes in the input (1 MB x 1 ms) and sends cut 1 (2 MB x 3 ms; 16 ms on the link): 10 + 7 ms of CPU
    # stage 2 receives cut 1 (2 MB x 4 ms) and passes on the result (1 kB x 100 ms): 20 + 8.1 ms
    assert [s.link_cpu_ms for s in counted.stages] == pytest.approx([7.0, 8.1])
    assert [s.period_ms for s in counted.stages] == pytest.approx([17.0, 28.1])
    assert counted.throughput == pytest.approx(1000 / 28.1)
    assert counted.paper_throughput == pytest.approx(paper.throughput) == pytest.approx(1000 / 20)


def test_the_prediction_and_the_plan_are_the_same_numbers():
    # One formula: the planner's periods are the prediction's, for the plan it picks and any other.
    config = link_config([3.0, 100.0], [100.0, 4.0], [1.5, 2.5])
    result = plan(config)
    predicted = emulation(config, result.stages, 1.0)
    assert [s.period_ms for s in predicted.stages] == result.stage_times_ms
    assert 1000 / predicted.throughput == result.bottleneck


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("matrix", [False, True])
def test_the_prediction_is_the_plans_numbers_to_the_last_bit(seed, matrix):
    # Float unit times (a sum of E over C differs from the prefix sums' difference in the last bit) and a B_link
    # matrix (the hop is not min(B[d], B[e])): every stage's period and hop are the planner's, bit for bit.
    rng = random.Random(seed)
    N, U = rng.randint(2, 4), rng.randint(3, 9)
    devices = {"N": N, "C": [rng.uniform(0.3, 3) for _ in range(N)], "M": [1e3] * N,
               "B": [rng.uniform(10, 1000) for _ in range(N)],
               "link_cpu": {key: [rng.uniform(0, 40) for _ in range(N)]
                            for key in ("send_ms_per_mb", "receive_ms_per_mb", "frame_ms")}}
    if matrix:
        devices["B_link"] = [[rng.uniform(1, 100) for _ in range(N)] for _ in range(N)]
    model = {"U": U, "E": [rng.uniform(0.1, 30) for _ in range(U)], "R": [1.0] * U,
             "A": [rng.uniform(1e3, 1e6) for _ in range(U)] + [0.0]}  # the planner's last period counts a sink hop
    if seed % 2:
        model["E_device"] = [[rng.uniform(0.1, 30) for _ in range(U)] for _ in range(N)]
    config = parse_config({"device_config": devices, "model_config": model}, "test")
    problem = Problem.from_config(config)
    ends = sorted(rng.sample(range(1, U), rng.randint(0, min(N, U) - 1))) + [U]
    stages = [[start + 1, end, rng.randint(1, N)] for start, end in zip([0, *ends], ends)]
    cuts = [(start - 1, end, device - 1) for start, end, device in stages]
    periods, _ = problem.periods(cuts)
    predicted = emulation(config, stages, 1.0)
    assert [s.period_ms for s in predicted.stages] == periods
    assert [s.hop_ms for s in predicted.stages[:-1]] == [problem.hop_ms(k, d, following[2]) for (_, k, d), following
                                                         in zip(cuts, cuts[1:])]
    assert [s.link_cpu_ms for s in predicted.stages] == [problem.link_cpu_ms(*c) for c in cuts]


def pipeline_certificate(folder, tls: bool) -> None:
    """The pipeline certificate the timer measures TLS with, when asked for TLS (skipped without openssl)."""
    if tls:
        if shutil.which("openssl") is None:
            pytest.skip("openssl is not installed: no pipeline certificate to measure TLS with")
        create_certificate(folder)


@pytest.mark.parametrize("tls", [True, False])
def test_the_timer_measures_the_cpu_of_sending_and_receiving_cuts(tmp_path, tls):
    pipeline_certificate(tmp_path, tls)
    costs = link_costs(tmp_path, 0.2, slowdown=2.0)
    assert costs["tls"] is tls and costs["megabytes"] > 0 and costs["slowdown"] == 2.0
    assert 0 < costs["send_ms_per_mb"] < 1000 and 0 < costs["receive_ms_per_mb"] < 1000


def test_a_devices_link_cpu_comes_back_with_its_row(converted, tmp_path):
    graph, flatbuffer = converted.graph, converted.flatbuffer
    devices = [Device(1, "local", remote_dir=str(tmp_path / "d1"), python=sys.executable)]
    outcomes = profile_devices(flatbuffer, devices, graph.U, FAST, lambda line: None)
    times = outcomes[0].times
    assert times is not None and times.send_ms_per_mb > 0 and times.receive_ms_per_mb > 0
    assert times.link_tls is (shutil.which("openssl") is not None)
    assert times.frame_ms is not None and times.frame_ms > 0
    assert devices_link_costs(outcomes) == [{"device": 1, "send_ms_per_mb": times.send_ms_per_mb,
                                             "receive_ms_per_mb": times.receive_ms_per_mb, "tls": times.link_tls,
                                             "frame_ms": times.frame_ms, "cpu_share": times.cpu_share}]
    assert 0 < times.cpu_share <= 1
    assert devices_link_costs([Outcome(devices[0], DeviceTimes(1, 0.1, 1.0, (1.0,)))]) is None


def test_the_prediction_counts_each_devices_cpu_per_frame_on_every_stage():
    stages = [[1, 1, 1], [2, 3, 2]]
    counted = emulation(link_config([3.0, 100.0], [1.0, 4.0], [1.5, 2.5]), stages, 1.0)
    # as above, and each stage pays its own device's CPU per frame, however small its cuts
    assert [s.link_cpu_ms for s in counted.stages] == pytest.approx([8.5, 10.6])
    assert counted.throughput == pytest.approx(1000 / 30.6)
    assert counted.paper_throughput == pytest.approx(1000 / 20)
    single = emulation(link_config([3.0, 100.0], [1.0, 4.0], [1.5, 2.5]), [[1, 3, 1]], 1.0)  # no cut between
    # stages: the input in (1 MB x 1 ms), the result out (1 kB x 3 ms) and the frame cost remain
    assert single.stages[0].link_cpu_ms == pytest.approx(1.0 + 0.003 + 1.5)


@pytest.mark.parametrize("tls", [True, False])
def test_the_timer_measures_a_stages_own_cpu_per_frame(tmp_path, tls):
    pipeline_certificate(tmp_path, tls)
    cost = frame_costs(tmp_path, slowdown=2.0, seconds=0.3)
    assert cost["tls"] is tls and cost["frames"] == 30
    assert 0 < cost["cpu_ms"] < 100 and cost["frame_ms"] == pytest.approx(2 * cost["cpu_ms"], rel=1e-3)


def test_a_timer_result_with_a_bad_frame_cost_is_refused():
    log = 'RESULT {"probe_ms": 0.1, "whole_ms": 1, "units_ms": [1], "link": {"send_ms_per_mb": 1, ' \
          '"receive_ms_per_mb": 1, "tls": true, "frame_ms": -0.5}}'
    with pytest.raises(DnnpipeError, match="negative"):
        parse_result(1, log, 1)
    times = parse_result(1, log.replace("-0.5", "0.5"), 1)
    assert times.frame_ms == 0.5


def test_a_timer_result_with_a_bad_link_cost_is_refused():
    log = 'RESULT {"probe_ms": 0.1, "whole_ms": 1, "units_ms": [1], "link": {"send_ms_per_mb": -1, ' \
          '"receive_ms_per_mb": 1, "tls": true}}'
    with pytest.raises(DnnpipeError, match="negative"):
        parse_result(1, log, 1)


def running_in(folder) -> list[int]:
    """Processes whose working folder is `folder` (a local device's timer runs in its remote_dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == folder and \
                    (proc / "stat").read_text().rpartition(")")[2].split()[0] != "Z":
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def test_ctrl_c_while_a_device_times_stops_its_timer(converted, tmp_path):
    """The timer was stopped on the deadline path only: Ctrl-C (or a transport error) left it running."""
    model = tmp_path / "model.tflite"
    model.write_bytes(converted.flatbuffer)
    device = Device(1, "local", remote_dir=str(tmp_path / "d1"), python=sys.executable)
    pid_file = tmp_path / "d1" / PID

    def interrupt() -> None:  # Ctrl-C once the timer runs
        deadline = time.monotonic() + 60
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    options = DeviceProfileOptions(repeats=3, warmup=1, sustain=5.0, seconds=120, link=False)
    with pytest.raises(KeyboardInterrupt):
        profile_device(device, uploads(model), converted.graph.U, options, lambda line: None)
    assert running_in((tmp_path / "d1").resolve()) == []


@pytest.mark.skipif(not POLICY_VISIBLE, reason="needs Linux and the tests under the default scheduling policy")
def test_the_timer_times_as_batch_work_as_a_stage_runs(converted, tmp_path):
    """runtime.priority: a stage and an agent run as batch work, so the frame costs are measured as they pay them."""
    model = tmp_path / "model.tflite"
    model.write_bytes(converted.flatbuffer)
    device = Device(1, "local", remote_dir=str(tmp_path / "d1"), python=sys.executable)
    pid_file, seen = tmp_path / "d1" / PID, []

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and os.SCHED_BATCH not in seen:
            try:
                seen.append(os.sched_getscheduler(int(pid_file.read_text())))
            except (OSError, ValueError):  # not started yet, or already done
                pass
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    profile_device(device, uploads(model), converted.graph.U, FAST, lambda line: None)
    watcher.join(60)
    assert os.SCHED_BATCH in seen


def test_the_device_timer_shares_fused_groups_as_the_host_profiler_does(converted, tmp_path):
    """The timer timed unit_* signatures only, where the host's E shares each fused group's time (units_i_k)
    among its units: the rows of E_device were computed otherwise than E."""
    assert converted.groups, "the test model needs a fused group"
    (tmp_path / "model.tflite").write_bytes(converted.flatbuffer)
    result = time_units(str(tmp_path / "model.tflite"), repeats=3, warmup=1, num_threads=1, seconds=0.01)
    assert set(result["groups_ms"]) == {f"{i + 1}_{k}" for i, k in converted.groups}
    for i, k in converted.groups:
        together = max(0.0, result["groups_ms"][f"{i + 1}_{k}"] - result["probe_ms"])
        assert sum(result["units_ms"][i:k]) == pytest.approx(together)
    assert len(result["units_ms"]) == converted.graph.U and min(result["units_ms"]) >= 0


def test_unit_times_remove_the_probe_and_share_each_group():
    assert unit_times(1.0, [2.0, 4.0, 1.5, 0.5], {(0, 2): 10.0}) == [2.25, 6.75, 0.5, 0.0]
    assert unit_times(1.0, [1.0, 1.0], {(0, 2): 5.0}) == [2.0, 2.0]  # evenly when alone they cost nothing
