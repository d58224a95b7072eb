"""A stage's links on real loopback sockets: readiness probes, deadlines, and what a waiting stage says."""

import socket
import threading
import time

import numpy as np
import pytest

from dnnpipe.errors import DnnpipeError
from dnnpipe.manifest import TensorSpec
from dnnpipe.protocol import Kind
from dnnpipe.runtime.local import free_ports
from dnnpipe.runtime.transport import accept_upstream, connect_downstream, listen

SPEC = (TensorSpec("x", "x", (1, 4), "float32"),)


def test_a_probe_is_dropped_and_the_real_upstream_is_taken():
    listener = listen("[stage 2]", "127.0.0.1", 0)
    port = listener.getsockname()[1]
    said: list[str] = []
    data = np.arange(4, dtype="float32").reshape(1, 4)

    def upstream() -> None:
        socket.create_connection(("127.0.0.1", port)).close()  # the deployer's readiness probe
        link = connect_downstream("[stage 1]", "127.0.0.1", port, SPEC, 5, 5)
        link.send(0, 123, [data])
        link.end(1)
        link.close()

    thread = threading.Thread(target=upstream)
    thread.start()
    link = accept_upstream("[stage 2]", listener, SPEC, 5, 5, said.append)
    buffer = [np.empty((1, 4), "float32")]
    frame = link.read(buffer)
    assert frame.kind == Kind.DATA and frame.origin_ns == 123
    np.testing.assert_array_equal(buffer[0], data)
    assert link.read(buffer).kind == Kind.END
    thread.join()
    link.close()
    listener.close()
    assert said == [f"[stage 2] waiting for the upstream stage on 127.0.0.1:{port} (up to 5 s)"]


def test_waiting_for_the_upstream_says_so_and_gives_up_at_the_deadline(monkeypatch):
    monkeypatch.setattr("dnnpipe.runtime.transport.PROGRESS_SECONDS", 0.2)
    listener = listen("[stage 3]", "127.0.0.1", 0)
    said: list[str] = []
    began = time.monotonic()
    with pytest.raises(DnnpipeError, match=r"\[stage 3\] no upstream stage connected to 127.0.0.1:\d+ within "
                                           r"0.7 s \(--connect-timeout\)"):
        accept_upstream("[stage 3]", listener, SPEC, 0.7, 5, said.append)
    assert time.monotonic() - began < 2
    assert said[0].startswith("[stage 3] waiting for the upstream stage")
    assert any("still waiting" in line for line in said[1:])
    listener.close()


def test_connecting_to_a_stage_that_never_comes_names_it():
    port = free_ports(1)[0]
    with pytest.raises(DnnpipeError, match=rf"\[stage 1\] cannot reach the next stage at 127.0.0.1:{port} "
                                           r"within 0.5 s"):
        connect_downstream("[stage 1]", "127.0.0.1", port, SPEC, 0.5, 5)


def test_listening_on_a_taken_port_is_a_clear_error():
    taken = listen("[stage 2]", "127.0.0.1", 0)
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    port = taken.getsockname()[1]
    with pytest.raises(DnnpipeError, match=rf"\[stage 2\] cannot listen on 127.0.0.1:{port}"):
        listen("[stage 2]", "127.0.0.1", port)
    taken.close()
