"""The deployer over a real OpenSSH server on loopback, and over the local transport."""

import json
import os
import pwd
import shutil
import socket
import stat
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import models
from dnnpipe.deploy.command import deployer_parser
from dnnpipe.deploy.command import main as deploy_main
from dnnpipe.deploy.launch import launch_plan
from dnnpipe.deploy.registry import Device
from dnnpipe.deploy.ship import DeviceReport, format_reports, ship, uploads_for
from dnnpipe.deploy.transport import SshOptions, SshTransport, _reason, temporary_names
from dnnpipe.deploy.deployer import deploy, start_stages, stop_stages, DeployOptions
from dnnpipe.errors import DnnpipeError
from dnnpipe.layout import PLAN_FILE
from dnnpipe.manifest import read_manifest, sha256_file
from dnnpipe.partition.partitioner import partition_keras_model
from dnnpipe.partition.graph import analyse
from dnnpipe.pipeline_key import CERT_FILE, CERT_KEY_FILE, KEY_FILE
from helpers import assert_clean_error, run_script
from sshd import free_port

# A value that, pasted into shell or sftp text anywhere, would run a command creating MARKER.
HOSTILE = "a b'\"$(touch {m})`touch {m}`;touch {m};!touch {m} \u00e9\u6f22"


def write_registry(path, devices):
    path.write_text(json.dumps({"devices": devices}))
    return path


def deployer_in_process(capsys, partitioned, registry, *extra) -> tuple[int, str, str]:
    """deployer.py's own main() without a new interpreter: its exit status, stdout and stderr."""
    code = deploy_main(["--device-registry", str(registry), "--model-path", str(partitioned / "partitioned_submodels"),
                        "--model-name", "res", "--config", str(partitioned / "configurations"), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(outcome: tuple[int, str, str], *fragments: str) -> None:
    code, _, err = outcome
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("deployer.py: error: ") and all(f in err for f in fragments), err


def copy_models(partitioned, tmp_path):
    """A private copy of the partitioned model, for tests that change it or check what gets written there."""
    shutil.copytree(partitioned / "partitioned_submodels", tmp_path / "partitioned_submodels")
    (tmp_path / "partitioned_submodels" / "res" / "launch_plan.json").unlink(missing_ok=True)
    return tmp_path


def rows(stdout):
    """The deploy table's rows as (device, stages, sent, skipped, failed, destination and result)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("device"))
    return [line.split(None, 5) for line in lines[start + 1:] if line[:6].strip().isdigit()]


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
    assert len(rows(again.stdout)) == 3
    for _, _, sent, skipped, failed, _ in rows(again.stdout):
        assert sent == "0" and int(skipped) > 0 and failed == "0", again.stdout


def test_corrupted_upload_is_caught_and_never_installed(server, partitioned, tmp_path):
    class CorruptingSsh(SshTransport):
        def payload(self, items):
            damaged = tmp_path / "damaged.bin"
            damaged.write_bytes(b"half a model")
            return super().payload([(damaged, rel, mode) for _, rel, mode in items])

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
    """A stream that breaks off midway: the cut file and the ones that never came are reported, none is renamed
    into place, and no temporary file stays behind."""
    class CuttingSsh(SshTransport):
        def payload(self, items):
            return super().payload(items)[:2048]  # a tar header and the sub-model's first 1.5 KB

    device = Device(1, "127.0.0.1", server.user, server.port, str(server.user_key), str(tmp_path / "dev"))
    manifest = read_manifest(partitioned / "partitioned_submodels" / "res")
    uploads = uploads_for(manifest, partitioned / "partitioned_submodels" / "res", "partitioned_submodels", [1],
                          extra=[(partitioned / "dataset.h5", "dataset.h5")])
    results = CuttingSsh(device, SshOptions(ssh_config=server.ssh_config)).send(temporary_names(uploads))
    assert "sha256 mismatch after transfer" in results[uploads[0].rel], results
    assert all(results[u.rel] == "file missing after transfer" for u in uploads[1:]), results
    assert not any((tmp_path / "dev" / u.rel).exists() for u in uploads)
    assert not [p for p in (tmp_path / "dev").rglob("*") if p.is_file()]  # no temporary left behind


def test_one_unreachable_device_does_not_hide_the_others(server, partitioned, tmp_path):
    devices = [server.device(1, tmp_path / "dev1"), server.device(2, tmp_path / "dev2", port=free_port()),
               server.device(3, tmp_path / "dev3")]
    result = deployer(partitioned, write_registry(tmp_path / "reg.json", devices), "--ssh-config",
                      str(server.ssh_config), "--connect-timeout", "3")
    assert result.returncode == 1
    table = rows(result.stdout)
    assert any(row[0] == "2" and "Connection refused" in row[5] for row in table), result.stdout
    assert sum(row[5].endswith(" ok") for row in table) == 2, result.stdout
    assert "deployer.py: error: 1 of 3 devices failed: 2" in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_key_and_unknown_host_key(server, partitioned, tmp_path):
    registry = write_registry(tmp_path / "reg.json", [server.device(i, tmp_path / f"d{i}") for i in (1, 3)]
                              + [server.device(2, tmp_path / "d2", identity_file=str(server.wrong_key))])
    result = deployer(partitioned, registry, "--ssh-config", str(server.ssh_config))
    assert result.returncode == 1 and "Permission denied (publickey)" in result.stdout, result.stdout

    models = copy_models(partitioned, tmp_path)
    registry = write_registry(tmp_path / "reg.json", [server.device(i, tmp_path / f"e{i}") for i in (1, 2, 3)])
    result = deployer(models, registry, "--ssh-config", str(server.empty_config), "--launch")
    assert result.returncode == 1 and "Host key verification failed" in result.stdout, result.stdout
    assert all("pass --accept-new-host-keys to trust it" in row[5] for row in rows(result.stdout)), result.stdout
    assert_clean_error(result, "3 of 3 devices failed")
    # every device failed: no launch commands printed, no launch plan written, nothing started
    assert "runtime_engine.py" not in result.stdout and "stage 3" not in result.stdout
    assert not (models / "partitioned_submodels" / "res" / "launch_plan.json").exists()
    result = deployer(models, registry, "--ssh-config", str(server.empty_config), "--accept-new-host-keys")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (models / "partitioned_submodels" / "res" / "launch_plan.json").exists()


def test_launch_and_stop_over_ssh_in_hostile_but_legal_folders(server, partitioned, tmp_path):
    """Deploy, start all three stages over SSH last first, get results on the last device, stop. The device
    folders hold quotes, $(...), backticks, ';', '!', spaces and non-ASCII letters, and one is below ~: all are
    legitimate, and none of the commands in them runs."""
    marker = tmp_path / "MARKER"
    home = f"~/.dnnpipe-test-{os.getpid()}-\u00e9 x"
    remote_home = Path(pwd.getpwuid(os.getuid()).pw_dir)  # the ssh login's home: sshd runs as this user
    folders = {1: home, 2: str(tmp_path / HOSTILE.format(m=marker) / "dev2"), 3: str(tmp_path / "dev3")}
    devices = [server.device(i, folders[i], python=sys.executable) for i in (1, 2, 3)]
    registry = write_registry(tmp_path / "reg.json", devices)
    try:
        result = deployer(partitioned, registry, "--ssh-config", str(server.ssh_config), "--dataset",
                          str(partitioned / "dataset.h5"), "--launch", "--wait", "60")
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.index("stage 3 listening") < result.stdout.index("stage 2 listening")
        device2 = tmp_path / HOSTILE.format(m=marker) / "dev2"  # stage 3 runs on device 2
        deadline = time.monotonic() + 60
        log = device2 / "partitioned_submodels" / "res" / "logs" / "stage_3.out"  # each model's files apart
        while not (log.exists() and "pipeline:" in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "pipeline: 5 results" in log.read_text(), log.read_text()
        with h5py.File(device2 / "partitioned_submodels" / "res" / "results.h5") as f:
            assert f["logits"].shape == (5, 5)
        assert (remote_home / home[2:] / "partitioned_submodels" / "res" / "logs" / "stage_2.out").is_file()  # below ~
        stopped = deployer(partitioned, registry, "--ssh-config", str(server.ssh_config), "--stop")
        assert stopped.returncode == 0 and stopped.stdout.count("stage ") == 3, stopped.stdout
        again = deployer(partitioned, registry, "--ssh-config", str(server.ssh_config), "--stop")
        assert again.stdout.count("not running") == 3, again.stdout
    finally:
        shutil.rmtree(remote_home / home[2:], ignore_errors=True)
    assert not marker.exists() and not list(tmp_path.rglob("MARKER"))


def test_a_stage_that_dies_at_start_fails_the_launch_at_once_with_its_error(server, partitioned, tmp_path):
    devices = [server.device(i, tmp_path / f"dev{i}", python="/nonexistent/bin/python3") for i in (1, 2, 3)]
    registry = write_registry(tmp_path / "reg.json", devices)
    args = ("--ssh-config", str(server.ssh_config), "--no-runtime-code")
    assert deployer(partitioned, registry, *args).returncode == 0
    started = time.monotonic()
    result = deployer(partitioned, registry, *args, "--launch", "--wait", "60")
    assert time.monotonic() - started < 15  # not the 60 s --wait
    assert_clean_error(result, "stage 3 on device 2 exited at start", "/nonexistent/bin/python3",
                       "No such file or directory", "logs/stage_3.out")
    assert "the end of" in result.stdout and "stage 2 listening" not in result.stdout
    assert not list(tmp_path.rglob("*.pid"))  # what the launch started, it stopped


def test_values_reach_the_device_as_arguments_never_as_shell_text(server, partitioned, tmp_path):
    """Below the registry's checks: a hostile interpreter, host or user that got into a Device anyway is an
    argument, not a command."""
    marker = tmp_path / "MARKER"
    options = SshOptions(ssh_config=server.ssh_config, connect_timeout=3)
    device = Device(1, "127.0.0.1", server.user, server.port, str(server.user_key), str(tmp_path / "dev"),
                    runtime_port=free_port(), python=f"$(touch {marker})")
    transport = SshTransport(device, options)
    manifest = read_manifest(partitioned / "partitioned_submodels" / "res")
    [item] = launch_plan(manifest, [device], "m", "d.h5", None)
    transport.start(item.argv, item.log_file, item.pid_file)
    deadline = time.monotonic() + 10
    while transport.alive(item.pid_file) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "$(touch" in transport.tail(item.log_file)  # nohup could not find a program by that very name
    for hostile in (Device(1, f"-oProxyCommand=touch {marker}", port=server.port),
                    Device(1, "127.0.0.1", f"-oProxyCommand=touch {marker}", server.port)):
        with pytest.raises(DnnpipeError):
            SshTransport(hostile, options).hashes(["x"])
    assert not marker.exists()


@pytest.mark.parametrize("entry, message", [
    ({"remote_dir": "x\"\n!touch {m}\n"}, "'remote_dir' holds a control character"),
    ({"host": "-oProxyCommand=touch {m}"}, "'host' must be a host name"),
    ({"user": "-oProxyCommand=touch {m}"}, "'user' must be a user name"),
    ({"python": "python3; touch {m}"}, "'python' must be an interpreter path or name"),
    ({"python": "$(touch {m})"}, "'python' must be an interpreter path or name"),
])
def test_hostile_registries_are_refused_before_anything_runs(server, partitioned, tmp_path, capsys, entry,
                                                            message):
    marker = tmp_path / "MARKER"
    devices = [server.device(i, tmp_path / f"dev{i}") for i in (1, 2, 3)]
    devices[1].update({k: v.format(m=marker) for k, v in entry.items()})
    registry = write_registry(tmp_path / "reg.json", devices)
    assert_one_line_error(deployer_in_process(capsys, partitioned, registry, "--ssh-config", str(server.ssh_config),
                                              "--launch"), "reg.json: devices[1]", message)
    assert not marker.exists() and not (tmp_path / "dev1").exists()


@pytest.mark.parametrize("field, value, message", [
    ("file", "../../escaped.tflite", "stages[1].file must be a plain file name"),
    ("file", "/etc/passwd", "stages[1].file must be a plain file name"),
    ("sha256", "$(touch {m})", "stages[1].sha256 must be 64 lowercase hex digits"),
    ("sha256", "abc", "stages[1].sha256 must be 64 lowercase hex digits"),
])
def test_hostile_manifests_are_refused_before_anything_is_read_or_sent(partitioned, tmp_path, capsys, field, value,
                                                                        message):
    marker = tmp_path / "MARKER"
    models = copy_models(partitioned, tmp_path)
    manifest_file = models / "partitioned_submodels" / "res" / "manifest.json"
    data = json.loads(manifest_file.read_text())
    data["stages"][1][field] = value.format(m=marker)
    manifest_file.write_text(json.dumps(data))
    devices = [{"device_id": i, "host": "local", "remote_dir": str(tmp_path / "devices" / f"dev{i}"),
                "runtime_port": free_port()} for i in (1, 2, 3)]
    outcome = deployer_in_process(capsys, models, write_registry(tmp_path / "reg.json", devices), "--launch")
    assert_one_line_error(outcome, "manifest.json: ", message)
    assert not marker.exists() and not (tmp_path / "devices").exists() and not (tmp_path / "escaped.tflite").exists()


def test_pipeline_key_reaches_every_device_private_and_unprinted(server, partitioned, tmp_path):
    """And (TLS being the default) the certificate (public) and its key (private); --no-tls reaches every stage."""
    models = copy_models(partitioned, tmp_path)
    folder = models / "partitioned_submodels" / "res"
    key = folder / KEY_FILE
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    devices = [server.device(1, tmp_path / "dev1"), server.device(2, tmp_path / "dev2"),
               {"device_id": 3, "host": "local", "remote_dir": str(tmp_path / "dev3"), "runtime_port": free_port()}]
    old_umask = os.umask(0o022)
    try:
        result = deployer(models, write_registry(tmp_path / "reg.json", devices), "--ssh-config",
                          str(server.ssh_config), "--no-runtime-code", "--tls")
    finally:
        os.umask(old_umask)
    assert result.returncode == 0, result.stdout + result.stderr
    for i in (1, 2, 3):
        for name, mode in ((KEY_FILE, 0o600), (CERT_KEY_FILE, 0o600), (CERT_FILE, 0o644)):
            shipped = tmp_path / f"dev{i}" / "partitioned_submodels" / "res" / name
            assert shipped.read_bytes() == (folder / name).read_bytes()
            assert stat.S_IMODE(shipped.stat().st_mode) == mode, (i, name, oct(shipped.stat().st_mode))
    assert key.read_bytes().hex() not in result.stdout + result.stderr
    assert KEY_FILE not in result.stdout + result.stderr
    assert (folder / CERT_KEY_FILE).read_text().splitlines()[1] not in result.stdout + result.stderr
    plan = json.loads((folder / "launch_plan.json").read_text())
    assert not [stage for stage in plan["stages"] if "--no-tls" in stage["argv"] or "--tls" in stage["argv"]]
    result = deployer(models, write_registry(tmp_path / "reg.json", devices), "--ssh-config",
                      str(server.ssh_config), "--no-runtime-code", "--no-tls")
    assert result.returncode == 0, result.stdout + result.stderr
    plan = json.loads((folder / "launch_plan.json").read_text())
    assert all("--no-tls" in stage["argv"] for stage in plan["stages"])


def test_dry_run_asks_the_device_and_changes_nothing(server, partitioned, tmp_path):
    devices = [{"device_id": i, "host": "local", "remote_dir": str(tmp_path / f"dev{i}"), "runtime_port": 50000 + i}
               for i in (1, 3)] + [server.device(2, tmp_path / "dev2")]
    registry = write_registry(tmp_path / "reg.json", devices)
    args = ("--ssh-config", str(server.ssh_config))
    dry = deployer(partitioned, registry, "--dry-run", *args)
    assert dry.returncode == 0 and "would send" in dry.stdout, dry.stdout + dry.stderr
    assert all(int(row[2]) > 0 and row[3] == "0" for row in rows(dry.stdout)), dry.stdout
    assert not any((tmp_path / f"dev{i}").exists() for i in (1, 2, 3))  # read-only, even over ssh
    result = deployer(partitioned, registry, *args)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path / "dev1" / "partitioned_submodels" / "res")
    assert manifest.stage(2).device == 1
    assert (tmp_path / "dev1" / "partitioned_submodels" / "res" / manifest.stage(2).file).exists()
    dry = deployer(partitioned, registry, "--dry-run", *args)
    assert [row[2] for row in rows(dry.stdout)] == ["0", "0", "0"], dry.stdout  # what a real run would send


def test_local_launch_fails_fast_and_stops_what_it_started(partitioned, tmp_path):
    """Through the library, as the demo calls it: stage 3 starts, stage 2 cannot; stage 3 is stopped again."""
    devices = [{"device_id": i, "host": "local", "remote_dir": str(tmp_path / f"dev{i}"),
                "runtime_port": free_port()} for i in (1, 2, 3)]
    devices[0]["python"] = "/nonexistent/python3"  # device 1 runs stage 2
    options = DeployOptions(registry=write_registry(tmp_path / "reg.json", devices), model_name="res",
                            model_path=partitioned / "partitioned_submodels", config=tmp_path / "none")
    deployment = deploy(options)
    assert not deployment.failed
    lines: list[str] = []
    with pytest.raises(DnnpipeError, match="cannot start '/nonexistent/python3'"):
        start_stages(deployment, 30, lines.append)
    assert lines == ["stage 3 listening on 127.0.0.1:%d" % devices[1]["runtime_port"]]
    stop_lines: list[str] = []
    stop_stages(options, stop_lines.append)
    assert all(line.endswith("not running") for line in stop_lines), stop_lines


def test_the_table_keeps_its_columns_with_long_paths():
    devices = [Device(1, "local", remote_dir="/a/very/long/path" * 6 + "/device_1"),
               Device(22, "board.example", "pi", 2222, remote_dir="~/DNNPipe")]
    reports = [DeviceReport(devices[0], [1], sent=["x"] * 12), DeviceReport(devices[1], [2, 3], error="refused")]
    table = format_reports(reports).splitlines()
    column = table[0].index("result")
    assert [line[column:] for line in table[1:]] == ["ok", "FAILED: refused"]
    assert ".../path/a/very/long/path/device_1  ok" in table[1] and "pi@board.example:2222:~/DNNPipe" in table[2]


def test_every_option_says_its_default():
    for action in deployer_parser()._actions:
        if action.dest != "help":
            assert action.help and ("default" in action.help or "required" in action.help), action.dest


def test_registry_with_a_password_is_refused(partitioned, tmp_path):
    registry = write_registry(tmp_path / "reg.json", [{"device_id": 1, "host": "10.0.0.9", "password": "x"}])
    assert_clean_error(deployer(partitioned, registry), "devices[0] has a 'password': passwords are refused",
                       "identity_file")


def test_a_plan_device_missing_from_the_registry(partitioned, tmp_path):
    path = write_registry(tmp_path / "reg.json", [{"device_id": 1, "host": "local", "remote_dir": str(tmp_path)}])
    assert_clean_error(deployer(partitioned, path), "the plan uses device 3, which the registry does not list")


def test_host_key_errors_say_what_to_do():
    unknown = "Host key verification failed.\n"
    changed = "@@@@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n@@@@@@@@\n" + unknown
    assert "pass --accept-new-host-keys to trust it on first contact" in _reason(unknown)
    assert "ssh-keygen -R" in _reason(changed) and "--accept-new-host-keys" not in _reason(changed)


def local_registry(tmp_path, ids=(1, 2, 3)):
    devices = [{"device_id": i, "host": "local", "remote_dir": str(tmp_path / f"dev{i}"), "runtime_port": free_port()}
               for i in ids]
    return write_registry(tmp_path / "reg.json", devices), devices


def assert_nothing_running(root):
    """Every process a launch started under `root` has ended (its pid file says which)."""
    for pid_file in root.rglob("*.pid"):
        pid = int(pid_file.read_text())
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.kill(pid, 9)
            raise AssertionError(f"{pid_file}: process {pid} still running")


def test_a_foreign_listener_on_the_last_stages_port_fails_the_launch(partitioned, tmp_path):
    """Another process listens where stage 3 should: the launch says stage 3 never came up (its own error),
    starts nothing before it and leaves nothing running."""
    models = copy_models(partitioned, tmp_path)
    registry, devices = local_registry(tmp_path)
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", devices[1]["runtime_port"]))  # stage 3 runs on device 2
        foreign.listen()
        result = deployer(models, registry, "--dataset", str(partitioned / "dataset.h5"), "--launch", "--wait", "30")
    assert_clean_error(result, "stage 3 on device 2 exited at start", "Address already in use",
                       "did not prove it is stage 3 of this pipeline")
    assert "listening" not in result.stdout and "started" not in result.stdout, result.stdout
    assert not list((tmp_path / "dev1").rglob("stage_2.out")) and not list((tmp_path / "dev3").rglob("stage_1.out"))
    assert_nothing_running(tmp_path)


def test_a_foreign_listener_on_a_middle_stages_port_stops_the_stage_already_started(partitioned, tmp_path):
    """It even answers (not the pipeline's handshake): stage 2 fails, and stage 3, proven up, is stopped again."""
    registry, devices = local_registry(tmp_path)
    options = DeployOptions(registry=registry, model_name="res", model_path=partitioned / "partitioned_submodels",
                            config=tmp_path / "none", dataset=partitioned / "dataset.h5")
    deployment = deploy(options)
    assert not deployment.failed
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", devices[0]["runtime_port"]))  # stage 2 runs on device 1
        foreign.listen()
        stop = threading.Event()

        def answer() -> None:
            foreign.settimeout(0.2)
            while not stop.is_set():
                try:
                    sock, _ = foreign.accept()
                except socket.timeout:
                    continue
                with sock:
                    sock.sendall(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 64)
        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        lines: list[str] = []
        try:
            with pytest.raises(DnnpipeError, match="stage 2 on device 1 exited at start: .*Address already in use"):
                start_stages(deployment, 30, lines.append)
        finally:
            stop.set()
            thread.join(5)
    assert lines[0] == "stage 3 listening on 127.0.0.1:%d" % devices[1]["runtime_port"], lines
    assert not any("stage 2 listening" in line or "stage 1" in line for line in lines), lines
    assert_nothing_running(tmp_path)


@pytest.mark.parametrize("tls", [False, True])
def test_the_probe_proves_the_stage_and_takes_no_link(partitioned, tmp_path, tls):
    """A stage listening for its upstream answers the probe for its own number only, with its own key; the
    probe is not taken as the upstream, which still connects afterwards. With --tls, inside TLS."""
    from dnnpipe.deploy.launch import StageProbe
    from dnnpipe.pipeline_key import tls_context
    from dnnpipe.runtime.handshake import LinkAuth
    from dnnpipe.runtime.transport import accept_upstream, connect_downstream, listen

    folder = partitioned / "partitioned_submodels" / "res"
    probe = StageProbe.of(folder, tls=tls)
    server, client = (tls_context(folder, True), tls_context(folder, False)) if tls else (None, None)
    manifest = read_manifest(folder)
    listener = listen("[stage 2]", "127.0.0.1", 0)
    port = listener.getsockname()[1]
    taken: list = []
    thread = threading.Thread(target=lambda: taken.append(accept_upstream(
        "[stage 2]", listener, manifest.stage(2).inputs, 30, 5, auth=LinkAuth(probe.key, probe.identity, 1, 2),
        tls=server)))
    thread.start()
    try:
        assert probe("127.0.0.1", port, 2, 5) is None
        assert "did not prove it is stage 3 of this pipeline" in probe("127.0.0.1", port, 3, 5)
        other = StageProbe(os.urandom(32), probe.identity, probe.tls)
        assert "did not prove it is stage 2 of this pipeline" in other("127.0.0.1", port, 2, 5)
        assert "nothing accepts connections" in probe("127.0.0.1", free_port(), 2, 1)
        assert not taken  # still waiting for its upstream
        downstream = connect_downstream("[stage 1]", "127.0.0.1", port, manifest.stage(1).outputs, 10, 5,
                                        auth=LinkAuth(probe.key, probe.identity, 1, 2), tls=client)
        thread.join(10)
        assert taken
        downstream.close()
        taken[0].close()
    finally:
        thread.join(10)
        listener.close()


def test_a_second_model_on_the_same_devices_keeps_its_own_files(partitioned, tmp_path):
    """Each model's dataset, results and logs live in its own folder on the device; the first model's stay."""
    second = tmp_path / "second" / "partitioned_submodels" / "res2"
    model = models.residual_cnn()
    partition_keras_model(model, [[1, 4, 3], [5, 9, 1], [10, analyse(model)[0].U, 2]], second, "res2", "test",
                          verify_chain=False)
    with h5py.File(tmp_path / "second.h5", "w") as f:
        f["images"] = np.zeros((2, 12, 12, 3), dtype="float32")
    registry, _ = local_registry(tmp_path)
    for path, name, data in ((partitioned / "partitioned_submodels", "res", partitioned / "dataset.h5"),
                             (second.parent, "res2", tmp_path / "second.h5")):
        deployment = deploy(DeployOptions(registry=registry, model_name=name, model_path=path,
                                          config=tmp_path / "none", dataset=data))
        assert not deployment.failed
    first_device = tmp_path / "dev3"  # stage 1 of both models
    for name, data in (("res", partitioned / "dataset.h5"), ("res2", tmp_path / "second.h5")):
        shipped = first_device / "partitioned_submodels" / name / "dataset.h5"
        assert sha256_file(shipped) == sha256_file(data), name
    assert not (first_device / "dataset.h5").exists()
    plan = json.loads((second / "launch_plan.json").read_text())
    assert all(s["log"].startswith("partitioned_submodels/res2/logs/") for s in plan["stages"])
    assert "partitioned_submodels/res2/results.h5" in plan["stages"][-1]["argv"]


def test_the_probe_keeps_the_pipeline_key_out_of_its_repr():
    from dnnpipe.deploy.launch import StageProbe

    key = bytes(range(32))
    text = repr(StageProbe(key, b"identity"))
    assert repr(key) not in text and key.hex() not in text and "identity" in text


def test_the_deployer_checks_tls_flags_as_the_runtime_does(tmp_path):
    from dnnpipe.deploy.command import deploy_options

    base = ["--device-registry", str(tmp_path / "r.json"), "--model-name", "m"]
    assert deploy_options(deployer_parser().parse_args(base)).tls
    assert not deploy_options(deployer_parser().parse_args([*base, "--no-tls"])).tls
    with pytest.raises(DnnpipeError, match="--tls and --no-tls contradict each other"):
        deploy_options(deployer_parser().parse_args([*base, "--tls", "--no-tls"]))


def test_a_renamed_partition_folder_keeps_one_model_folder_on_the_device(partitioned, tmp_path):
    """The local folder named otherwise than the manifest's model: the dataset, results, plan, logs and sub-models
    all go under the manifest's name (the runtime's --model-name); the dataset went under the folder's name."""
    renamed = tmp_path / "models" / "renamed"
    shutil.copytree(partitioned / "partitioned_submodels" / "res", renamed)
    config = tmp_path / "configurations"
    (config / "renamed").mkdir(parents=True)
    (config / "renamed" / PLAN_FILE).write_text("{}")
    registry, _ = local_registry(tmp_path)
    deployment = deploy(DeployOptions(registry=registry, model_name="renamed", model_path=renamed.parent,
                                      config=config, dataset=partitioned / "dataset.h5"))
    assert not deployment.failed
    folder = tmp_path / "dev3" / "models" / "res"  # stage 1's device
    assert (folder / "dataset.h5").is_file() and (folder / PLAN_FILE).is_file()
    assert not (tmp_path / "dev3" / "models" / "renamed").exists()
    argv = deployment.launches[0].argv
    assert argv[argv.index("--data-path") + 1] == "models/res/dataset.h5"
    assert argv[argv.index("--model-name") + 1] == "res"
    last = deployment.launches[-1].argv
    assert last[last.index("--output-path") + 1] == "models/res/results.h5"
