"""The virtual fleet: emulated boards (namespace, shaped link, CPU quota, memory limit, own sshd) reached over ssh.

The fleet tests need root, iproute2, OpenSSH's server and cgroups (CI runs them as root); elsewhere they skip
with the reason. The pure description is tested everywhere.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import models
from dnnpipe.deploy.deployer import RESULTS
from dnnpipe.deploy.launch import LOGS, model_folder
from dnnpipe.deploy.registry import load_registry
from dnnpipe.deploy.transport import SshOptions, SshTransport
from dnnpipe.errors import ConfigError, DnnpipeError
from dnnpipe.partition.graph import analyse
from dnnpipe.partition.partitioner import partition_keras_model
from dnnpipe.testbed import cgroups, fleet, sshd
from helpers import assert_clean_error, run_script

REASON = fleet.why_not_available()
needs_fleet = pytest.mark.skipif(REASON is not None, reason=f"virtual fleet: {REASON}")


# --- the description (pure) ------------------------------------------------------------------------------------

def test_devices_of_at_most_one_core_get_one_core_each_the_least_loaded():
    assert fleet.core_sets([0.6, 0.3, 0.2, 0.2], [0, 1]) == ["0", "1", "1", "1"]  # 0.6 against 0.3, then 0.5
    assert fleet.core_sets([1.5, 0.5], [0, 1]) == [None, "0"]
    assert fleet.core_sets([0.5, 0.5], [0]) == [None, None]  # one core: nothing to choose


def test_the_fleet_is_described_from_the_cluster(tmp_path):
    cluster = {"C": [1.0, 0.5], "M": [100.0, 20.0], "B": [1000.0, 100.0]}
    shape = fleet.describe(cluster, tmp_path, "198.19.7", 0.5, "me", "/usr/bin/python3", cores=[0, 1],
                           runtime_mb=200)
    one, two = shape.devices
    assert (one.address, two.address, one.interface) == ("198.19.7.11", "198.19.7.12", "eth0")
    assert (one.cpu_cores, two.cpu_cores, one.cpus, two.cpus) == (0.5, 0.25, "0", "1")
    assert (one.memory_mb, two.memory_mb, one.link_mbps, two.link_mbps) == (300, 220, 500, 50)
    assert one.namespace.startswith("dnf") and one.namespace != fleet.describe(
        cluster, tmp_path / "other", "198.19.7", 0.5, "me", "python3").devices[0].namespace
    assert fleet.default_scale([1.0, 0.33, 0.21, 0.21], 2.0) == pytest.approx(1 / 1.75)
    reg = fleet.registry(shape)
    (tmp_path / "reg.json").write_text(json.dumps(reg))
    devices = load_registry(tmp_path / "reg.json")  # the registry the deployer reads
    assert devices[2].host == "198.19.7.12" and devices[2].known_hosts == str(tmp_path.resolve() / "known_hosts")
    assert devices[1].remote_dir != devices[2].remote_dir


def test_a_device_slowed_past_one_core_leaves_its_single_core():
    """fault slow raised the quota but kept the one-core set from up: a 1.6-core quota capped at one core."""
    shape = fleet.describe({"C": [1.0, 0.5, 0.5], "M": [10, 10, 10]}, Path("s"), "198.19.1", 0.5, "root", "py",
                           cores=(0, 1))
    assert [d.cpus for d in shape.devices] == ["0", "1", "1"]
    assert fleet.core_set_after(shape, 2, 1.6, (0, 1)) is None  # every core
    assert fleet.core_set_after(shape, 2, 0.1, (0, 1)) == "1"  # slower: stays where it is
    wide = fleet.describe({"C": [4.0, 0.5], "M": [10, 10]}, Path("s"), "198.19.1", 0.5, "root", "py", cores=(0, 1))
    assert fleet.core_set_after(wide, 1, 0.5, (0, 1)) == "1"  # the least loaded core (device 2 is on 0)
    loose = fleet.describe({"C": [4.0, 0.5], "M": [10, 10]}, Path("s"), "198.19.1", 0.5, "root", "py", pin=False,
                           cores=(0, 1))
    assert fleet.core_set_after(loose, 1, 0.5, (0, 1)) is None  # a fleet built without pinning stays so


def test_remove_tries_every_step_and_names_every_failure(tmp_path, monkeypatch):
    """remove() stopped at its first failure: one namespace that would not go left the rest behind."""
    fid, removed = "abc123", []

    def remove_namespace(name):
        if name.endswith("-d1"):
            raise DnnpipeError(f"testbed: {name} is busy")
        removed.append(name)

    monkeypatch.setattr(fleet, "namespaces", lambda: [f"dnf{fid}-d1", f"dnf{fid}-d2", f"dnf{fid}-hub"])
    monkeypatch.setattr(fleet, "remove_namespace", remove_namespace)
    (tmp_path / fleet.STATE_FILE).write_text("{}")
    with pytest.raises(DnnpipeError, match=f"fleet {fid} not fully removed: testbed: dnf{fid}-d1 is busy"):
        fleet.remove(fid, tmp_path)
    assert removed == [f"dnf{fid}-d2", f"dnf{fid}-hub"]
    assert not (tmp_path / fleet.STATE_FILE).exists()


def test_a_failed_up_reports_its_own_error_with_the_cleanup_failure_as_a_note(tmp_path, monkeypatch):
    """up()'s clean-up error replaced the failure that made it clean up."""
    removals = []

    def remove(fid, state=None):
        removals.append(fid)
        if len(removals) > 1:
            raise DnnpipeError(f"testbed: fleet {fid} not fully removed: a namespace is busy")
        return False

    def keys(_):
        raise ValueError("ssh-keygen broke")

    monkeypatch.setattr(fleet, "require_root", lambda: None)
    monkeypatch.setattr(fleet, "free_subnet", lambda fid: "198.19.1")
    monkeypatch.setattr(fleet, "remove", remove)
    monkeypatch.setattr(fleet, "_keys", keys)
    (tmp_path / "cluster.json").write_text('{"C": [0.5], "M": [50]}')
    with pytest.raises(ValueError, match="ssh-keygen broke") as caught:
        fleet.up(tmp_path / "cluster.json", tmp_path / "reg.json", tmp_path / "state")
    assert caught.value.__notes__ == ["and cleaning up failed too: testbed: fleet "
                                      f"{fleet.fleet_id(tmp_path / 'state')} not fully removed: a namespace is busy"]


@needs_fleet
def test_a_stale_sshd_pid_file_never_kills_an_unrelated_process(tmp_path):
    """After a crash or reboot dN/sshd.pid may name a pid the kernel gave to another process: up and down
    SIGKILLed it, as root. Only a pid in the device's groups is its sshd; the stale file is just deleted."""
    state = tmp_path / "state"
    (state / "d1").mkdir(parents=True)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (state / "d1" / "sshd.pid").write_text(f"{bystander.pid}\n")
        assert sshd.running_pid(state / "d1" / "sshd.pid", set()) is None
        assert run_testbed(state, "down").returncode == 0
        assert bystander.poll() is None and running(bystander.pid)
        assert not (state / "d1" / "sshd.pid").exists()
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("text, message", [
    ('{"C": [1, 0.5], "M": [10]}', "'M' has 1 values but N = 2"),
    ('{"C": [1, -1], "M": [10, 10]}', r"'C\[1\]' must be > 0"),
    ('{"C": [1], "M": [10], "B": [0]}', r"'B\[0\]' must be > 0"),
    ('{"C": [1], "M": [10], "B": [10], "B_link": [[0]]}', "'B_link' cannot be emulated"),
    ('{"M": [10]}', "missing key 'N'"),
    ('{"C": [1], "M": [10], "X": 1}', "unknown key 'device_config.X'"),
    ('{"C": [1], "M": [10], "B": [1e400]}', "must be a finite number"),
    (json.dumps({"C": [1] * 201, "M": [1] * 201}), "at most 200 devices"),
    ("[1, 2]", "expected"),
    ("{", "not valid JSON"),
])
def test_bad_clusters_are_refused_naming_the_file_and_field(tmp_path, text, message):
    (tmp_path / "cluster.json").write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        fleet.read_cluster(tmp_path / "cluster.json")
    assert "cluster.json" in str(caught.value)


def test_a_known_hosts_path_is_checked_and_reaches_ssh(tmp_path):
    entry = {"device_id": 1, "host": "198.19.7.11", "known_hosts": str(tmp_path / "k%h")}
    (tmp_path / "reg.json").write_text(json.dumps({"devices": [entry]}))
    argv = SshTransport(load_registry(tmp_path / "reg.json")[1], SshOptions())._options()
    assert f'UserKnownHostsFile="{tmp_path}/k%%h"' in argv
    (tmp_path / "reg.json").write_text(json.dumps({"devices": [{**entry, "known_hosts": 'a"b'}]}))
    with pytest.raises(ConfigError, match="'known_hosts' must not hold"):
        load_registry(tmp_path / "reg.json")


# --- on the host, as root ------------------------------------------------------------------------------------

def run_testbed(state: Path, *args: str) -> subprocess.CompletedProcess:
    return run_script("dnnpipe", "testbed", args[0], "--state", str(state), *args[1:], timeout=120)


def leftovers(fid: str) -> list[str]:
    """What of fleet fid is still on the host: namespaces, the host's veth, cgroups, processes."""
    found = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
             if n.startswith(f"dnf{fid}")]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [f"veth dnf{fid}"] if f"dnf{fid}" in links else []
    found += [str(f) for f in cgroups.folders(fid) if f.exists()]
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (this host's init may reap the killed daemon late)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def ssh(registry: Path, device: int, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    d = load_registry(registry)[device]
    transport = SshTransport(d, SshOptions(connect_timeout=3))
    return subprocess.run(["ssh", *transport._options(), "--", d.host, *command], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def fleet3(tmp_path_factory):
    """Three emulated boards: device 1 at C 1, devices 2 and 3 at C 0.25, 100 MiB of M each (x 0.4)."""
    root = tmp_path_factory.mktemp("fleet")
    (root / "cluster.json").write_text(json.dumps({"C": [1.0, 0.25, 0.25], "M": [100, 100, 100],
                                                   "B": [1000, 1000, 1000]}))
    up = run_testbed(root / "state", "up", "--cluster", str(root / "cluster.json"), "--registry",
                 str(root / "reg.json"), "--scale", "0.4")
    assert up.returncode == 0, up.stdout + up.stderr
    yield root
    down = run_testbed(root / "state", "down")
    assert down.returncode == 0, down.stderr
    assert leftovers(fleet.fleet_id(root / "state")) == []


@needs_fleet
def test_up_status_down_leave_nothing_even_after_a_killed_run(tmp_path):
    (tmp_path / "cluster.json").write_text('{"C": [0.5], "M": [50]}')
    state, fid = tmp_path / "state", fleet.fleet_id(tmp_path / "state")
    up = run_testbed(state, "up", "--cluster", str(tmp_path / "cluster.json"), "--registry", str(tmp_path / "reg.json"))
    assert up.returncode == 0, up.stdout + up.stderr
    status = json.loads(run_testbed(state, "status", "--json").stdout)
    [row] = status["devices"]
    assert row["state"] == "up" and row["namespace"] == f"dnf{fid}-d1" and row["interface"] == "eth0"
    done = ssh(tmp_path / "reg.json", 1, "cat", "/proc/self/cgroup")
    assert done.returncode == 0 and f"cpu:/{cgroups.GROUP}/{fid}/d1" in done.stdout, done.stderr
    sshd_pid = int((state / "d1" / "sshd.pid").read_text())
    (state / fleet.STATE_FILE).unlink()  # as if `up` had been killed before writing its state
    down = run_testbed(state, "down")
    assert down.returncode == 0 and fid in down.stdout, down.stdout + down.stderr
    assert leftovers(fid) == []
    assert not running(sshd_pid)
    assert "no fleet" in run_testbed(state, "down").stdout


@needs_fleet
def test_status_shows_the_limits_and_faults_change_one_device(fleet3):
    state, registry = fleet3 / "state", fleet3 / "reg.json"
    rows = {r["device_id"]: r for r in json.loads(run_testbed(state, "status", "--json").stdout)["devices"]}
    assert rows[1]["cpu_cores"] == pytest.approx(0.4) and rows[2]["cpu_cores"] == pytest.approx(0.1)
    assert rows[1]["memory_mb"] == pytest.approx(100 + fleet.RUNTIME_MB)
    assert rows[1]["link_mbps"] == pytest.approx(400)
    assert run_testbed(state, "fault", "2", "cut").returncode == 0
    assert ssh(registry, 2, "true", timeout=30).returncode != 0  # cut off: ssh gives up at its connect timeout
    assert ssh(registry, 3, "true").returncode == 0  # the others are untouched
    assert run_testbed(state, "fault", "2", "heal").returncode == 0
    assert ssh(registry, 2, "true").returncode == 0
    assert run_testbed(state, "fault", "3", "poweroff").returncode == 0
    assert json.loads(run_testbed(state, "status", "--json").stdout)["devices"][2]["state"] == "off"
    assert run_testbed(state, "fault", "3", "heal").returncode == 0
    assert ssh(registry, 3, "true").returncode == 0
    assert run_testbed(state, "fault", "3", "slow", "0.5").returncode == 0
    assert json.loads(run_testbed(state, "status", "--json").stdout)["devices"][2]["cpu_cores"] == pytest.approx(0.2)
    assert run_testbed(state, "fault", "3", "slow", "4").returncode == 0  # 1.6 cores: off its single core
    row = json.loads(run_testbed(state, "status", "--json").stdout)["devices"][2]
    assert row["cpu_cores"] == pytest.approx(1.6) and ("-" in row["cpus"] or "," in row["cpus"]), row
    assert run_testbed(state, "fault", "3", "slow", "0.25").returncode == 0
    assert json.loads(run_testbed(state, "status", "--json").stdout)["devices"][2]["cpus"].isdigit()
    assert_clean_error(run_testbed(state, "fault", "9", "cut"), "no device 9")


@needs_fleet
def test_a_board_sockets_start_with_room_for_a_whole_cut(fleet3):
    """A quota pauses a board for most of each period: with the kernel's 16 KB starting send buffer a stage's
    send thread had to come back while paused, so a 410 KB cut took 10.5 ms to leave a 0.12-core board."""
    done = ssh(fleet3 / "reg.json", 2, "cat", "/proc/sys/net/ipv4/tcp_wmem", "/proc/sys/net/ipv4/tcp_rmem")
    assert done.returncode == 0, done.stderr
    wmem, rmem = (line.split() for line in done.stdout.splitlines())
    assert int(wmem[1]) >= 1 << 20 and int(rmem[1]) >= 1 << 20


@needs_fleet
def test_what_exceeds_a_device_memory_is_killed_by_the_kernel(fleet3):
    registry, fid = fleet3 / "reg.json", fleet.fleet_id(fleet3 / "state")
    before = cgroups.stats(fid, 2)["oom_kills"]
    limit = int((100 + fleet.RUNTIME_MB) * 2 ** 20)
    code = f"import sys; b = bytearray({limit}); b[::4096] = b'x' * len(b[::4096]); print('survived')"
    done = ssh(registry, 2, sys.executable, "-c", json.dumps(code))
    assert "survived" not in done.stdout and done.returncode != 0
    assert cgroups.stats(fid, 2)["oom_kills"] > before
    assert ssh(registry, 2, sys.executable, "-c", json.dumps("b = bytearray(20 << 20); print('fits')")).stdout \
        .strip() == "fits"


@pytest.mark.slow
@needs_fleet
def test_the_deployer_ships_launches_and_stops_over_ssh_on_the_fleet(fleet3, tmp_path):
    model = models.residual_cnn()
    U = analyse(model)[0].U
    parts = tmp_path / "partitioned_submodels"
    partition_keras_model(model, [[1, 4, 3], [5, 9, 1], [10, U, 2]], parts / "res", "res", "test",
                          verify_chain=False)
    with h5py.File(tmp_path / "dataset.h5", "w") as f:
        f["images"] = np.random.default_rng(0).random((5, 12, 12, 3)).astype("float32")
    registry = fleet3 / "reg.json"
    args = ("--device-registry", str(registry), "--model-path", str(parts), "--model-name", "res", "--config",
            str(tmp_path / "configurations"), "--dataset", str(tmp_path / "dataset.h5"))
    dry = run_script("deployer.py", *args, "--dry-run")
    assert dry.returncode == 0 and "dry run" in dry.stdout, dry.stdout + dry.stderr
    devices = load_registry(registry)
    assert not (Path(devices[1].remote_dir) / "runtime_engine.py").exists()  # a dry run changes nothing
    done = run_script("deployer.py", *args, "--launch", "--wait", "60")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"stage 3 listening on {devices[2].host}:50000" in done.stdout
    on_board = Path(devices[2].remote_dir) / model_folder(parts.name, "res")  # logs and results: the model's folder
    log = on_board / LOGS / "stage_3.out"
    deadline = time.monotonic() + 60
    while not (log.exists() and "pipeline:" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "pipeline: 5 results" in log.read_text(), log.read_text()
    with h5py.File(on_board / RESULTS) as f:
        assert f["logits"].shape == (5, 5)
    stopped = run_script("deployer.py", *args, "--stop")
    assert stopped.returncode == 0 and stopped.stdout.count("stage ") == 3, stopped.stdout


@pytest.mark.slow
@needs_fleet
def test_per_device_profile_over_ssh_shows_the_cpu_limits(fleet3, tmp_path):
    """The profile command times every unit on every board of the fleet; the slow boards' quotas (0.1 core) held
    them back (the cgroups' throttling counters), and the config has a row per device."""
    fid = fleet.fleet_id(fleet3 / "state")
    before = {d: cgroups.stats(fid, d)["nr_throttled"] for d in (1, 2, 3)}
    models.residual_cnn().save(tmp_path / "res.h5")
    (tmp_path / "cluster.json").write_text(json.dumps({"C": [1, 1, 1], "M": [100, 100, 100]}))
    done = run_script("dnnpipe", "profile", "--model-path", str(tmp_path), "--model-name", "res", "--config",
                      str(tmp_path / "cfg"), "--devices", str(tmp_path / "cluster.json"), "--device-registry",
                      str(fleet3 / "reg.json"), "--repeats", "5", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for d in (1, 2, 3):
        assert f"device {d}: whole model" in done.stderr
    for d in (2, 3):
        assert cgroups.stats(fid, d)["nr_throttled"] > before[d]
    config = json.loads((tmp_path / "cfg" / "res" / "config.json").read_text())
    rows = config["model_config"]["E_device"]
    assert len(rows) == 3 and all(len(row) == config["model_config"]["U"] for row in rows)
    assert config["device_config"]["C"][0] == 1.0 and config["device_config"]["N"] == 3


def test_quota_periods_are_long_enough_for_the_kernel_to_deliver_the_quota():
    """Periods under 10 ms gave a 0.57-core board 0.34-0.42 cores (cgroups.MIN_PERIOD_US): it was 2 ms."""
    assert cgroups.quota_period(0.57) == (5700, 10_000)
    assert cgroups.quota_period(0.12) == (1200, 10_000)
    assert cgroups.quota_period(0.05) == (1000, 20_000)


def test_quota_periods_are_short_but_the_quota_never_below_the_kernel_minimum():
    for cores in (0.01, 0.05, 0.12, 0.57, 1.0, 3.0):
        quota, period = cgroups.quota_period(cores)
        assert quota >= cgroups.MIN_QUOTA_US and cgroups.MIN_PERIOD_US <= period <= cgroups.MAX_PERIOD_US
        assert quota / period == pytest.approx(max(cores, cgroups.MIN_QUOTA_US / cgroups.MAX_PERIOD_US), rel=0.01)


def test_without_root_the_fleet_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert fleet.why_not_available().startswith("not root")
    with pytest.raises(DnnpipeError, match="^testbed: cannot emulate a fleet here: not root"):
        fleet.down(Path("unused"))


@pytest.mark.slow
@needs_fleet
def test_a_stage_over_its_board_memory_is_killed(tmp_path):
    """A board of 16 MiB in all holds ssh logins, tar and sha256sum but not a stage (Python, NumPy and the
    interpreter alone take more): the kernel kills the stage at start."""
    (tmp_path / "cluster.json").write_text('{"C": [0.5], "M": [1]}')
    state = tmp_path / "state"
    up = run_testbed(state, "up", "--cluster", str(tmp_path / "cluster.json"), "--registry",
                     str(tmp_path / "reg.json"), "--runtime-mb", "15")
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        model = models.residual_cnn()
        parts = tmp_path / "partitioned_submodels"
        partition_keras_model(model, [[1, analyse(model)[0].U, 1]], parts / "res", "res", "test",
                              verify_chain=False)
        with h5py.File(tmp_path / "dataset.h5", "w") as f:
            f["images"] = np.random.default_rng(0).random((5, 12, 12, 3)).astype("float32")
        args = ("--device-registry", str(tmp_path / "reg.json"), "--model-path", str(parts), "--model-name", "res",
                "--config", str(tmp_path / "configurations"), "--dataset", str(tmp_path / "dataset.h5"))
        shipped = run_script("deployer.py", *args)
        assert shipped.returncode == 0, shipped.stdout + shipped.stderr
        before = cgroups.stats(fleet.fleet_id(state), 1)["oom_kills"]
        launched = run_script("deployer.py", *args, "--launch", "--wait", "30")
        log = (Path(load_registry(tmp_path / "reg.json")[1].remote_dir) / model_folder(parts.name, "res") / LOGS
               / "stage_1.out")
        deadline = time.monotonic() + 60
        while cgroups.stats(fleet.fleet_id(state), 1)["oom_kills"] == before and time.monotonic() < deadline:
            time.sleep(0.5)
        assert cgroups.stats(fleet.fleet_id(state), 1)["oom_kills"] > before, launched.stdout + log.read_text()
        assert "stage 1 started on device 1" in launched.stdout, launched.stdout + launched.stderr
        assert "pipeline:" not in log.read_text()  # it never ran to the end
    finally:
        assert run_testbed(state, "down").returncode == 0
    assert leftovers(fleet.fleet_id(state)) == []


def test_a_stage_on_a_board_is_started_over_ssh_from_the_board_own_copy(tmp_path):
    """run_local's stage command becomes ssh to the board running runtime_engine.py in its folder, the models
    from the deployed copy; every value an argument of a fixed script, never shell text."""
    from dnnpipe.deploy.registry import Device
    from dnnpipe.demo.fleet import FleetNetwork

    board = Device(2, "198.19.7.12", user="root", port=22, identity_file="/k/id", remote_dir="/s/d2 $(x)",
                   python="/v/bin/python", known_hosts="/k/known_hosts")
    argv = ["python", "-m", "dnnpipe", "stage", "--stage", "2", "--model-path", str(tmp_path / "partitioned_submodels"),
            "--model-name", "m", "--bind-addr", "198.19.7.12"]
    command = FleetNetwork({2: board}).command(2, argv)
    assert command[:2] == ["ssh", "-n"] and "198.19.7.12" in command
    assert 'UserKnownHostsFile="/k/known_hosts"' in command
    remote = command[-1]
    assert "'/s/d2 $(x)'" in remote and "/v/bin/python runtime_engine.py --stage 2 --model-path partitioned_submodels" \
        in remote


@needs_fleet
def test_down_finds_a_fleet_whose_state_folder_is_gone(tmp_path):
    """Everything is named after the state folder's path: its keys and records gone, down still finds the
    namespaces, the veth, sshd and the cgroups (and `down --all` would list it among the fleets here)."""
    (tmp_path / "cluster.json").write_text('{"C": [0.5], "M": [50]}')
    state, fid = tmp_path / "gone", fleet.fleet_id(tmp_path / "gone")
    up = run_testbed(state, "up", "--cluster", str(tmp_path / "cluster.json"), "--registry", str(tmp_path / "r.json"))
    assert up.returncode == 0, up.stdout + up.stderr
    assert fid in cgroups.fleets()
    shutil.rmtree(state)
    down = run_testbed(state, "down")
    assert down.returncode == 0 and fid in down.stdout, down.stdout + down.stderr
    assert leftovers(fid) == []
