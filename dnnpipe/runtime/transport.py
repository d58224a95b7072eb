"""A stage's links: listening for the upstream stage, connecting to the next one, and frame I/O on both.

The stage's schedule (dnnpipe.runtime.stage) sees only `Upstream.read` and `Downstream.send`; how a link is
set up (ports, readiness probes, retries, deadlines) stays here, as torch.distributed.pipelining keeps
communication apart from the schedule.
"""

from __future__ import annotations

import queue
import socket
import ssl
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import DnnpipeError
from ..manifest import TensorSpec
from ..frameio import FrameReader, FrameWriter
from ..protocol import Frame, ProtocolError
from .handshake import HANDSHAKE_SECONDS, HandshakeError, LinkAuth, ProbeClosed, connect_side, listen_side, tls_wrap

PROBE_SECONDS = 0.3  # how long a fresh connection may stay silent before it counts as a real upstream
PROGRESS_SECONDS = 5.0  # while waiting for a neighbour, say so this often
MAX_PENDING = 16  # connections vetted at once; more wait in the listen backlog
Say = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


class Upstream:
    """The connection from the previous stage: frames in, checked against the stage's input specs."""

    def __init__(self, sock: socket.socket, peer: str, specs: Sequence[TensorSpec], timeout: float):
        self.sock = sock
        self.reader = FrameReader(sock, specs, peer, timeout)

    def read(self, buffers: Sequence[np.ndarray]) -> Frame:
        return self.reader.read(buffers)

    def shutdown(self) -> None:
        """Unblock a reader waiting on this link; the upstream stage sees the close."""
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # SSLSocket's own would drop TLS under the reader
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


class Downstream:
    """The connection to the next stage: frames out, described by the stage's output specs (encoded once)."""

    def __init__(self, sock: socket.socket, address: str, specs: Sequence[TensorSpec], timeout: float):
        self.sock = sock
        self.writer = FrameWriter(sock, specs, f"the next stage at {address}", timeout)

    def send(self, sequence: int, origin_ns: int, tensors: Sequence[np.ndarray]) -> None:
        self.writer.send(sequence, origin_ns, tensors)

    def end(self, sent: int) -> None:
        self.writer.end(sent)

    def error(self, sent: int, message: str) -> None:
        """Tell the next stage why this one stopped (best effort: the link may be gone too)."""
        try:
            self.writer.error(sent, message)
        except ProtocolError:
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
                    timeout: float, say: Say = _quiet, auth: Optional[LinkAuth] = None,
                    tls: Optional[ssl.SSLContext] = None) -> Upstream:
    """The previous stage's connection, once it has proven itself (with a key) or said anything (without).

    Every connection is vetted on its own thread, so a peer that connects and stalls cannot hold the
    port: the real upstream is taken as soon as it passes, and a peer that fails is dropped with a line
    while the stage keeps listening. One closed without a byte is a readiness probe (the deployer's
    --launch checks ports that way) and is dropped quietly. With `tls`, the TLS handshake comes first, within
    the same deadline as the key handshake that follows it inside TLS.
    """
    bind_addr, bind_port = listener.getsockname()[:2]
    began = time.monotonic()
    deadline, next_word = began + connect_timeout, began + PROGRESS_SECONDS
    say(f"{name} waiting for the upstream stage on {bind_addr}:{bind_port}{' over TLS' if tls else ''} "
        f"(up to {connect_timeout:g} s)")
    gate = _Gate(name, auth, say, tls)
    try:
        while True:
            chosen = gate.chosen()
            if chosen is not None:
                sock, peer = chosen
                return Upstream(sock, f"{name} upstream {peer}", specs, timeout)
            now = time.monotonic()
            if now >= deadline:
                raise DnnpipeError(f"{name} no upstream stage connected to {bind_addr}:{bind_port} "
                                   f"within {connect_timeout:g} s (--connect-timeout)")
            if now >= next_word:
                say(f"{name} still waiting for the upstream stage on {bind_addr}:{bind_port} ({now - began:.0f} s)")
                next_word += PROGRESS_SECONDS
            listener.settimeout(min(0.05, deadline - now))
            try:
                sock, address = listener.accept()
            except socket.timeout:
                continue
            gate.vet(sock, f"{address[0]}:{address[1]}")
    finally:
        gate.close()


class _Gate:
    """Vets incoming connections in parallel; the first that passes becomes the upstream."""

    def __init__(self, name: str, auth: Optional[LinkAuth], say: Say, tls: Optional[ssl.SSLContext] = None):
        self.name, self.auth, self.say, self.tls = name, auth, say, tls
        self.passed: queue.Queue[tuple[socket.socket, str]] = queue.Queue()
        self.slots = threading.BoundedSemaphore(MAX_PENDING)
        self.done = threading.Event()

    def vet(self, sock: socket.socket, peer: str) -> None:
        if not self.slots.acquire(blocking=False):
            self.say(f"{self.name} dropped {peer}: too many connections waiting to be vetted")
            sock.close()
            return
        threading.Thread(target=self._vet, args=(sock, peer), daemon=True, name=f"{self.name} vet {peer}").start()

    def _vet(self, sock: socket.socket, peer: str) -> None:
        try:
            ends = time.monotonic() + HANDSHAKE_SECONDS  # TLS and the key handshake together
            if self.tls is not None:
                sock = tls_wrap(sock, self.tls, True)
            if self.auth is not None:
                listen_side(sock, self.auth, max(0.01, ends - time.monotonic()))
            elif self.tls is None and _is_probe(sock):
                raise ProbeClosed("readiness probe")
        except ProbeClosed:
            sock.close()
            return
        except HandshakeError as e:
            self.say(f"{self.name} dropped {peer}: {e}")
            sock.close()
            return
        finally:
            self.slots.release()
        if self.done.is_set():
            sock.close()
        else:
            self.passed.put((sock, peer))

    def chosen(self) -> Optional[tuple[socket.socket, str]]:
        try:
            sock, peer = self.passed.get_nowait()
        except queue.Empty:
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.done.set()
        return sock, peer

    def close(self) -> None:
        """No second upstream: whatever passes after the first is closed."""
        self.done.set()
        while True:
            try:
                self.passed.get_nowait()[0].close()
            except queue.Empty:
                return


def _is_probe(sock: socket.socket) -> bool:
    sock.settimeout(PROBE_SECONDS)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except socket.timeout:
        return False  # connected and quiet: an upstream stage waiting for its own input
    except OSError:
        return True


def dial(host: str, port: int, connect_timeout: float,
         waiting: Callable[[str, float], None] = lambda reason, waited: None,
         stop: Optional[threading.Event] = None) -> tuple[Optional[socket.socket], str]:
    """Connect, retrying with backoff for at most connect_timeout seconds (or until `stop` is set): the socket
    (TCP_NODELAY), or None and the last reason. `waiting(reason, seconds waited)` hears of every failed attempt."""
    began = time.monotonic()
    deadline, delay, reason = began + connect_timeout, 0.05, "no attempt"
    while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        try:
            sock = socket.create_connection((host, port), timeout=min(5.0, connect_timeout))
        except OSError as e:
            reason = e.strerror or str(e)
            waiting(reason, time.monotonic() - began)
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)  # a neighbour that comes up is found within half a second
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, reason
    return None, reason


def connect_downstream(name: str, host: str, port: int, specs: Sequence[TensorSpec], connect_timeout: float,
                       timeout: float, say: Say = _quiet, auth: Optional[LinkAuth] = None,
                       tls: Optional[ssl.SSLContext] = None) -> Downstream:
    """Retry until the next stage listens, for at most connect_timeout seconds."""
    say(f"{name} connecting to the next stage at {host}:{port}{' over TLS' if tls else ''} "
        f"(up to {connect_timeout:g} s)")
    next_word = [PROGRESS_SECONDS]

    def waiting(reason: str, waited: float) -> None:
        if waited >= next_word[0]:
            say(f"{name} still waiting for the next stage at {host}:{port} ({reason}; {waited:.0f} s)")
            next_word[0] += PROGRESS_SECONDS

    sock, reason = dial(host, port, connect_timeout, waiting)
    if sock is None:
        raise DnnpipeError(f"{name} cannot reach the next stage at {host}:{port} within {connect_timeout:g} s "
                           f"({reason})")
    try:
        ends = time.monotonic() + HANDSHAKE_SECONDS  # TLS and the key handshake together
        if tls is not None:
            sock = tls_wrap(sock, tls, False)
        if auth is not None:
            connect_side(sock, auth, max(0.01, ends - time.monotonic()))
    except HandshakeError as e:
        sock.close()
        raise DnnpipeError(f"{name} the next stage at {host}:{port} refused the link: {e}") from None
    return Downstream(sock, f"{host}:{port}", specs, timeout)
