"""`serve --http`: the adaptive pipeline on device agents behind the Open Inference Protocol, driven by a real
client nobody here wrote (tritonclient). A device killed under 16 client threads: every request answered once,
with the model's own result; SIGTERM drains and leaves no process behind."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dnnpipe.manifest import read_manifest
from dnnpipe.testbed.local import free_ports
from serve_setup import Served, make_served
from test_serve import Run, assert_no_orphans

httpclient = pytest.importorskip("tritonclient.http")

CLIENTS = 16
REQUESTS = 12  # per client


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    return make_served(tmp_path_factory.mktemp("serve_http"), [1.0, 1.0, 1.0])


def start(served: Served, tmp_path: Path, *extra: str) -> tuple[Run, str]:
    registry = served.registry([1, 2, 3], tmp_path / "registry.json")
    port = free_ports(1)[0]
    run = Run(["serve", "--device-registry", str(registry), "--model-path", str(served.parts), "--model-name",
               served.name, "--config", str(served.config), "--work-dir", str(tmp_path / "serve_work"),
               "--threshold", "100", "--http", f"127.0.0.1:{port}", *extra])
    url = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    client = httpclient.InferenceServerClient(url)
    while True:
        assert run.process.poll() is None, "serve ended:\n" + "\n".join(run.lines)
        try:
            if client.is_server_ready():
                return run, url
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        assert time.monotonic() < deadline, "serve --http never became ready:\n" + "\n".join(run.lines)
        time.sleep(0.1)


def infer(client, served: Served, row: int) -> np.ndarray:
    manifest = read_manifest(served.parts / served.name)
    images = served_images(served)
    tensor = httpclient.InferInput(manifest.inputs[0].name, [1, *images.shape[1:]], "FP32")
    tensor.set_data_from_numpy(images[row:row + 1], binary_data=True)
    result = client.infer(served.name, [tensor], timeout=60)
    return result.as_numpy(manifest.outputs[0].name)


def metrics(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{url}/metrics", timeout=10) as answer:
        return answer.read().decode()


def served_images(served: Served) -> np.ndarray:
    import h5py

    with h5py.File(served.data) as f:
        return f["images"][:]


def test_a_device_killed_under_load_loses_no_request(served, tmp_path):
    run, url = start(served, tmp_path)
    expected = next(iter(served.expected.values()))
    answers: dict[tuple[int, int], np.ndarray] = {}
    failures: list[str] = []
    lock = threading.Lock()

    def client_thread(c: int) -> None:
        client = httpclient.InferenceServerClient(url, network_timeout=60)
        for r in range(REQUESTS):
            row = (c + r) % len(expected)
            try:
                got = infer(client, served, row)
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                with lock:
                    failures.append(f"client {c} request {r}: {e}")
                continue
            with lock:
                answers[(c, r)] = got

    threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(answers) < CLIENTS * REQUESTS // 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(run.pid(2), signal.SIGKILL)
    for t in threads:
        t.join(120)
    assert not failures, failures
    assert len(answers) == CLIENTS * REQUESTS
    # the plan without device 2 gets its own plans for a loss loaded: the metric says so, as the line does
    deadline = time.monotonic() + 30
    while "dnnpipe_ready_for_loss 1.0" not in metrics(url) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "dnnpipe_ready_for_loss 1.0" in metrics(url), "\n".join(run.lines)
    assert any("ready for a loss: the plan for the loss of any one of devices 1 and 3" in line for line in run.lines)
    for (c, r), got in answers.items():
        np.testing.assert_allclose(got.reshape(expected[0].shape), expected[(c + r) % len(expected)], rtol=1e-4,
                                   atol=1e-4)
    run.process.send_signal(signal.SIGTERM)
    code, stdout, stderr = run.wait(30)
    assert code == 0, f"{stdout}\n{stderr}"
    assert "device 2" in stdout and "drained" in stdout, stdout
    assert_no_orphans(served.root)


def test_serve_takes_files_or_http_not_both(served, tmp_path):
    registry = served.registry([1, 2, 3], tmp_path / "registry.json")
    run = Run(["serve", "--device-registry", str(registry), "--model-path", str(served.parts), "--model-name",
               served.name, "--config", str(served.config), "--data-path", str(served.data), "--http",
               "127.0.0.1:0"])
    code, stdout, stderr = run.wait(60)
    assert code != 0 and "either --data-path and --output-path" in stderr and "Traceback" not in stderr
