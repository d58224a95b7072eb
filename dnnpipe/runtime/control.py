"""A stage's control channel to a controller (serve): heartbeats with per-frame stage times out, commands in.

One TCP connection per stage, JSON lines both ways. The stage connects to the controller (like its data
link to the next stage), so a controller that goes away is noticed at once and the stage stops: nothing
outlives the controller. A frozen stage (SIGSTOP) sends no heartbeat, which is how the controller tells a
frozen device from a slow one.

    stage -> controller   {"kind": "hello", "stage": k, "pid": p}
                          {"kind": "beat", "sent": frames done, "times": [stage ms of each new frame]}
                          {"kind": "error", "message": "..."} or {"kind": "done"}, then close
    controller -> stage   {"kind": "pace", "ms": planned stage time of the emulated device}
"""

from __future__ import annotations

import json
import math
import os
import select
import socket
import ssl
import threading
from typing import Any, Callable, Optional, Sequence, TypeVar

import numpy as np

from ..errors import DnnpipeError
from .handshake import LinkAuth, connect_side
from .heap import fault_in
from .metrics import FrameTiming
from .transport import dial

T = TypeVar("T")
HEARTBEAT_SECONDS = 0.2
MAX_LINE = 1 << 16
AWAIT_MS = 1000  # the longest a control link's reader or writer waits for readiness before it looks again
CONTROLLER = 0  # the controller's number in a control link's handshake: stage k -> 0, never a data link
LOADED_SUB_MODELS = 16  # an agent keeps this many sub-models loaded (the running role's, the next plan's, the
# plans for a loss'); the least recently used is dropped first, and named ("unloaded")
MIN_PACE_MS, MAX_PACE_MS = 1e-3, 60_000.0  # a planned stage time: a minute at most (the pacing sleep wakes on stop)


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class ControlSession:
    """A control link's socket, read on one thread and written on others, one call at a time under TLS.

    OpenSSL allows no SSL_read beside an SSL_write on one connection, and Python's ssl module releases the GIL
    around both with no lock of its own (python/cpython#151508 reports a crash). Under TLS every call runs under
    one lock without waiting in it (the socket is non-blocking) and readiness is awaited outside it, so a writer
    never waits for a reader waiting for data, nor a reader for a writer waiting for room. A plain socket is used
    as it is. Made once the link's handshake is over (that runs on one thread)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._lock = threading.Lock()
        if self.tls:
            sock.setblocking(False)

    def recv(self, size: int) -> bytes:
        return self._read(lambda: self.sock.recv(size), b"")

    def recv_into(self, view: memoryview, size: int) -> int:
        return self._read(lambda: self.sock.recv_into(view, size), 0)

    def _read(self, read: Callable[[], T], end: T) -> T:
        if not self.tls:
            return read()
        while True:
            with self._lock:
                try:
                    return read()
                except ssl.SSLWantReadError:
                    wait = select.POLLIN
                except ssl.SSLWantWriteError:  # (TLS may have to write before it reads on)
                    wait = select.POLLOUT
                except (ValueError, AttributeError):  # closed by another thread (a hang-up): the link's end
                    return end
            _await(self.sock, wait)

    def sendall(self, data: bytes | memoryview) -> None:
        if not self.tls:
            self.sock.sendall(data)
            return
        view = memoryview(data).cast("B")
        while len(view):
            with self._lock:
                try:
                    view = view[self.sock.send(view):]
                    continue
                except ssl.SSLWantWriteError:  # (retried with the same bytes, as OpenSSL asks)
                    wait = select.POLLOUT
                except ssl.SSLWantReadError:
                    wait = select.POLLIN
                except (ValueError, AttributeError):  # closed by another thread (a hang-up)
                    raise ConnectionError("the control link was closed") from None
            _await(self.sock, wait)


def _await(sock: socket.socket, events: int) -> None:
    """Until the socket is ready for `events`, or hung up (then the next call says so); a second at most, so a
    socket closed meanwhile (its number perhaps another's by then) is looked at again."""
    fd = sock.fileno()
    if fd < 0:  # closed meanwhile
        return
    poller = select.poll()
    poller.register(fd, events | select.POLLERR | select.POLLHUP)
    poller.poll(AWAIT_MS)


class LineReader:
    """JSON-object lines from a socket (or a ControlSession), each at most MAX_LINE bytes; None at a clean end."""

    def __init__(self, sock: socket.socket | ControlSession, peer: str):
        self.sock, self.peer, self.buffer = sock, peer, b""

    def read(self) -> Optional[dict[str, Any]]:
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_LINE:
                raise DnnpipeError(f"{self.peer}: control line longer than {MAX_LINE} bytes")
            chunk = self.sock.recv(1 << 14)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return parse_line(line, self.peer)

    def read_exact(self, size: int) -> bytes:
        """`size` raw bytes that follow a line (a sub-model pushed after its "model" line). They are received
        straight into a buffer whose pages the kernel's writes fault in, without Python's lock (NumPy's empty
        array is not zeroed; bytearray(size) would zero it holding the lock), and the copy into bytes (what the
        interpreter takes), which holds the lock, goes to pages faulted in ahead (runtime.heap)."""
        data = np.empty(size, np.uint8)
        got = min(size, len(self.buffer))  # what came with the line
        with data.data as view:
            view[:got] = self.buffer[:got]
            self.buffer = self.buffer[got:]
            while got < size:
                count = self.sock.recv_into(view[got:], min(1 << 20, size - got))
                if not count:
                    raise DnnpipeError(f"{self.peer}: closed after {got} of {size} pushed bytes")
                got += count
        fault_in(size)
        return data.tobytes()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def parse_line(line: bytes, peer: str) -> dict[str, Any]:
    """One control line as a JSON object with a 'kind'; anything else (not JSON, NaN or Infinity, nesting
    deeper than the parser's stack, numbers beyond a float) is one DnnpipeError naming the peer."""
    try:
        message = json.loads(line, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise DnnpipeError(f"{peer}: control line is not valid JSON ({type(e).__name__})") from None
    if not isinstance(message, dict) or not isinstance(message.get("kind"), str):
        raise DnnpipeError(f"{peer}: control message without a 'kind'")
    return message


def number(message: dict[str, Any], name: str, low: float, high: float, peer: str,
           optional: bool = False) -> Optional[float]:
    """A finite number low <= x <= high (not a bool), or None where optional."""
    value = message.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise DnnpipeError(f"{peer}: {message.get('kind')!r} needs {name} a finite number in [{low:g}, {high:g}], "
                           f"got {str(value)[:40]!r}")
    return float(value)


def integer(message: dict[str, Any], name: str, low: int, high: int, peer: str) -> int:
    value = message.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise DnnpipeError(f"{peer}: {message.get('kind')!r} needs {name} a whole number in [{low}, {high}], "
                           f"got {str(value)[:40]!r}")
    return value


def text(message: dict[str, Any], name: str, peer: str, limit: int = 1000) -> str:
    value = message.get(name, "")
    if not isinstance(value, str):
        raise DnnpipeError(f"{peer}: {message.get('kind')!r} needs {name} a string")
    return value[:limit].encode("unicode_escape").decode("ascii")  # no terminal escapes into a log


def times(message: dict[str, Any], name: str, peer: str, limit: int = 4096) -> list[float]:
    """A list of stage times in ms, each finite and in [0, 1 hour]."""
    values = message.get(name, [])
    if not isinstance(values, list) or len(values) > limit:
        raise DnnpipeError(f"{peer}: {message.get('kind')!r} needs {name} a list of at most {limit} numbers")
    return [number({"kind": message.get("kind"), name: v}, name, 0.0, 3.6e6, peer) or 0.0 for v in values]


def check_command(message: dict[str, Any], peer: str) -> dict[str, Any]:
    """The commands a stage obeys, checked at the boundary."""
    if message["kind"] == "pace":
        return {"kind": "pace", "ms": number(message, "ms", MIN_PACE_MS, MAX_PACE_MS, peer)}
    raise DnnpipeError(f"{peer}: unknown control command {message['kind']!r}")


class ControlLink:
    def __init__(self, name: str, stage: int, host: str, port: int, connect_timeout: float,
                 timings: Sequence[FrameTiming], on_command: Callable[[dict], None], on_lost: Callable[[str], None],
                 auth: Optional[LinkAuth] = None):
        """Connect and, with a pipeline key, prove it as stage k sending to the controller (auth is k -> 0)."""
        self.name, self.peer = name, f"{name} controller {host}:{port}"
        self.timings, self.on_command, self.on_lost = timings, on_command, on_lost
        self.sock = _connect(self.peer, host, port, connect_timeout)
        if auth is not None:
            try:
                connect_side(self.sock, auth)
            except DnnpipeError as e:
                self.sock.close()
                raise DnnpipeError(f"{self.peer} refused the control channel: {e}") from None
        self.sock.settimeout(None)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._reported = 0
        self._send({"kind": "hello", "stage": stage, "pid": os.getpid()})
        for body in (self._beat, self._listen):
            threading.Thread(target=body, name=f"{name} control {body.__name__}", daemon=True).start()

    def _send(self, message: dict[str, Any]) -> bool:
        with self._lock:
            try:
                self.sock.sendall(encode(message))
                return True
            except OSError:
                return False

    def _beat(self) -> None:
        while not self._closing.wait(HEARTBEAT_SECONDS):
            done = len(self.timings)
            times = [round(t.inference_ms + t.emulation_ms, 4) for t in self.timings[self._reported:done]]
            self._reported = done
            if not self._send({"kind": "beat", "sent": done, "times": times}):
                break

    def _listen(self) -> None:
        reader = LineReader(self.sock, self.peer)
        try:
            while True:
                message = reader.read()
                if message is None:
                    break
                self.on_command(check_command(message, self.peer))
        except (OSError, DnnpipeError) as e:
            if not self._closing.is_set():
                self.on_lost(f"{self.peer}: {e}")
            return
        if not self._closing.is_set():
            self.on_lost(f"{self.peer} closed the control channel (controller gone)")

    def close(self, error: Optional[str]) -> None:
        """Say how the stage ended, then hang up."""
        self._closing.set()
        self._send({"kind": "error", "message": error} if error else {"kind": "done"})
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _connect(peer: str, host: str, port: int, timeout: float) -> socket.socket:
    sock, reason = dial(host, port, timeout)
    if sock is None:
        raise DnnpipeError(f"{peer}: cannot connect within {timeout:g} s ({reason})")
    return sock
