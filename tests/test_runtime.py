"""Pipelines of real stage processes on 127.0.0.1: results, back-pressure and every failure class."""

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import models
from dnnpipe.errors import DnnpipeError
from dnnpipe.manifest import read_manifest
from dnnpipe.partition.partitioner import partition_keras_model
from dnnpipe.partition.graph import analyse
from dnnpipe.protocol import Kind, encode_frame, encode_header
from dnnpipe.runtime.stage import RunOptions
from dnnpipe.testbed.local import free_ports, run_local
from dnnpipe.keygen import create_key
from dnnpipe.pipeline_key import CERT_FILE, CERT_KEY_FILE, KEY_FILE, read_key, tls_context
from dnnpipe.runtime.handshake import LinkAuth, connect_side, manifest_identity
from dnnpipe.runtime.metrics import read_timings
from dnnpipe.runtime.transport import secure
from helpers import POLICY_VISIBLE, ROOT, assert_clean_error

ROWS = 6


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """The residual CNN split into 1, 2 and 4 stages, a dataset, and the Keras model's own answers."""
    root = tmp_path_factory.mktemp("runtime")
    model = models.residual_cnn()
    U = analyse(model)[0].U
    plans = {1: [[1, U, 1]], 2: [[1, 5, 2], [6, U, 1]], 4: [[1, 2, 4], [3, 6, 3], [7, 10, 2], [11, U, 1]]}
    for stages, plan in plans.items():
        partition_keras_model(model, plan, root / f"p{stages}" / "res", "res", "test", verify_chain=False)
    images = np.random.default_rng(0).random((ROWS, 12, 12, 3)).astype("float32")
    with h5py.File(root / "data.h5", "w") as f:
        f["images"] = images
    return root, np.asarray(model(images, training=False))


def test_a_stage_runner_into_its_result_buffers_equals_its_call(pipelines):
    """StageRunner.into (what a stage runs: no per-call resize, one copy out) answers exactly as __call__ does,
    frame after frame, into the same result buffers."""
    from dnnpipe.interpreter import StageRunner

    root, _ = pipelines
    folder = root / "p4" / "res"
    rng = np.random.default_rng(1)
    for spec in read_manifest(folder).stages:
        runner = StageRunner(folder / spec.file, spec, 1)
        results = [np.empty(t.shape, t.dtype) for t in spec.outputs]
        for _ in range(3):
            arrays = [rng.random(t.shape).astype(t.dtype) for t in spec.inputs]
            runner.into(arrays, results)
            for got, expected in zip(results, runner(arrays)):
                np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_pipeline_results_equal_the_keras_model(pipelines, stages, tmp_path):
    root, expected = pipelines
    run = run_local(root / f"p{stages}" / "res", root / "data.h5", tmp_path / "out.h5", tmp_path / "logs",
                    run=RunOptions(timeout=30))
    assert [s.frames for s in run.stages] == [ROWS] * stages
    with h5py.File(tmp_path / "out.h5") as f:
        np.testing.assert_allclose(f["logits"][:], expected, rtol=1e-5, atol=1e-5)
    assert run.stages[-1].latency_p50_ms > 0 and run.throughput > 0
    for k in range(1, stages + 1):
        assert len(read_timings(tmp_path / "logs", k)) == ROWS


def test_cycling_inputs_and_paced_rate(pipelines, tmp_path):
    root, expected = pipelines
    run = run_local(root / "p2" / "res", root / "data.h5", tmp_path / "out.h5", tmp_path / "logs",
                    run=RunOptions(num_inputs=20, fps=100))
    assert run.stages[-1].frames == 20
    starts = np.array([t.infer_start for t in read_timings(tmp_path / "logs", 1)])
    # paced at 100 inputs/s on an absolute schedule: load may delay a frame and bunch the ones after it, but the
    # 20th cannot start before 0.19 s after the first was due
    assert starts[-1] - starts[0] >= 0.1
    with h5py.File(tmp_path / "out.h5") as f:
        np.testing.assert_allclose(f["logits"][ROWS:2 * ROWS], expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def wide_pipeline(tmp_path_factory):
    """Two stages joined by a 512 KB cut, so socket buffers hold only a few frames."""
    from dnnpipe.tfenv import import_tensorflow

    _, keras = import_tensorflow()
    root = tmp_path_factory.mktemp("wide")
    x = keras.Input((64, 64, 3), name="image")
    wide = keras.layers.Conv2D(32, 1, name="widen")(x)
    model = keras.Model(x, keras.layers.GlobalAveragePooling2D(name="pool")(wide))
    partition_keras_model(model, [[1, 1, 1], [2, 2, 2]], root / "wide", "wide", "test", verify_chain=False)
    with h5py.File(root / "data.h5", "w") as f:
        f["images"] = np.zeros((4, 64, 64, 3), "float32")
    return root


def test_slow_last_stage_holds_back_the_first(wide_pipeline, tmp_path):
    """Back-pressure: a slow last stage (20 ms a frame) stops the first (1 ms) from running ahead."""
    root, frames = wide_pipeline, 120
    run_local(root / "wide", root / "data.h5", None, tmp_path / "logs", pace_ms=[None, 20.0],
              run=RunOptions(num_inputs=frames, queue_size=1))
    first, last = read_timings(tmp_path / "logs", 1), read_timings(tmp_path / "logs", 2)
    assert len(first) == len(last) == frames
    # How many frames stage 1 had finished beyond those stage 2 had finished, at worst.
    first_done = np.array([t.infer_end for t in first])
    lead = max(int(np.sum(first_done <= t.infer_end)) - (i + 1) for i, t in enumerate(last))
    # Measured: 14 frames with --queue-size 1; with --queue-size 200 stage 1 runs 142 frames ahead.
    assert lead < 40, lead


def link_auth(folder, sender, receiver, key=None):
    return LinkAuth(key or read_key(folder / KEY_FILE), manifest_identity((folder / "manifest.json").read_bytes()),
                    sender, receiver)


def stage_process(folder, stage, *args):
    return subprocess.Popen([sys.executable, str(ROOT / "runtime_engine.py"), "--stage", str(stage),
                             "--model-path", str(folder.parent), "--model-name", folder.name, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=60):
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def connect(port, deadline=20.0):
    end = time.monotonic() + deadline
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


@pytest.fixture
def stage2(pipelines):
    """The last stage of the 2-stage pipeline listening on a free port, fed by the test as its upstream."""
    root, _ = pipelines
    folder = root / "p2" / "res"
    (port,) = free_ports(1)
    process = stage_process(folder, 2, "--bind-addr", "127.0.0.1", "--bind-port", str(port), "--timeout", "5")
    # frames are read only from an authenticated upstream, inside TLS by default
    sock = secure(connect(port), link_auth(folder, 1, 2), tls_context(folder, server_side=False), server_side=False)
    yield process, sock, read_manifest(folder).stage(2)
    sock.close()
    if process.poll() is None:
        process.kill()


def thread_policies(pid: int) -> list[int]:
    policies = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            policies.append(os.sched_getscheduler(int(task.name)))
        except OSError:  # the thread ended meanwhile
            pass
    return policies


@pytest.mark.skipif(not POLICY_VISIBLE, reason="needs Linux and the tests under the default scheduling policy")
def test_a_stage_runs_as_batch_work_with_its_receive_execute_and_send_threads(stage2):
    """runtime.priority: its own threads do not preempt its invoke when they wake."""
    process, _, _ = stage2
    deadline = time.monotonic() + 30
    while thread_policies(process.pid).count(os.SCHED_BATCH) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)  # the link is up before the stage starts its threads
    assert os.sched_getscheduler(process.pid) == os.SCHED_BATCH
    assert thread_policies(process.pid).count(os.SCHED_BATCH) >= 4  # its main thread and the three it started


def test_malformed_frame(stage2):
    process, sock, _ = stage2
    sock.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 20)
    assert_clean_error(finish(process), "[stage 2] upstream 127.0.0.1:", "bad magic b'GET '")


def test_wrong_shape(stage2):
    process, sock, spec = stage2
    wrong = [type(t)(t.name, t.key, (1, 3, 3, 8), t.dtype) for t in spec.inputs]
    sock.sendall(encode_header(Kind.DATA, 0, 0, wrong))
    assert_clean_error(finish(process), "[stage 2]", "is float32[1, 3, 3, 8], the manifest says float32[1, 12, 12, 8]")


def test_truncated_frame_then_peer_dies(stage2):
    process, sock, spec = stage2
    sock.sendall(encode_header(Kind.DATA, 0, 0, spec.inputs) + b"\0" * 100)
    sock.close()
    assert_clean_error(finish(process), "[stage 2]", "truncated frame: connection closed after 100 of")


def test_peer_dies_mid_stream(stage2):
    process, sock, spec = stage2
    for sequence in range(3):
        sock.sendall(encode_frame(Kind.DATA, sequence, time.time_ns(), spec.inputs,
                                  [np.zeros(t.shape, t.dtype) for t in spec.inputs]))
    sock.close()
    assert_clean_error(finish(process), "[stage 2]", "connection closed before end-of-stream")


def test_upstream_error_is_passed_down_and_the_stage_exits_non_zero(stage2):
    process, sock, _ = stage2
    sock.sendall(encode_frame(Kind.ERROR, 0, 0, message="[stage 1] disk on fire"))
    assert_clean_error(finish(process), "runtime_engine.py: error: [stage 1] disk on fire")


def test_an_upstream_error_text_reaches_the_terminal_escaped(stage2):
    """An ERROR frame's text is the peer's: its control characters (terminal escapes, newlines) are shown escaped."""
    process, sock, _ = stage2
    sock.sendall(encode_frame(Kind.ERROR, 0, 0, message="[stage 1] \x1b[2J\x1b]0;owned\x07disk\non fire"))
    result = finish(process)
    assert_clean_error(result, r"[stage 1] \x1b[2J\x1b]0;owned\x07disk\non fire")
    assert "\x1b" not in result.stderr + result.stdout and "\x07" not in result.stderr


def test_silent_upstream_times_out(stage2):
    process, _, _ = stage2
    result = finish(process)
    assert_clean_error(result, "[stage 2]", "no data for 5 s (--timeout)")


def test_port_already_in_use(pipelines):
    root, _ = pipelines
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = finish(stage_process(root / "p2" / "res", 2, "--bind-addr", "127.0.0.1", "--bind-port", str(port)))
    assert_clean_error(result, f"[stage 2] cannot listen on 127.0.0.1:{port}", "Address already in use")


def test_next_stage_never_comes_up(pipelines):
    root, _ = pipelines
    (port,) = free_ports(1)
    result = finish(stage_process(root / "p2" / "res", 1, "--data-path", str(root / "data.h5"),
                                  "--next-host", "127.0.0.1", "--next-port", str(port), "--connect-timeout", "1"))
    assert_clean_error(result, f"[stage 1] cannot reach the next stage at 127.0.0.1:{port} within 1 s")


def test_downstream_dies_mid_stream(pipelines, tmp_path):
    """The first stage notices a dead next stage instead of hanging."""
    root, _ = pipelines
    (port,) = free_ports(1)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen(1)
        process = stage_process(root / "p2" / "res", 1, "--data-path", str(root / "data.h5"), "--next-host",
                                "127.0.0.1", "--next-port", str(port), "--num-inputs", "100000", "--timeout", "5",
                                "--insecure")
        conn, _ = listener.accept()
        conn.recv(1000)
        conn.close()
    result = finish(process)
    assert_clean_error(result, "[stage 1] cannot send to the next stage at 127.0.0.1:")


@pytest.mark.parametrize("args, message", [
    (["--stage", "3"], "stage 3 does not exist: the manifest has stages 1..2"),
    (["--stage", "1", "--next-host", "127.0.0.1", "--next-port", "1"], "the first stage needs --data-path"),
    (["--stage", "2"], "a stage after the first needs --bind-port"),
])
def test_bad_stage_arguments(pipelines, args, message):
    root, _ = pipelines
    folder = root / "p2" / "res"
    result = subprocess.run([sys.executable, str(ROOT / "runtime_engine.py"), "--model-path", str(folder.parent),
                             "--model-name", folder.name, *args], capture_output=True, text=True, timeout=60)
    assert_clean_error(result, message)


def test_bad_input_data(pipelines, tmp_path):
    root, _ = pipelines
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["images"] = np.zeros((3, 5, 5, 3), "float32")
    folder = root / "p2" / "res"
    result = finish(stage_process(folder, 1, "--data-path", str(tmp_path / "bad.h5"), "--next-host", "127.0.0.1",
                                  "--next-port", "1"))
    assert_clean_error(result, "dataset 'images' holds rows of shape (5, 5, 3) x 3, input 'image' needs rows of "
                               "shape (12, 12, 3)")


def test_runtime_does_not_import_tensorflow(pipelines):
    code = ("import sys, runpy; sys.argv = ['runtime_engine.py', '--help']\n"
            "try:\n    runpy.run_path('runtime_engine.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "import dnnpipe.runtime.stage\n"
            "from dnnpipe.interpreter import interpreter_module; print(interpreter_module()[0]); "
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.stdout.split()[-3:] == ["ai-edge-litert", "False", "False"], result.stderr


def test_intruders_on_a_stage_port_neither_feed_it_nor_stop_it(pipelines, tmp_path):
    """While the real pipeline runs, an injector, a trickler and a peer with another key try stage 2's port:
    each is dropped with a line, and the results are exactly the model's."""
    root, expected = pipelines
    folder = root / "p2" / "res"
    (port,) = free_ports(1)
    last = stage_process(folder, 2, "--bind-addr", "127.0.0.1", "--bind-port", str(port),
                         "--output-path", str(tmp_path / "out.h5"), "--timeout", "30", "--no-tls")
    injector = connect(port)
    injector.sendall(encode_header(Kind.DATA, 0, 0, read_manifest(folder).stage(2).inputs) + b"\0" * 64)
    trickler = connect(port)
    trickler.sendall(b"D")  # then nothing: the handshake deadline drops it
    impostor = connect(port)
    with pytest.raises(Exception, match="another pipeline key"):
        connect_side(impostor, link_auth(folder, 1, 2, key=b"k" * 32))
    impostor.close()
    first = stage_process(folder, 1, "--data-path", str(root / "data.h5"), "--next-host", "127.0.0.1",
                          "--next-port", str(port), "--no-tls")
    assert finish(first).returncode == 0
    result = finish(last)
    assert result.returncode == 0, result.stderr
    for intruder in (injector, trickler):
        intruder.close()
    # The trickler is still being vetted when the pipeline ends (its deadline is 5 s): it held nothing up. On a
    # loaded host the pipeline may outlast that deadline, and the trickler is dropped for it.
    dropped = [line for line in result.stdout.splitlines() if "dropped" in line]
    why = sorted(next((w for w in ("not a DNNPipe handshake", "closed during the handshake",
                                    "handshake not finished by its deadline") if w in line), line) for line in dropped)
    assert why in (["closed during the handshake", "not a DNNPipe handshake"],
                   ["closed during the handshake", "handshake not finished by its deadline",
                    "not a DNNPipe handshake"]), result.stdout
    with h5py.File(tmp_path / "out.h5") as f:
        np.testing.assert_allclose(f["logits"][:], expected, rtol=1e-5, atol=1e-5)
        assert f.attrs["complete"]


def test_a_stage_with_another_key_is_refused(pipelines, tmp_path):
    root, _ = pipelines
    folder = root / "p2" / "res"
    other = create_key(tmp_path)
    (port,) = free_ports(1)
    last = stage_process(folder, 2, "--bind-addr", "127.0.0.1", "--bind-port", str(port), "--connect-timeout", "3")
    first = finish(stage_process(folder, 1, "--data-path", str(root / "data.h5"), "--next-host", "127.0.0.1",
                                 "--next-port", str(port), "--key-file", str(other), "--connect-timeout", "3"))
    assert_clean_error(first, f"[stage 1] the next stage at 127.0.0.1:{port} refused the link",
                       "another pipeline key or another manifest", "retried for 3 s")
    second = finish(last)
    assert_clean_error(second, "[stage 2] no upstream stage connected")
    assert "dropped 127.0.0.1" in second.stdout


def test_a_stage_without_its_key_says_how_to_get_one(pipelines, tmp_path):
    root, _ = pipelines
    result = finish(stage_process(root / "p2" / "res", 1, "--data-path", str(root / "data.h5"), "--next-host",
                                  "127.0.0.1", "--next-port", "1", "--key-file", str(tmp_path / "none.key")))
    assert_clean_error(result, "none.key: pipeline key not found", "--insecure")


def stage_pids(marker: str) -> list[int]:
    """Processes whose command line mentions marker (a test's own folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_run_local_alone_leaves_no_stage_behind(pipelines, tmp_path, signal_number):
    root, _ = pipelines
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "dnnpipe", "run-local", "--model-path", str(root / "p4"), "--model-name", "res",
               "--data-path", str(root / "data.h5"), "--output-path", str(tmp_path / "out.h5"), "--log-dir",
               str(logs), "--num-inputs", "100000", "--fps", "50"]
    runner = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "out.h5").exists() or len(set(stage_pids(str(logs))) - {runner.pid}) < 4:
        assert time.monotonic() < deadline and runner.poll() is None, runner.communicate()
        time.sleep(0.2)
    assert len(set(stage_pids(str(logs))) - {runner.pid}) == 4
    runner.send_signal(signal_number)  # to run-local only, as a supervisor or `kill` does
    result = finish(runner, timeout=30)
    assert result.returncode == 130 and "interrupted" in result.stderr, result.stderr
    assert stage_pids(str(logs)) == []
    with h5py.File(tmp_path / "out.h5") as f:
        assert not f.attrs["complete"]  # a partial results file says so


def test_run_local_names_the_stage_that_broke_without_waiting_out_the_others(pipelines, tmp_path):
    root, _ = pipelines
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["images"] = np.zeros((3, 5, 5, 3), "float32")
    began = time.monotonic()
    with pytest.raises(DnnpipeError, match=r"stage 1 failed: .*input 'image' needs rows of shape \(12, 12, 3\)"):
        run_local(root / "p4" / "res", tmp_path / "bad.h5", None, tmp_path / "logs")
    assert time.monotonic() - began < 20  # the other stages are stopped, not waited for (60 s)
    assert stage_pids(str(tmp_path / "logs")) == []


def test_an_input_file_without_the_dataset_names_what_it_has(pipelines, tmp_path):
    root, _ = pipelines
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["pictures"] = np.zeros((3, 12, 12, 3), "float32")
    result = finish(stage_process(root / "p2" / "res", 1, "--data-path", str(tmp_path / "other.h5"),
                                  "--next-host", "127.0.0.1", "--next-port", "1"))
    assert_clean_error(result, "no dataset 'image' for input 'image' (have: pictures)")


def test_tls_pipeline_results_equal_the_keras_model(pipelines, tmp_path):
    """--tls: both stages' link inside mutual TLS with the certificate the partitioner made."""
    root, expected = pipelines
    folder = root / "p2" / "res"
    assert (folder / CERT_FILE).is_file() and stat.S_IMODE((folder / CERT_KEY_FILE).stat().st_mode) == 0o600
    run = run_local(folder, root / "data.h5", tmp_path / "out.h5", tmp_path / "logs",
                    run=RunOptions(timeout=30, tls=True))
    assert [s.frames for s in run.stages] == [ROWS, ROWS]
    with h5py.File(tmp_path / "out.h5") as f:
        np.testing.assert_allclose(f["logits"][:], expected, rtol=1e-5, atol=1e-5)
    assert "over TLS" in (tmp_path / "logs" / "stage_1.out").read_text()


@pytest.mark.parametrize("sender, receiver, dropped", [
    (("--no-tls",), ("--tls",), "failed the TLS handshake"),  # a plain peer knocking at a TLS stage (old --tls)
    ((), ("--no-tls",), "the peer speaks TLS: it runs with TLS (the default) and this stage with --no-tls"),
])
def test_both_ends_of_a_link_must_agree_on_tls(pipelines, sender, receiver, dropped):
    root, _ = pipelines
    folder = root / "p2" / "res"
    (port,) = free_ports(1)
    last = stage_process(folder, 2, "--bind-addr", "127.0.0.1", "--bind-port", str(port), "--connect-timeout", "3",
                         *receiver)
    first = finish(stage_process(folder, 1, "--data-path", str(root / "data.h5"), "--next-host", "127.0.0.1",
                                 "--next-port", str(port), "--connect-timeout", "3", *sender))
    assert_clean_error(first, f"[stage 1] the next stage at 127.0.0.1:{port} refused the link")
    second = finish(last)
    assert_clean_error(second, "[stage 2] no upstream stage connected")
    assert "dropped 127.0.0.1" in second.stdout and dropped in second.stdout, second.stdout


def test_tls_with_insecure_and_without_openssl_are_clean_errors(pipelines, tmp_path):
    root, _ = pipelines
    result = finish(stage_process(root / "p2" / "res", 1, "--data-path", str(root / "data.h5"), "--next-host",
                                  "127.0.0.1", "--next-port", "1", "--tls", "--insecure"))
    assert_clean_error(result, "[stage 1] --tls and --insecure do not go together")
    folder = tmp_path / "res"  # a partition made where openssl was missing: no certificate
    shutil.copytree(root / "p2" / "res", folder)
    for name in (CERT_FILE, CERT_KEY_FILE):
        (folder / name).unlink()
    result = subprocess.run([sys.executable, "-m", "dnnpipe", "run-local", "--model-path", str(tmp_path),
                             "--model-name", "res", "--data-path", str(root / "data.h5"), "--testbed", "loopback",
                             ], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": str(tmp_path / "no-bin")})
    assert_clean_error(result, "pipeline.crt: cannot make the TLS certificate: the openssl command is not "
                               "installed", "--no-tls")


def test_one_builder_spells_every_runtime_command_line():
    """runtime/argv.py builds the deployer's, run-local's and serve's agent command lines alike."""
    from dnnpipe.runtime.argv import agent_argv, runtime_argv
    from dnnpipe.runtime.stage import StageOptions

    assert runtime_argv(["py", "x.py"], [("--a", None), ("--b", True), ("--c", False), ("--d", 3), ("--e", 0.1),
                                         ("--f", Path("p q"))]) == ["py", "x.py", "--b", "--d", "3", "--e", "0.1",
                                                                    "--f", "p q"]
    assert RunOptions(num_inputs=5, tls=True).flags()[:2] == [("--num-inputs", 5), ("--fps", None)]
    assert ("--no-tls", False) in RunOptions().flags() and ("--no-tls", True) in RunOptions(tls=False).flags()
    assert ("--no-tls", False) in RunOptions(tls=False, insecure=True).flags()  # --insecure says it all
    stage = StageOptions(stage=2, folder=Path("m"), timeout=5.0)  # one source: a stage's options extend RunOptions
    assert isinstance(stage, RunOptions) and stage.flags() == RunOptions(timeout=5.0).flags()
    argv = agent_argv("python3", 3, "models", "m", "0.0.0.0", 50003, "10.0.0.1", 4000, 30.0, False, True)
    assert argv[:3] == ["python3", "-m", "dnnpipe.runtime"] and argv[-1] == "--tls" and "--insecure" not in argv
