"""A stage's links: listening for the upstream stage, connecting to the next one, and frame I/O on both.

The stage's schedule (dnnpipe.runtime.stage) sees only `Upstream.read` and `Downstream.send`; how a link is
set up (ports, readiness probes, retries, deadlines) stays here, as torch.distributed.pipelining keeps
communication apart from the schedule.
"""

from __future__ import annotations

import socket
import time
from typing import Callable, Sequence

import numpy as np

from ..errors import DnnpipeError
from ..manifest import TensorSpec
from ..protocol import Frame, FrameReader, Kind, send_frame

PROBE_SECONDS = 0.3  # how long a fresh connection may stay silent before it counts as a real upstream
PROGRESS_SECONDS = 5.0  # while waiting for a neighbour, say so this often
Say = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


class Upstream:
    """The connection from the previous stage: frames in, checked against the stage's input specs."""

    def __init__(self, sock: socket.socket, peer: str, specs: Sequence[TensorSpec], timeout: float):
        self.sock, self.peer = sock, peer
        self.reader = FrameReader(sock, specs, peer, timeout)

    def read(self, buffers: Sequence[np.ndarray]) -> Frame:
        return self.reader.read(buffers)

    def shutdown(self) -> None:
        """Unblock a reader waiting on this link; the upstream stage sees the close."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


class Downstream:
    """The connection to the next stage: frames out, described by the stage's output specs."""

    def __init__(self, sock: socket.socket, address: str, specs: Sequence[TensorSpec]):
        self.sock, self.address, self.specs = sock, address, tuple(specs)

    def send(self, sequence: int, origin_ns: int, tensors: Sequence[np.ndarray]) -> None:
        try:
            send_frame(self.sock, Kind.DATA, sequence, origin_ns, self.specs, tensors)
        except OSError as e:
            raise DnnpipeError(f"cannot send to the next stage at {self.address}: "
                               f"{e.strerror or e or 'timed out'}") from None

    def end(self, sent: int) -> None:
        send_frame(self.sock, Kind.END, sent, 0)

    def error(self, sent: int, message: str) -> None:
        """Tell the next stage why this one stopped (best effort: the link may be gone too)."""
        try:
            send_frame(self.sock, Kind.ERROR, sent, 0, message=message)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


def listen(name: str, bind_addr: str, bind_port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((bind_addr, bind_port))
        listener.listen(4)
    except OSError as e:
        listener.close()
        raise DnnpipeError(f"{name} cannot listen on {bind_addr}:{bind_port}: {e.strerror or e}") from None
    return listener


def accept_upstream(name: str, listener: socket.socket, specs: Sequence[TensorSpec], connect_timeout: float,
                    timeout: float, say: Say = _quiet) -> Upstream:
    """The previous stage's connection. One closed without a byte is a readiness probe (the deployer's
    --launch checks ports that way): it is dropped and the stage keeps waiting."""
    bind_addr, bind_port = listener.getsockname()[:2]
    began = time.monotonic()
    deadline = began + connect_timeout
    say(f"{name} waiting for the upstream stage on {bind_addr}:{bind_port} (up to {connect_timeout:g} s)")
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DnnpipeError(f"{name} no upstream stage connected to {bind_addr}:{bind_port} "
                               f"within {connect_timeout:g} s (--connect-timeout)")
        listener.settimeout(min(left, PROGRESS_SECONDS))
        try:
            sock, (host, port) = listener.accept()
        except socket.timeout:
            if deadline - time.monotonic() > 0:
                say(f"{name} still waiting for the upstream stage on {bind_addr}:{bind_port} "
                    f"({time.monotonic() - began:.0f} s)")
            continue
        if not _is_probe(sock):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return Upstream(sock, f"{name} upstream {host}:{port}", specs, timeout)
        sock.close()


def _is_probe(sock: socket.socket) -> bool:
    sock.settimeout(PROBE_SECONDS)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except socket.timeout:
        return False  # connected and quiet: an upstream stage waiting for its own input
    except OSError:
        return True


def connect_downstream(name: str, host: str, port: int, specs: Sequence[TensorSpec], connect_timeout: float,
                       timeout: float, say: Say = _quiet) -> Downstream:
    """Retry until the next stage listens, for at most connect_timeout seconds."""
    began = time.monotonic()
    deadline, delay, reason = began + connect_timeout, 0.1, "no attempt"
    next_word = began + PROGRESS_SECONDS
    say(f"{name} connecting to the next stage at {host}:{port} (up to {connect_timeout:g} s)")
    while time.monotonic() < deadline:
        try:
            sock = socket.create_connection((host, port), timeout=min(5.0, connect_timeout))
        except OSError as e:
            reason = e.strerror or str(e)
            if time.monotonic() >= next_word:
                say(f"{name} still waiting for the next stage at {host}:{port} ({reason}; "
                    f"{time.monotonic() - began:.0f} s)")
                next_word += PROGRESS_SECONDS
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        return Downstream(sock, f"{host}:{port}", specs)
    raise DnnpipeError(f"{name} cannot reach the next stage at {host}:{port} within {connect_timeout:g} s "
                       f"({reason})")
