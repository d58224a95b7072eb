"""Probes of the trust boundaries (issue 29) on loopback, against real stage processes run by the paper's commands."""

import socket
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest

import models
from dnnpipe.partition.graph import analyse
from dnnpipe.partition.partitioner import partition_keras_model
from dnnpipe.testbed.local import free_ports
from helpers import ROOT

ROWS = 6
FLOOD = 24


@pytest.fixture(scope="module")
def three_stages(tmp_path_factory):
    """The residual CNN cut into 3 stages (with the key and certificate the partitioner makes), a dataset and
    the Keras model's own answers."""
    root = tmp_path_factory.mktemp("security")
    model = models.residual_cnn()
    U = analyse(model)[0].U
    partition_keras_model(model, [[1, 4, 3], [5, 9, 2], [10, U, 1]], root / "res", "res", "test", verify_chain=False)
    images = np.random.default_rng(1).random((ROWS, 12, 12, 3)).astype("float32")
    with h5py.File(root / "data.h5", "w") as f:
        f["images"] = images
    return root / "res", root / "data.h5", np.asarray(model(images, training=False))


def runtime_engine(folder, stage, *args):
    return subprocess.Popen([sys.executable, str(ROOT / "runtime_engine.py"), "--stage", str(stage), "--model-path",
                             str(folder.parent), "--model-name", folder.name, "--bind-addr", "127.0.0.1", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


class SilentFlood:
    """Clients that connect, say nothing, and reconnect as soon as they are dropped."""

    def __init__(self, port: int, clients: int):
        self.port, self.stop, self.connections = port, threading.Event(), 0
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _client(self) -> None:
        while not self.stop.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=1)
            except OSError:
                time.sleep(0.02)
                continue
            self.connections += 1
            sock.settimeout(0.1)
            with sock:
                while not self.stop.is_set():
                    try:
                        if not sock.recv(1):
                            break  # dropped: come back at once
                    except socket.timeout:
                        continue
                    except OSError:
                        break

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(5)


def test_silent_reconnecting_clients_cannot_keep_the_upstream_out(three_stages, tmp_path):
    folder, data, expected = three_stages
    port2, port3 = free_ports(2)
    third = runtime_engine(folder, 3, "--bind-port", str(port3), "--output-path", str(tmp_path / "out.h5"))
    second = runtime_engine(folder, 2, "--bind-port", str(port2), "--next-host", "127.0.0.1", "--next-port",
                            str(port3))
    flood = SilentFlood(port2, FLOOD)
    try:
        deadline = time.monotonic() + 30
        while flood.connections < 2 * FLOOD:  # every client is in and some were dropped already
            assert time.monotonic() < deadline and second.poll() is None, "the flood never reached stage 2"
            time.sleep(0.05)
        first = runtime_engine(folder, 1, "--data-path", str(data), "--next-host", "127.0.0.1", "--next-port",
                               str(port2))
        outputs = [first.communicate(timeout=120), second.communicate(timeout=120), third.communicate(timeout=120)]
    finally:
        flood.close()
        for process in (third, second):
            if process.poll() is None:
                process.kill()
                process.communicate()
    for process, (stdout, stderr) in zip((first, second, third), outputs):
        assert process.returncode == 0, stdout + stderr
    with h5py.File(tmp_path / "out.h5") as f:
        np.testing.assert_allclose(f["logits"][:], expected, rtol=1e-5, atol=1e-5)
        assert f.attrs["complete"] and len(f["logits"]) == ROWS
    log = outputs[1][0].splitlines()
    assert flood.connections > 2 * FLOOD
    assert len(log) < 40, "\n".join(log[:50])  # drops are counted, not a line each
    assert any("dropped" in line for line in log), log


class TamperingProxy:
    """On the path between two stages: passes every byte through but flips one bit at stream offset `at` towards
    the listener: without TLS that is inside the first frame's tensor (the handshake is 73 bytes, a frame's header
    and descriptors well under 1 KB, its tensors 9 KiB), so the handshake passes and the data is altered."""

    def __init__(self, target_port: int, at: int = 4096):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port, self.target, self.at, self.flipped = self.listener.getsockname()[1], target_port, at, 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.listener.settimeout(30)
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            try:
                far = socket.create_connection(("127.0.0.1", self.target), timeout=30)
            except OSError:  # the far stage is not listening yet: drop this one, the near stage dials again
                near.close()
                continue
            threading.Thread(target=self._pump, args=(near, far, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(far, near, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, tamper: bool) -> None:
        passed = 0
        try:
            while chunk := source.recv(65536):
                if tamper and passed <= self.at < passed + len(chunk):
                    i = self.at - passed
                    chunk = chunk[:i] + bytes([chunk[i] ^ 0x01]) + chunk[i + 1:]
                    self.flipped += 1
                passed += len(chunk)
                sink.sendall(chunk)
        except OSError:
            pass
        try:
            sink.shutdown(socket.SHUT_WR)  # pass the end on, as a TCP proxy does
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


def test_frames_altered_on_the_path_after_a_genuine_handshake_are_never_accepted(three_stages, tmp_path):
    """Issue 29's proxy rewrote a payload after passing a genuine handshake, and stage 2 took it. With TLS (the
    default), an altered record breaks the link: the pipeline fails with an error instead of a wrong result."""
    folder, data, _ = three_stages
    port2, port3 = free_ports(2)
    proxy = TamperingProxy(port2)  # on the link from stage 1 (9 KiB a frame) to stage 2
    out = tmp_path / "out.h5"
    limits = ("--connect-timeout", "10", "--timeout", "10")
    third = runtime_engine(folder, 3, "--bind-port", str(port3), "--output-path", str(out), *limits)
    second = runtime_engine(folder, 2, "--bind-port", str(port2), "--next-host", "127.0.0.1", "--next-port",
                            str(port3), *limits)
    first = runtime_engine(folder, 1, "--data-path", str(data), "--next-host", "127.0.0.1", "--next-port",
                           str(proxy.port), *limits)
    try:
        outputs = [p.communicate(timeout=120) for p in (first, second, third)]
    finally:
        proxy.close()
    assert proxy.flipped > 0, outputs
    assert second.returncode != 0 and third.returncode != 0, outputs
    assert "Traceback" not in outputs[1][1] and len(outputs[1][1].strip().splitlines()) == 1, outputs[1][1]
    if out.exists():
        with h5py.File(out) as f:
            assert not f.attrs["complete"]
