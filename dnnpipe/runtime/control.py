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
import socket
import threading
from typing import Any, Callable, Optional, Sequence

from ..errors import DnnpipeError
from .handshake import LinkAuth, connect_side
from .metrics import FrameTiming
from .transport import dial

HEARTBEAT_SECONDS = 0.2
MAX_LINE = 1 << 16
CONTROLLER = 0  # the controller's number in a control link's handshake: stage k -> 0, never a data link


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class LineReader:
    """JSON-object lines from a socket, each at most MAX_LINE bytes; None at a clean end."""

    def __init__(self, sock: socket.socket, peer: str):
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
        try:
            message = json.loads(line)
        except ValueError:
            raise DnnpipeError(f"{self.peer}: control line is not JSON") from None
        if not isinstance(message, dict) or not isinstance(message.get("kind"), str):
            raise DnnpipeError(f"{self.peer}: control message without a 'kind'")
        return message


def check_command(message: dict[str, Any], peer: str) -> dict[str, Any]:
    """The commands a stage obeys, checked at the boundary."""
    if message["kind"] == "pace":
        ms = message.get("ms")
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not (ms > 0 and math.isfinite(ms)):
            raise DnnpipeError(f"{peer}: pace needs a finite number of ms > 0, got {ms!r}")
        return {"kind": "pace", "ms": float(ms)}
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
