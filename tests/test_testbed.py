"""The virtual testbed: usable cores, the pacing model, paced stages, and real namespaces with shaped links."""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import models
from dnnpipe.config import parse_config
from dnnpipe.errors import DnnpipeError
from dnnpipe.partition.graph import analyse
from dnnpipe.partition.partitioner import partition_keras_model
from dnnpipe.runtime.stage import RunOptions
from dnnpipe.testbed import local
from dnnpipe.testbed.local import run_local
from dnnpipe.runtime.metrics import read_timings
from dnnpipe.testbed import netns
from dnnpipe.testbed.cores import cgroup_quota, usable_cores
from dnnpipe.testbed.pacing import emulation, emulation_scale, fastest_device
from helpers import ROOT

needs_netns = pytest.mark.skipif(netns.why_not_available() is not None,
                                 reason=f"network namespaces: {netns.why_not_available()}")


# --- cores ---------------------------------------------------------------------------------------

def cgroup(tmp_path, line, files):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "proc").write_text(line + "\n")
    for rel, text in files.items():
        (tmp_path / "fs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / rel).write_text(text)
    return tmp_path / "proc", tmp_path / "fs"


def test_cgroup_v2_quota_is_the_tightest_of_the_group_and_its_parents(tmp_path):
    proc, root = cgroup(tmp_path, "0::/a/b", {"a/cpu.max": "150000 100000\n", "a/b/cpu.max": "max 100000\n"})
    assert cgroup_quota(proc, root) == 1.5


def test_cgroup_v1_quota_and_no_quota(tmp_path):
    proc, root = cgroup(tmp_path, "4:cpu,cpuacct:/job", {"cpu,cpuacct/job/cpu.cfs_quota_us": "50000",
                                                        "cpu,cpuacct/job/cpu.cfs_period_us": "100000"})
    assert cgroup_quota(proc, root) == 0.5
    proc, root = cgroup(tmp_path / "none", "0::/", {"cpu.max": "max 100000"})
    assert cgroup_quota(proc, root) is None


def test_usable_cores_follow_the_affinity_mask():
    code = "from dnnpipe.testbed.cores import usable_cores; print(usable_cores())"
    first = sorted(os.sched_getaffinity(0))[0]
    done = subprocess.run(["taskset", "-c", str(first), sys.executable, "-c", code], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert float(done.stdout) == 1.0, done.stderr
    assert usable_cores() <= len(os.sched_getaffinity(0))


# --- the pacing model ----------------------------------------------------------------------------

def config(**device):
    return parse_config({"device_config": {"N": 3, "C": [1, 0.5, 0.25], "M": [100] * 3, **device},
                         "model_config": {"U": 4, "E": [1, 2, 3, 4], "R": [1] * 4,
                                          "A": [1000, 2000, 500, 250, 10]}}, "test")


def test_free_ports_are_distinct_and_below_the_kernels_range_for_port_0(tmp_path, monkeypatch):
    low = int(local.EPHEMERAL_RANGE.read_text().split()[0]) if local.EPHEMERAL_RANGE.exists() else 32768
    ports = local.free_ports(16)
    assert len(set(ports)) == 16 and all(low - local.PORTS_BELOW <= p < low for p in ports)
    (tmp_path / "range").write_text("1024 60999\n")  # nothing below it to draw from: the kernel's choice
    monkeypatch.setattr(local, "EPHEMERAL_RANGE", tmp_path / "range")
    assert all(p >= 1024 for p in local.free_ports(3)) and len(set(local.free_ports(3))) == 3


def test_planned_stage_and_hop_times_by_hand():
    # Units 1-2 on device 2 (3 ms / 0.5), 3-4 on device 3 (7 ms / 0.25); cut 2 is 500 bytes over 4 Mbit/s.
    emulated = emulation(config(B=[8, 4, 8]), [[1, 2, 2], [3, 4, 3]], scale=0.5)
    assert [s.compute_ms for s in emulated.stages] == [12.0, 56.0]
    assert [s.hop_ms for s in emulated.stages] == [2.0, 0.0]  # 500 * 8e-3 / 4 = 1 ms, / 0.5
    assert emulated.period_ms == 56.0 and emulated.link_mbps == (4.0, 2.0, 4.0)
    link_bound = emulation(config(B=[8, 0.04, 8]), [[1, 2, 2], [3, 4, 3]], scale=1.0)
    assert link_bound.period_ms == pytest.approx(100.0)  # the hop, not the 28 ms stage
    assert emulation(config(), [[1, 4, 1]], 1.0).link_mbps is None


def test_a_plan_that_does_not_fit_the_config_is_one_clear_error():
    with pytest.raises(DnnpipeError, match="stage 2 \\(units 3-4 on device 5\\) does not fit its 4 units and 3"):
        emulation(config(), [[1, 2, 1], [3, 4, 5]], 1.0)


def test_scale_fits_a_quarter_of_the_cores_and_never_speeds_up():
    assert emulation_scale(config(), cores=2) == pytest.approx(2 * 0.25 / 1.75)
    assert emulation_scale(config(), cores=64) == 1.0


def test_per_device_rows_replace_speeds():
    data = config().to_dict()
    data["model_config"]["E_device"] = [[1, 2, 3, 4], [1, 1, 1, 1], [9, 9, 9, 9]]
    rows = parse_config(data, "test")
    assert emulation(rows, [[1, 2, 2], [3, 4, 1]], 1.0).pace_ms() == [2.0, 7.0]
    assert fastest_device(rows) == 2 and fastest_device(config()) == 1


def test_tbf_arguments():
    assert netns.tbf_arguments(40) == ["tbf", "rate", "40000000bit", "burst", str(netns.MTU + 14),
                                       "limit", str(16 << 20)]
    assert netns.tbf_arguments(8000)[4] == str(10**6)  # 1 ms of line rate once that exceeds a frame


# --- paced stages (loopback) ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("testbed")
    model = models.residual_cnn()
    U = analyse(model)[0].U
    partition_keras_model(model, [[1, 5, 2], [6, U, 1]], root / "p2" / "res", "res", "test", verify_chain=False)
    images = np.random.default_rng(0).random((6, 12, 12, 3)).astype("float32")
    with h5py.File(root / "data.h5", "w") as f:
        f["images"] = images
    return root, np.asarray(model(images, training=False))


def test_a_paced_stage_takes_its_planned_time_and_flags_frames_it_cannot_pace(pipeline, tmp_path):
    root, _ = pipeline
    run = run_local(root / "p2" / "res", root / "data.h5", None, tmp_path, pace_ms=[0.0001, 25.0],
                    run=RunOptions(num_inputs=12, queue_size=1), network=None)
    fast, slow = read_timings(tmp_path, 1), read_timings(tmp_path, 2)
    assert run.stages[0].overruns == 12 and all(t.overrun for t in fast)  # no host computes in 0.1 us
    assert run.stages[1].planned_ms == 25.0 and run.stages[1].overruns == 0
    # The device's own clock: frame n ends at least n x 25 ms after the first frame started, so n frames
    # after the first take at least (n - 1) x 25 ms even when the first one ended up to 25 ms late.
    assert slow[-1].infer_end - slow[0].infer_end >= (len(slow) - 2) * 0.025
    assert run.network == "loopback"


# --- namespaces (root only) ----------------------------------------------------------------------

def ours() -> list[str]:
    return [name for name in netns.namespaces() if name.startswith(f"{netns.PREFIX}{os.getpid()}-")]


@needs_netns
def test_pipeline_across_namespaces_equals_the_model_and_leaves_nothing(pipeline, tmp_path):
    root, expected = pipeline
    with netns.Testbed([1, 2], {1: 100.0, 2: 100.0}) as bed:
        assert sorted(ours()) == sorted([bed.hub, bed.namespace(1), bed.namespace(2)])
        run = run_local(root / "p2" / "res", root / "data.h5", tmp_path / "out.h5", tmp_path / "logs",
                        pace_ms=[5.0, 5.0], run=RunOptions(timeout=30), network=bed)
    assert ours() == [] and run.network == "netns"
    with h5py.File(tmp_path / "out.h5") as f:
        np.testing.assert_allclose(f["logits"][:], expected, rtol=1e-5, atol=1e-5)


RECEIVER = """
import socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], 50001)); s.listen(1); print("up", flush=True)
c, _ = s.accept(); c.recv(1, socket.MSG_WAITALL); began, left = time.perf_counter(), int(sys.argv[2]) - 1
while left: left -= len(c.recv(min(left, 1 << 20)))
print(time.perf_counter() - began)
"""
SENDER = "import socket, sys; s = socket.create_connection((sys.argv[1], 50001)); s.sendall(bytes(int(sys.argv[2])))"


@needs_netns
def test_links_are_shaped_to_the_slower_end():
    """1 MB from a 100 Mbit/s device to a 20 Mbit/s one takes at least 0.4 s (the host alone: milliseconds)."""
    size = 1_000_000
    with netns.Testbed([1, 2], {1: 100.0, 2: 20.0}) as bed:
        receiver = subprocess.Popen(bed.command(2, [sys.executable, "-c", RECEIVER, bed.address(2), str(size)]),
                                    stdout=subprocess.PIPE, text=True)
        try:
            assert receiver.stdout.readline().strip() == "up"
            subprocess.run(bed.command(1, [sys.executable, "-c", SENDER, bed.address(2), str(size)]), check=True,
                           timeout=60)
            seconds = float(receiver.communicate(timeout=60)[0])
        finally:
            receiver.kill()
            receiver.wait()
    assert seconds >= 0.95 * (size - 1) * 8 / 20e6


@needs_netns
def test_a_stale_set_from_a_killed_run_is_removed_with_its_processes():
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = f"{netns.PREFIX}{gone.pid}-d1"
    netns.run_ip("ip", "netns", "add", stale)
    sleeper = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while not netns.run_ip("ip", "netns", "pids", stale).strip() and time.monotonic() < deadline:
            time.sleep(0.05)  # until the sleeper is in the namespace
        with netns.Testbed([1]) as bed:
            assert stale in bed.stale and stale not in netns.namespaces()
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
    finally:
        sleeper.kill()
        if stale in netns.namespaces():
            netns.run_ip("ip", "netns", "del", stale)


@needs_netns
def test_ctrl_c_leaves_no_namespace_and_no_stage(pipeline, tmp_path):
    root, _ = pipeline
    config_file = tmp_path / "config.json"
    config_file.write_text('{"device_config": {"N": 2, "C": [1, 1], "M": [100, 100], "B": [50, 50]}, '
                           '"model_config": {"U": 13, "E": ' + str([5.0] * 13) + ', "R": ' + str([0.1] * 13) +
                           ', "A": ' + str([100.0] * 14) + '}}')
    command = [sys.executable, "-m", "dnnpipe", "run-local", "--model-path", str(root / "p2"), "--model-name",
               "res", "--data-path", str(root / "data.h5"), "--config", str(config_file), "--emulate-speed",
               "--scale", "1", "--num-inputs", "1000", "--testbed", "netns", "--log-dir", str(tmp_path / "logs")]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    prefix = f"{netns.PREFIX}{process.pid}-"
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "logs" / "stage_2.out").exists() or "running" not in (
                tmp_path / "logs" / "stage_2.out").read_text():
            assert time.monotonic() < deadline and process.poll() is None, process.communicate()
            time.sleep(0.1)
        assert any(name.startswith(prefix) for name in netns.namespaces())
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130 and "interrupted" in stderr
    assert not [name for name in netns.namespaces() if name.startswith(prefix)]
    stages = subprocess.run(["pgrep", "-f", str(tmp_path / "logs")], capture_output=True, text=True)
    assert stages.stdout == ""


def test_asking_for_namespaces_where_there_are_none_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(netns, "why_not_available", lambda: "not root")
    with pytest.raises(DnnpipeError, match="cannot make network namespaces \\(not root\\)"):
        with netns.open_testbed([1], mode="netns"):
            pass
    said = []
    with netns.open_testbed([1], echo=said.append) as bed:
        assert bed is None
    assert said == ["testbed: loopback, same pacing, links not emulated (not root)"]
