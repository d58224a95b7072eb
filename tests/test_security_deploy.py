"""The deployer never writes outside a device's remote_dir, whatever symbolic links were planted there (issue 29),
over a real OpenSSH server on loopback and over the local transport."""

import json
import os
import shutil

import pytest

from helpers import run_script
from sshd import free_port


def deploy(one_stage, tmp_path, device, *extra):
    device, ssh_config = device
    registry = tmp_path / "reg.json"
    registry.write_text(json.dumps({"devices": [device]}))
    return run_script("deployer.py", "--device-registry", str(registry), "--model-path",
                      str(one_stage / "partitioned_submodels"), "--model-name", "res", "--config",
                      str(one_stage / "configurations"), "--no-runtime-code", "--ssh-config", str(ssh_config),
                      *extra)


@pytest.fixture(params=["ssh", "local"])
def device(request, server, tmp_path):
    remote = tmp_path / "device"
    if request.param == "ssh":
        return server.device(1, remote), server.ssh_config
    return {"device_id": 1, "host": "local", "remote_dir": str(remote), "runtime_port": free_port()}, server.ssh_config


@pytest.mark.parametrize("planted", ["partitioned_submodels/res/pipeline.key", "partitioned_submodels/res",
                                     "partitioned_submodels"])
def test_a_planted_symlink_is_refused_and_nothing_is_written_outside(one_stage, tmp_path, device, planted):
    first = deploy(one_stage, tmp_path, device)
    assert first.returncode == 0, first.stdout + first.stderr
    remote, outside = tmp_path / "device", tmp_path / "outside"
    outside.mkdir()
    target = remote / planted
    (shutil.rmtree if target.is_dir() else os.unlink)(target)
    os.symlink(outside, target)  # a folder elsewhere, where one of ours belongs
    (one_stage / "partitioned_submodels" / "res" / "pipeline.key").chmod(0o600)
    again = deploy(one_stage, tmp_path, device)
    assert again.returncode != 0, again.stdout
    failed = [line for line in again.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and f"{planted}: a symbolic link on the device" in failed[0], again.stdout
    assert list(outside.iterdir()) == []  # nothing written through the link


def test_a_planted_symlink_for_the_launch_log_is_refused(one_stage, tmp_path, device):
    deployed = deploy(one_stage, tmp_path, device, "--dataset", str(one_stage / "dataset.h5"))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    outside = tmp_path / "outside"
    outside.mkdir()
    logs = next((tmp_path / "device").glob("*/res")) / "logs"  # MODELS/NAME/logs: each model's own
    if logs.is_dir():
        shutil.rmtree(logs)
    os.symlink(outside, logs)
    launched = deploy(one_stage, tmp_path, device, "--dataset", str(one_stage / "dataset.h5"), "--launch",
                      "--wait", "20")
    assert launched.returncode != 0
    assert "res/logs: a symbolic link on the device" in launched.stdout + launched.stderr, launched.stdout
    assert list(outside.iterdir()) == []
