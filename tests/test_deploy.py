"""The deployer over a real OpenSSH server on loopback, and over the local transport."""

import json
import time

import h5py
import numpy as np
import pytest

import models
from dnnpipe.deploy.registry import parse_registry
from dnnpipe.deploy.ship import DeviceReport, ship, uploads_for
from dnnpipe.deploy.transport import SshOptions, SshTransport, temporary_names
from dnnpipe.errors import ConfigError
from dnnpipe.manifest import read_manifest, sha256_file
from dnnpipe.partition.partitioner import partition_keras_model
from dnnpipe.partition.graph import analyse
from dnnpipe.deploy.registry import Device
from helpers import assert_clean_error, run_script
from sshd import start_sshd


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server, process = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory):
    """partitioned_submodels/res: the residual CNN in 3 stages on devices 3, 1, 2; and a dataset."""
    root = tmp_path_factory.mktemp("deploy")
    model = models.residual_cnn()
    U = analyse(model)[0].U
    partition_keras_model(model, [[1, 4, 3], [5, 9, 1], [10, U, 2]], root / "partitioned_submodels" / "res",
                          "res", "test", verify_chain=False)
    with h5py.File(root / "dataset.h5", "w") as f:
        f["images"] = np.random.default_rng(0).random((5, 12, 12, 3)).astype("float32")
    return root


def write_registry(path, devices):
    path.write_text(json.dumps({"devices": devices}))
    return path


def deployer(partitioned, registry, *extra):
    return run_script("deployer.py", "--device-registry", str(registry), "--model-path",
                      str(partitioned / "partitioned_submodels"), "--model-name", "res", "--config",
                      str(partitioned / "configurations"), *extra)


def test_three_stage_deploy_over_ssh_then_nothing_to_resend(server, partitioned, tmp_path):
    registry = write_registry(tmp_path / "reg.json", [server.device(i, tmp_path / f"dev{i}") for i in (1, 2, 3)])
    result = deployer(partitioned, registry, "--ssh-config", str(server.ssh_config))
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = read_manifest(partitioned / "partitioned_submodels" / "res")
    for stage in manifest.stages:
        folder = tmp_path / f"dev{stage.device}" / "partitioned_submodels" / "res"
        assert sha256_file(folder / stage.file) == stage.sha256
        assert (folder / "manifest.json").exists()
        assert not list(folder.glob(".*.part-*"))  # no temporary left behind
        others = [s.file for s in manifest.stages if s.device != stage.device]
        assert not any((folder / f).exists() for f in others)  # each device gets its own stage only
        assert (tmp_path / f"dev{stage.device}" / "runtime_engine.py").exists()
    launch_plan = json.loads((partitioned / "partitioned_submodels" / "res" / "launch_plan.json").read_text())
    assert [s["stage"] for s in launch_plan["stages"]] == [1, 2, 3]
    assert "--next-port" in launch_plan["stages"][0]["argv"] and "--data-path" in launch_plan["stages"][0]["argv"]

    again = deployer(partitioned, registry, "--ssh-config", str(server.ssh_config))
    assert again.returncode == 0, again.stderr
    for line in again.stdout.splitlines()[1:4]:
        sent, skipped, failed = line.split()[3:6]
        assert sent == "0" and int(skipped) > 0 and failed == "0", line


def test_corrupted_upload_is_caught_and_never_installed(server, partitioned, tmp_path):
    class CorruptingSsh(SshTransport):
        def upload(self, pairs):
            damaged = tmp_path / "damaged.bin"
            damaged.write_bytes(b"half a model")
            super().upload([(damaged, rel) for _, rel in pairs])

    device = Device(1, "127.0.0.1", server.user, server.port, str(server.user_key), str(tmp_path / "dev"))
    manifest = read_manifest(partitioned / "partitioned_submodels" / "res")
    uploads = uploads_for(manifest, partitioned / "partitioned_submodels" / "res", "partitioned_submodels", [2])
    transport = CorruptingSsh(device, SshOptions(ssh_config=server.ssh_config))
    report = ship(transport, DeviceReport(device, [2]), uploads)
    assert not report.ok and report.sent == []
    assert all("sha256 mismatch after transfer" in why for why in report.failed.values())
    target = tmp_path / "dev" / "partitioned_submodels" / "res"
    assert not (target / manifest.stage(2).file).exists()
    assert list(target.iterdir()) == []  # temporaries removed


def test_interrupted_upload_leaves_no_half_file(server, partitioned, tmp_path):
    """A transfer that dies midway (here: sftp never ran) is not confirmed, and nothing is renamed."""
    device = Device(1, "127.0.0.1", server.user, server.port, str(server.user_key), str(tmp_path / "dev"))
    manifest = read_manifest(partitioned / "partitioned_submodels" / "res")
    uploads = uploads_for(manifest, partitioned / "partitioned_submodels" / "res", "partitioned_submodels", [1])
    transport = SshTransport(device, SshOptions(ssh_config=server.ssh_config))
    transport.hashes([u.rel for u in uploads])  # creates the folders
    staged = temporary_names(uploads)
    stage_file = partitioned / "partitioned_submodels" / "res" / manifest.stage(1).file
    half = tmp_path / "half.tflite"
    half.write_bytes(stage_file.read_bytes()[: stage_file.stat().st_size // 2])
    transport.upload([(half, staged[0][1])])
    results = transport.install(staged)
    assert "sha256 mismatch" in results[uploads[0].rel]
    assert "file missing after transfer" in results[uploads[1].rel]
    assert not (tmp_path / "dev" / uploads[0].rel).exists()


def test_one_unreachable_device_does_not_hide_the_others(server, partitioned, tmp_path):
    from sshd import free_port

    devices = [server.device(1, tmp_path / "dev1"), server.device(2, tmp_path / "dev2", port=free_port()),
               server.device(3, tmp_path / "dev3")]
    result = deployer(partitioned, write_registry(tmp_path / "reg.json", devices), "--ssh-config",
                      str(server.ssh_config), "--connect-timeout", "3")
    assert result.returncode == 1
    table = result.stdout.splitlines()
    assert any(line.split()[0] == "2" and "Connection refused" in line for line in table[1:4]), result.stdout
    assert sum(line.rstrip().endswith(" ok") for line in table[1:4]) == 2, result.stdout
    assert "deployer.py: error: 1 of 3 devices failed: 2" in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_key_and_unknown_host_key(server, partitioned, tmp_path):
    registry = write_registry(tmp_path / "reg.json", [server.device(i, tmp_path / f"d{i}") for i in (1, 3)]
                              + [server.device(2, tmp_path / "d2", identity_file=str(server.wrong_key))])
    result = deployer(partitioned, registry, "--ssh-config", str(server.ssh_config))
    assert result.returncode == 1 and "Permission denied (publickey)" in result.stdout, result.stdout

    registry = write_registry(tmp_path / "reg.json", [server.device(i, tmp_path / f"e{i}") for i in (1, 2, 3)])
    result = deployer(partitioned, registry, "--ssh-config", str(server.empty_config))
    assert result.returncode == 1 and "Host key verification failed" in result.stdout, result.stdout
    result = deployer(partitioned, registry, "--ssh-config", str(server.empty_config), "--accept-new-host-keys")
    assert result.returncode == 0, result.stdout + result.stderr


def test_launch_and_stop_over_ssh(server, partitioned, tmp_path):
    """Deploy, start all three stages over SSH last first, get results on the last device, stop."""
    import sys

    devices = [server.device(i, tmp_path / f"dev{i}", python=sys.executable) for i in (1, 2, 3)]
    registry = write_registry(tmp_path / "reg.json", devices)
    result = deployer(partitioned, registry, "--ssh-config", str(server.ssh_config), "--dataset",
                      str(partitioned / "dataset.h5"), "--launch", "--wait", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.index("stage 3 listening") < result.stdout.index("stage 2 listening")
    results = tmp_path / "dev2" / "results.h5"  # stage 3 runs on device 2
    deadline = time.monotonic() + 60
    log = tmp_path / "dev2" / "logs" / "stage_3.out"
    while not (log.exists() and "pipeline:" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "pipeline: 5 results" in log.read_text(), log.read_text()
    with h5py.File(results) as f:
        assert f["logits"].shape == (5, 5)
    stopped = deployer(partitioned, registry, "--ssh-config", str(server.ssh_config), "--stop")
    assert stopped.returncode == 0 and stopped.stdout.count("stage ") == 3, stopped.stdout
    again = deployer(partitioned, registry, "--ssh-config", str(server.ssh_config), "--stop")
    assert again.stdout.count("not running") == 3, again.stdout


def test_local_transport_and_dry_run(partitioned, tmp_path):
    devices = [{"device_id": i, "host": "local", "remote_dir": str(tmp_path / f"dev{i}"), "runtime_port": 50000 + i}
               for i in (1, 2, 3)]
    registry = write_registry(tmp_path / "reg.json", devices)
    dry = deployer(partitioned, registry, "--dry-run")
    assert dry.returncode == 0 and "would send" in dry.stdout and not (tmp_path / "dev1").exists()
    result = deployer(partitioned, registry)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path / "dev1" / "partitioned_submodels" / "res")
    assert manifest.stage(2).device == 1
    assert (tmp_path / "dev1" / "partitioned_submodels" / "res" / manifest.stage(2).file).exists()


def test_registry_with_a_password_is_refused(partitioned, tmp_path):
    registry = write_registry(tmp_path / "reg.json", [{"device_id": 1, "host": "10.0.0.9", "password": "x"}])
    assert_clean_error(deployer(partitioned, registry), "devices[0] has a 'password': passwords are refused",
                       "identity_file")


@pytest.mark.parametrize("devices, message", [
    ([{"device_id": 1, "host": "a"}, {"device_id": 1, "host": "b"}], "device_id 1 appears twice"),
    ([{"device_id": 1, "host": "a", "port": 70000}], "'port' must be a port number 1-65535, got 70000"),
    ([{"device_id": 1, "host": "a", "runtime_port": "x"}], "'runtime_port' must be a port number"),
    ([{"device_id": 0, "host": "a"}], "'device_id' must be a positive integer, got 0"),
    ([{"device_id": 1}], "'host' must be a host name"),
    ([{"device_id": 1, "host": "a", "pasword": "x"}], "unknown key 'pasword'"),
    ([], "at least one device"),
])
def test_registry_validation(devices, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        parse_registry({"devices": devices}, "reg.json")


def test_username_alias_and_missing_plan_device(partitioned, tmp_path):
    registry = parse_registry({"devices": [{"device_id": 1, "host": "h", "username": "rtos"}]}, "reg.json")
    assert registry[1].user == "rtos" and registry[1].address == "rtos@h"
    path = write_registry(tmp_path / "reg.json", [{"device_id": 1, "host": "local", "remote_dir": str(tmp_path)}])
    assert_clean_error(deployer(partitioned, path), "the plan uses device 3, which the registry does not list")
