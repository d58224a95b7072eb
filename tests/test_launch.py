"""deploy/launch.py: the launch plan (pure), and starting, proving and stopping stages on real sockets and real
processes, without TensorFlow: a tiny process that answers the readiness probe stands in for a stage (the real
stage under the deployer is tests/test_deploy.py's)."""

import json
import os
import shlex
import socket
import sys
import threading
import time

import pytest

from dnnpipe.deploy.launch import (NOTHING, StageLaunch, StageProbe, format_launch_plan, launch, launch_plan,
                                   model_folder, stop, wait_for_stage, write_launch_plan)
from dnnpipe.deploy.registry import Device
from dnnpipe.deploy.transport import LocalTransport
from dnnpipe.errors import ConfigError, DnnpipeError
from dnnpipe.manifest import Manifest, StageSpec, TensorSpec
from dnnpipe.runtime.handshake import LinkAuth, listen_side
from dnnpipe.testbed.local import free_ports

SPEC = TensorSpec("x", "x", (1, 2), "float32")
KEY, IDENTITY = os.urandom(32), os.urandom(32)
SECONDS = 20.0

# A stand-in for a stage listening for its upstream: it answers the probe as stage STAGE with the key in KEYFILE.
ANSWERER = """
import socket, sys
from dnnpipe.runtime.handshake import LinkAuth, listen_side
port, stage, keyfile, identity = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], bytes.fromhex(sys.argv[4])
key = open(keyfile, "rb").read()
server = socket.create_server(("127.0.0.1", port))
while True:
    conn, _ = server.accept()
    try:
        listen_side(conn, LinkAuth(key, identity, stage - 1, stage), 5)
    except Exception:
        pass
    conn.close()
"""


def manifest(stages: int) -> Manifest:
    return Manifest("res", 6, "none", tuple(StageSpec(k, k, (k, k), f"stage_{k}.tflite", "0" * 64, (SPEC,), (SPEC,))
                                            for k in range(1, stages + 1)))


def test_a_models_folder_on_a_device_is_below_the_models_dir():
    assert model_folder("partitioned_submodels", "res") == "partitioned_submodels/res"


def test_each_stage_receives_from_the_one_before_and_sends_to_the_one_after():
    devices = [Device(1, "board-1", runtime_port=50001), Device(2, "local", runtime_port=50002, python="/py"),
               Device(3, "board-3", runtime_port=50003)]
    first, middle, last = launch_plan(manifest(3), devices, "models", "in.h5", "out.h5", ["--fps", "5"])
    flags = [dict(zip(s.argv[2::2], s.argv[3::2])) for s in (first, middle, last)]  # every flag takes a value here
    assert first.argv[:2] == ("python3", "runtime_engine.py") and middle.argv[:2] == ("/py", "runtime_engine.py")
    assert {f["--fps"] for f in flags} == {"5"} and [s.listens for s in (first, middle, last)] == [False, True, True]
    assert flags[0]["--data-path"] == "in.h5" and "--bind-port" not in flags[0]
    assert (flags[0]["--next-host"], flags[0]["--next-port"]) == ("127.0.0.1", "50002")  # a local next device
    assert (flags[1]["--bind-port"], flags[1]["--next-host"], flags[1]["--next-port"]) == ("50002", "board-3",
                                                                                          "50003")
    assert flags[2]["--output-path"] == "out.h5" and "--next-host" not in flags[2] and "--data-path" not in flags[2]
    assert {f["--log-dir"] for f in flags} == {"models/res/logs"}
    assert last.log_file == "models/res/logs/stage_3.out" and last.pid_file == "models/res/logs/stage_3.pid"
    assert (first.probe_host, middle.probe_host) == ("board-1", "127.0.0.1")


def test_the_plan_as_json_and_as_text_shows_each_argument_quoted(tmp_path):
    devices = [Device(1, "local"), Device(2, "local", runtime_port=50002, remote_dir="/srv/a dir")]
    launches = launch_plan(manifest(2), devices, "models", "my data.h5", None)
    write_launch_plan(tmp_path / "launch_plan.json", launches)
    plan = json.loads((tmp_path / "launch_plan.json").read_text())
    assert [s["listen_port"] for s in plan["stages"]] == [None, 50002]
    assert plan["stages"][0]["argv"] == list(launches[0].argv)
    assert shlex.split(plan["stages"][0]["command"]) == list(launches[0].argv)  # one argument stays one
    assert "'my data.h5'" in format_launch_plan(launches) and "in /srv/a dir" in format_launch_plan(launches)


def test_two_stages_that_would_listen_on_one_port_are_refused_naming_both():
    same = [Device(1, "local", runtime_port=50000), Device(2, "local", runtime_port=50001),
            Device(3, "local", runtime_port=50001)]
    with pytest.raises(ConfigError, match="devices 2 and 3 would both listen on 127.0.0.1:50001"):
        launch_plan(manifest(3), same, "m", "d.h5", None)
    # the first stage does not listen, so its port may be anything
    launch_plan(manifest(2), [Device(1, "local", runtime_port=50000), Device(2, "local", runtime_port=50000)],
                "m", "d.h5", None)


class Answerer:
    """A listener in a thread that answers the probe as `stage` of the pipeline with `key`."""

    def __init__(self, stage: int, key: bytes = KEY):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.stage, self.key = stage, key
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            try:
                listen_side(conn, LinkAuth(self.key, IDENTITY, self.stage - 1, self.stage), 5)
            except DnnpipeError:
                pass
            conn.close()

    def close(self):
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone would not)
        except OSError:
            pass
        self.server.close()
        self.thread.join(SECONDS)
        assert not self.thread.is_alive()


def test_the_probe_passes_only_for_that_stage_of_that_pipeline():
    probe = StageProbe(KEY, IDENTITY)
    answerer = Answerer(2)
    try:
        assert probe("127.0.0.1", answerer.port, 2, 5) is None
        assert "did not prove it is stage 3 of this pipeline" in (probe("127.0.0.1", answerer.port, 3, 5) or "")
        other = StageProbe(os.urandom(32), IDENTITY)
        assert "did not prove it is stage 2 of this pipeline" in (other("127.0.0.1", answerer.port, 2, 5) or "")
    finally:
        answerer.close()
    (closed,) = free_ports(1)
    assert (probe("127.0.0.1", closed, 2, 1) or "").startswith(NOTHING)


def test_a_listener_that_says_nothing_fails_the_probe_within_its_time():
    with socket.create_server(("127.0.0.1", 0)) as silent:
        answer = StageProbe(KEY, IDENTITY)("127.0.0.1", silent.getsockname()[1], 2, 0.5)
    assert answer is not None and "did not prove it is stage 2" in answer


def local_stage(tmp_path, stage: int, argv, port: int) -> tuple[StageLaunch, LocalTransport]:
    device = Device(stage, "local", remote_dir=str(tmp_path / f"device_{stage}"), runtime_port=port)
    (tmp_path / f"device_{stage}").mkdir(exist_ok=True)
    return StageLaunch(stage, device, tuple(argv), True), LocalTransport(device)


def answerer_argv(tmp_path, port: int, stage: int) -> list[str]:
    keyfile = tmp_path / "key"
    keyfile.write_bytes(KEY)
    return [sys.executable, "-c", ANSWERER, str(port), str(stage), str(keyfile), IDENTITY.hex()]


def listening(port: int) -> None:
    """Until something accepts on the port (a process started on a busy host may take a while)."""
    deadline = time.monotonic() + SECONDS
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.1)


def test_waiting_ends_once_the_started_stage_answers_as_itself(tmp_path):
    (port,) = free_ports(1)
    item, transport = local_stage(tmp_path, 2, answerer_argv(tmp_path, port, 2), port)
    transport.start(item.argv, item.log_file, item.pid_file)
    try:
        wait_for_stage(item, transport, SECONDS, StageProbe(KEY, IDENTITY), echo=lambda line: None)
        assert transport.alive(item.pid_file)
    finally:
        assert transport.stop(item.pid_file)
    assert not transport.alive(item.pid_file)


def test_a_stage_that_exits_at_start_is_reported_with_its_last_words(tmp_path):
    (port,) = free_ports(1)
    script = "import sys; print('loading'); print('error: stage_2.tflite: sub-model not found'); sys.exit(1)"
    item, transport = local_stage(tmp_path, 2, [sys.executable, "-c", script], port)
    transport.start(item.argv, item.log_file, item.pid_file)
    echoed: list[str] = []
    with pytest.raises(DnnpipeError, match=r"stage 2 on device 2 exited at start: error: stage_2.tflite: sub-model "
                                           r"not found \(log: .*device_2/logs/stage_2.out\)$"):
        wait_for_stage(item, transport, SECONDS, StageProbe(KEY, IDENTITY), echo=echoed.append)
    assert echoed and "loading" in echoed[0]


def test_a_process_that_holds_the_port_but_is_not_the_stage_times_out_naming_why(tmp_path):
    (port,) = free_ports(1)
    item, transport = local_stage(tmp_path, 2, answerer_argv(tmp_path, port, 3), port)  # another stage's answer
    transport.start(item.argv, item.log_file, item.pid_file)
    try:
        listening(port)
        with pytest.raises(DnnpipeError, match=f"stage 2 on device 2 did not answer as stage 2 on 127.0.0.1:{port} "
                                               f"within 2 s \\(what answers there did not prove it is stage 2"):
            wait_for_stage(item, transport, 2.0, StageProbe(KEY, IDENTITY), echo=lambda line: None)
    finally:
        transport.stop(item.pid_file)


def test_a_launch_that_fails_halfway_stops_what_it_started(tmp_path):
    """Last stage first: stage 3 comes up, stage 2 exits at start, so stage 3 is stopped again and stage 1 never
    starts."""
    port2, port3 = free_ports(2)
    stage3, transport3 = local_stage(tmp_path, 3, answerer_argv(tmp_path, port3, 3), port3)
    stage2, transport2 = local_stage(tmp_path, 2, [sys.executable, "-c", "print('error: no'); exit(2)"], port2)
    stage1, transport1 = local_stage(tmp_path, 1, [sys.executable, "-c", "import time; time.sleep(60)"], 0)
    stage1 = StageLaunch(1, stage1.device, stage1.argv, False)
    transports = {1: transport1, 2: transport2, 3: transport3}
    lines: list[str] = []
    with pytest.raises(DnnpipeError, match="stage 2 on device 2 exited at start: error: no"):
        launch([stage1, stage2, stage3], transports, SECONDS, StageProbe(KEY, IDENTITY), echo=lines.append)
    assert lines[0] == f"stage 3 listening on 127.0.0.1:{port3}"
    assert not transport3.alive(stage3.pid_file) and not (tmp_path / "device_3" / stage3.pid_file).exists()
    assert not (tmp_path / "device_1" / stage1.pid_file).exists()  # never started


def test_a_whole_launch_comes_up_last_first_and_stops(tmp_path):
    port2, port3 = free_ports(2)
    stage3, transport3 = local_stage(tmp_path, 3, answerer_argv(tmp_path, port3, 3), port3)
    stage2, transport2 = local_stage(tmp_path, 2, answerer_argv(tmp_path, port2, 2), port2)
    transports = {2: transport2, 3: transport3}
    lines: list[str] = []
    launch([stage2, stage3], transports, SECONDS, StageProbe(KEY, IDENTITY), echo=lines.append)
    assert lines == [f"stage 3 listening on 127.0.0.1:{port3}", f"stage 2 listening on 127.0.0.1:{port2}"]
    stop([stage2, stage3], transports, echo=lines.append)
    assert lines[2:] == ["stage 2 on device 2: stopped", "stage 3 on device 3: stopped"]
    assert not transport2.alive(stage2.pid_file) and not transport3.alive(stage3.pid_file)
    stop([stage2], transports, echo=lines.append)
    assert lines[-1] == "stage 2 on device 2: not running"
