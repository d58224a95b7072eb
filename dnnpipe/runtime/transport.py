"""A stage's links: listening for the upstream stage, connecting to the next one, and frame I/O on both.

The stage's schedule (dnnpipe.runtime.stage) sees only `Upstream.read` and `Downstream.send`; how a link is
set up (ports, readiness probes, retries, deadlines) stays here, as torch.distributed.pipelining keeps
communication apart from the schedule.
"""

from __future__ import annotations

import collections
import queue
import re
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import DnnpipeError, printable
from ..manifest import TensorSpec
from ..frameio import FrameReader, FrameWriter
from ..protocol import Frame, ProtocolError
from .handshake import HANDSHAKE_SECONDS, HandshakeError, LinkAuth, ProbeClosed, connect_side, listen_side, tls_wrap

PROBE_SECONDS = 0.3  # without a key: how long a fresh connection may stay silent before it counts as an upstream
PROGRESS_SECONDS = 5.0  # while waiting for a neighbour (or dropping strangers), say so this often
SILENT_SECONDS = 1.0  # a keyed or TLS peer speaks at once; one silent this long while vetted is dropped
MAX_PENDING = 16  # connections vetted at once
MAX_PER_SOURCE = 8  # of them from one address, so one host cannot take every slot
MAX_HELD = 64  # connections taken from the backlog (vetted or waiting for a slot); more wait in the backlog
BACKLOG = 128  # the kernel's listen queue (capped by net.core.somaxconn)
TICK_SECONDS = 0.05
MAX_KINDS = 16  # kinds of drop reported in full, each once; the rest only in the counts
Say = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


class _Owned:
    """A stage's end of one link, which a planned switch may hand on to the next generation (after NEXT): from
    then on this stage neither shuts nor closes it, whichever of its threads tries."""

    def __init__(self, sock: socket.socket):
        self.sock: Optional[socket.socket] = sock
        self._owned = threading.Lock()

    def _detach(self) -> socket.socket:
        with self._owned:
            sock, self.sock = self.sock, None
        assert sock is not None
        return sock

    def _shut(self, unless: Callable[[], bool] = lambda: False) -> None:
        with self._owned:
            if not unless():
                shut_link(self.sock)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


class Upstream(_Owned):
    """The connection from the previous stage: frames in, checked against the stage's input specs."""

    def __init__(self, sock: socket.socket, peer: str, specs: Sequence[TensorSpec], timeout: float,
                 idle: bool = False, continues: bool = False, prefix: bytes = b""):
        super().__init__(sock)
        self.reader = FrameReader(sock, specs, peer, timeout, idle, continues, prefix)  # see FrameReader

    def read(self, buffers: Sequence[np.ndarray]) -> Frame:
        return self.reader.read(buffers)

    def shutdown(self) -> None:
        """Unblock a reader waiting on this link; the upstream stage sees the close. Not once NEXT was read: the
        link is the next generation's then, even before detach() hands it on."""
        self._shut(unless=lambda: self.reader.continues is not None)

    def detach(self) -> tuple[socket.socket, bytes]:
        """The link after a NEXT frame, with the bytes read past it: the next generation's from here on."""
        return self._detach(), self.reader.leftover


class Downstream(_Owned):
    """The connection to the next stage: frames out, described by the stage's output specs (encoded once)."""

    def __init__(self, sock: socket.socket, address: str, specs: Sequence[TensorSpec], timeout: float):
        super().__init__(sock)
        self.writer = FrameWriter(sock, specs, f"the next stage at {address}", timeout)

    def send(self, sequence: int, origin_ns: int, tensors: Sequence[np.ndarray]) -> None:
        self.writer.send(sequence, origin_ns, tensors)

    def end(self, sent: int, continues: Optional[int] = None) -> None:
        """END, or NEXT when the link goes on as generation `continues`."""
        if continues is None:
            self.writer.end(sent)
        else:
            self.writer.next(sent, continues)

    def detach(self) -> socket.socket:
        """The link after NEXT went out: the next generation's from here on."""
        return self._detach()

    def shutdown(self) -> None:
        """Cut the link at once (an aborted role sends nothing more)."""
        self._shut()

    def error(self, sent: int, message: str) -> None:
        """Tell the next stage why this one stopped (best effort: the link may be gone too)."""
        try:
            self.writer.error(sent, message)
        except ProtocolError:
            pass


LinkKey = tuple[int, int]  # (plan generation, sending device)


class HeldLinks:
    """Proven links that wait for the role (or the controller's route) of their generation: ones dialled for it,
    and ones that stay (an older generation's link after its NEXT, with the bytes read past NEXT). One that
    stays is taken first; a dialled one for the same generation then closes, as it would never carry a frame.
    The caller holds the lock of the condition it waits on for them."""

    def __init__(self) -> None:
        self._dialled: dict[LinkKey, socket.socket] = {}
        self._kept: dict[LinkKey, tuple[socket.socket, bytes]] = {}
        self._taken: set[LinkKey] = set()  # a link dialled for one of these comes too late: nobody would read it

    def dialled(self, key: LinkKey, sock: socket.socket) -> None:
        old = self._dialled.pop(key, None)
        if old is not None:
            old.close()
        if key in self._taken:
            sock.close()
            return
        self._dialled[key] = sock

    def kept(self, key: LinkKey, sock: socket.socket, prefix: bytes) -> None:
        for held in (self._dialled.pop(key, None), self._kept.pop(key, (None, b""))[0]):
            if held is not None:
                held.close()
        self._kept[key] = (sock, prefix)

    def __contains__(self, key: LinkKey) -> bool:
        return key in self._kept or key in self._dialled

    def pop(self, key: LinkKey) -> tuple[socket.socket, bytes]:
        """The link for `key` (in it) and the bytes to read before its own."""
        self._taken.add(key)
        if key in self._kept:
            dialled = self._dialled.pop(key, None)
            if dialled is not None:
                dialled.close()
            return self._kept.pop(key)
        return self._dialled.pop(key), b""

    def drop(self, stale: Callable[[int], bool]) -> None:
        """Close the links of every generation `stale` says no role will take."""
        for key in [k for k in self._dialled if stale(k[0])]:
            self._dialled.pop(key).close()
        for key in [k for k in self._kept if stale(k[0])]:
            self._kept.pop(key)[0].close()
        self._taken = {k for k in self._taken if not stale(k[0])}

    def close(self) -> None:
        self.drop(lambda generation: True)


def shut_link(sock: Optional[socket.socket]) -> None:
    """Both directions of a link shut, waking whoever waits on it (None: handed on, the next generation's)."""
    if sock is None:
        return
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # SSLSocket's own would drop TLS under a reader
    except OSError:
        pass


def listen(name: str, bind_addr: str, bind_port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((bind_addr, bind_port))
        listener.listen(BACKLOG)
    except OSError as e:
        listener.close()
        raise DnnpipeError(f"{name} cannot listen on {bind_addr}:{bind_port}: {e.strerror or e}") from None
    return listener


def accept_upstream(name: str, listener: socket.socket, specs: Sequence[TensorSpec], connect_timeout: float,
                    timeout: float, say: Say = _quiet, auth: Optional[LinkAuth] = None,
                    tls: Optional[ssl.SSLContext] = None) -> Upstream:
    """The previous stage's connection, once it has proven itself (with a key) or said anything (without)."""
    sock, peer = accept_link(name, listener, connect_timeout, say, auth, tls)
    return Upstream(sock, f"{name} upstream {peer}", specs, timeout)


def accept_link(name: str, listener: socket.socket, connect_timeout: float, say: Say = _quiet,
                auth: Optional[LinkAuth] = None, tls: Optional[ssl.SSLContext] = None,
                stop: Optional[threading.Event] = None, what: str = "the upstream stage") -> tuple[socket.socket, str]:
    """The first connection on `listener` that passes TLS (with `tls`) and the key handshake (with `auth`):
    the link (TCP_NODELAY; the TLS socket with `tls`) and its peer's address; DnnpipeError at the deadline
    or when `stop` is set. Serve's controller accepts its links with this too (docs/security.md).

    Connections are vetted in parallel (_Gate), so peers that connect and stall cannot hold the port: the
    real peer is taken as soon as it passes, and one that fails is dropped (counted) while this end keeps
    listening. The deployer's --launch probe (a keyed HELLO from handshake.PROBE, answered, never a link) and a
    connection closed without a byte (a plain port check) are closed quietly. Without a key or TLS, any peer
    that speaks (or stays connected) passes.
    """
    bind_addr, bind_port = listener.getsockname()[:2]
    began = time.monotonic()
    deadline, next_word = began + connect_timeout, began + PROGRESS_SECONDS
    say(f"{name} waiting for {what} on {bind_addr}:{bind_port}{' over TLS' if tls else ''} "
        f"(up to {connect_timeout:g} s)")
    gate = _Gate(name, auth, say, tls)
    try:
        while True:
            chosen = gate.chosen()
            if chosen is not None:
                return chosen
            now = time.monotonic()
            if stop is not None and stop.is_set():
                raise DnnpipeError(f"{name} stopped while waiting for {what} on {bind_addr}:{bind_port}")
            if now >= deadline:
                raise DnnpipeError(f"{name} no {what.removeprefix('the ')} connected to {bind_addr}:{bind_port} "
                                   f"within {connect_timeout:g} s (--connect-timeout)")
            if now >= next_word:
                say(f"{name} still waiting for {what} on {bind_addr}:{bind_port} ({now - began:.0f} s)")
                next_word += PROGRESS_SECONDS
            gate.tick()
            if not gate.room():  # a slot before accept: beyond MAX_HELD, connections wait in the listen backlog
                time.sleep(min(TICK_SECONDS, max(0.0, deadline - now)))
                continue
            listener.settimeout(max(0.001, min(TICK_SECONDS, deadline - now)))
            try:
                sock, address = listener.accept()
            except socket.timeout:
                continue
            gate.take(sock, address[0], f"{address[0]}:{address[1]}")
    finally:
        gate.close()


@dataclass
class _Held:
    """An accepted connection waiting for a vetting slot."""

    sock: socket.socket
    source: str  # the peer's address: the unit of the per-source limits
    peer: str  # address:port, for messages
    since: float


class _Gate:
    """Vets incoming connections; the first that passes becomes the upstream.

    A stranger cannot keep the keyed upstream out: at most MAX_HELD connections are taken from the backlog
    (the rest wait there, in order), at most MAX_PENDING are vetted at once and at most MAX_PER_SOURCE of them
    from one address, so one host cannot take every slot. Among the waiting, one that has already spoken (a
    real stage sends its hello at once) is vetted first; a silent one is dropped after SILENT_SECONDS, and one
    that waited longer than the connector's own handshake deadline is closed (its stage has retried by then).
    Drops are counted and reported once every PROGRESS_SECONDS, so a flood writes a few lines, not one each.
    """

    def __init__(self, name: str, auth: Optional[LinkAuth], say: Say, tls: Optional[ssl.SSLContext] = None):
        self.name, self.auth, self.say, self.tls = name, auth, say, tls
        self.passed: queue.Queue[tuple[socket.socket, str]] = queue.Queue()
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.waiting: dict[str, collections.deque[_Held]] = {}
        self.vetting: collections.Counter[str] = collections.Counter()
        self.turn = 0  # round robin over sources
        self.drops = DropCounter(name, say)

    def room(self) -> bool:
        with self.lock:
            return sum(len(line) for line in self.waiting.values()) + sum(self.vetting.values()) < MAX_HELD

    def take(self, sock: socket.socket, source: str, peer: str) -> None:
        with self.lock:
            self.waiting.setdefault(source, collections.deque()).append(_Held(sock, source, peer, time.monotonic()))
        self.tick()

    def tick(self) -> None:
        """Close what waited too long, then start vetting while slots are free."""
        now = time.monotonic()
        with self.lock:
            for line in self.waiting.values():
                while line and now - line[0].since > HANDSHAKE_SECONDS:
                    stale = line.popleft()
                    stale.sock.close()
                    self.drops.add(stale.peer, "waited longer than the handshake deadline for a vetting slot")
            while sum(self.vetting.values()) < MAX_PENDING:
                held = self._next()
                if held is None:
                    break
                self.vetting[held.source] += 1
                threading.Thread(target=self._vet, args=(held,), daemon=True,
                                 name=f"{self.name} vet {held.peer}").start()
            self.waiting = {source: line for source, line in self.waiting.items() if line}
        self.drops.report()

    def _next(self) -> Optional[_Held]:
        """Round robin over sources below their limit; within one, the first that has spoken, else the oldest."""
        sources = [s for s, line in self.waiting.items() if line and self.vetting[s] < MAX_PER_SOURCE]
        if not sources:
            return None
        self.turn = (self.turn + 1) % len(sources)
        line = self.waiting[sources[self.turn]]
        for held in line:
            if _has_spoken(held.sock):
                line.remove(held)
                return held
        return line.popleft()

    def _vet(self, held: _Held) -> None:
        sock, peer = held.sock, held.peer
        try:
            ends = time.monotonic() + HANDSHAKE_SECONDS  # TLS and the key handshake together
            if self.auth is not None or self.tls is not None:
                _first_byte(sock, min(ends, time.monotonic() + SILENT_SECONDS))
                sock = secure(sock, self.auth, self.tls, True, max(0.01, ends - time.monotonic()))
            elif _is_probe(sock):
                raise ProbeClosed("readiness probe")
        except ProbeClosed:
            sock.close()
            return
        except HandshakeError as e:
            self.drops.add(peer, str(e))
            sock.close()
            return
        finally:
            with self.lock:
                self.vetting[held.source] -= 1
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
        """No second upstream: whatever passes after the first is closed, and so is whatever still waits."""
        self.done.set()
        with self.lock:
            for line in self.waiting.values():
                for held in line:
                    held.sock.close()
            self.waiting = {}
        while True:
            try:
                self.passed.get_nowait()[0].close()
            except queue.Empty:
                break
        self.drops.report(final=True)


class DropCounter:
    """Dropped connections as counts: the first of each reason in full, then one summary line per period."""

    def __init__(self, name: str, say: Say, period: Optional[float] = None):
        self.name, self.say = name, say
        self.period = PROGRESS_SECONDS if period is None else period
        self.lock = threading.Lock()
        self.seen: set[str] = set()
        self.count = 0  # since the last summary
        self.sources: set[str] = set()
        self.reasons: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}  # kind -> the first reason of that kind, as said
        self.total = 0
        self.last = time.monotonic()

    def add(self, peer: str, reason: str) -> None:
        said = reason.split(" (", 1)[0]
        kind = re.sub(r"\d+", "N", said)  # a peer's numbers do not make a new kind
        with self.lock:
            self.examples.setdefault(kind, said)
            self.total += 1
            if kind not in self.seen and len(self.seen) < MAX_KINDS:
                self.seen.add(kind)
                self.say(f"{self.name} dropped {printable(peer)}: {printable(reason)}")
                return
            self.count += 1
            self.sources.add(peer.rpartition(":")[0])
            self.reasons[kind] += 1

    def report(self, final: bool = False) -> None:
        with self.lock:
            if not self.count or not (final or time.monotonic() - self.last >= self.period):
                return
            top = "; ".join(f"{n} {printable(self.examples[kind])}" for kind, n in self.reasons.most_common(3))
            self.say(f"{self.name} dropped {self.count} more connection{'s' if self.count > 1 else ''} from "
                     f"{len(self.sources)} address{'es' if len(self.sources) > 1 else ''} in the last "
                     f"{time.monotonic() - self.last:.0f} s ({top}; {self.total} in all)")
            self.count, self.last = 0, time.monotonic()
            self.sources.clear()
            self.reasons.clear()


def _has_spoken(sock: socket.socket) -> bool:
    """Bytes (or a close) are waiting on sock, without taking them."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _first_byte(sock: socket.socket, deadline: float) -> None:
    """A keyed or TLS peer speaks first, at once: wait for its first byte (not taking it) until deadline."""
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        first = sock.recv(1, socket.MSG_PEEK)
    except socket.timeout:
        raise HandshakeError(f"silent for {SILENT_SECONDS:g} s after connecting (not a stage)") from None
    except OSError as e:
        raise ProbeClosed(f"connection lost before the handshake ({e.strerror or e})") from None
    if not first:
        raise ProbeClosed("closed before the handshake")


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
    """Dial and prove the link, retrying both until connect_timeout: a stranger's connections ahead of this
    one at the next stage (or a next stage not up yet) only delay the link."""
    say(f"{name} connecting to the next stage at {host}:{port}{' over TLS' if tls else ''} "
        f"(up to {connect_timeout:g} s)")
    sock, failures = secure_dial(host, port, connect_timeout, auth, tls, progress(say, f"{name} still waiting for the "
                                                                                   f"next stage at {host}:{port}"))
    if sock is None:
        reason, refused = failures
        if refused:
            raise DnnpipeError(f"{name} the next stage at {host}:{port} refused the link: {reason} (retried for "
                               f"{connect_timeout:g} s, --connect-timeout)")
        raise DnnpipeError(f"{name} cannot reach the next stage at {host}:{port} within {connect_timeout:g} s "
                           f"({reason})")
    return Downstream(sock, f"{host}:{port}", specs, timeout)


def progress(say: Say, what: str) -> Callable[[str, float], None]:
    """A `waiting` callback that says `what` (and the last reason) once every PROGRESS_SECONDS."""
    next_word = [PROGRESS_SECONDS]

    def waiting(reason: str, waited: float) -> None:
        if waited >= next_word[0]:
            say(f"{what} ({printable(reason)}; {waited:.0f} s)")
            next_word[0] += PROGRESS_SECONDS
    return waiting


def secure_dial(host: str, port: int, connect_timeout: float, auth: Optional[LinkAuth] = None,
                tls: Optional[ssl.SSLContext] = None,
                waiting: Callable[[str, float], None] = lambda reason, waited: None,
                stop: Optional[threading.Event] = None) -> tuple[Optional[socket.socket], tuple[str, bool]]:
    """Connect and pass TLS (with `tls`) and the key handshake (with `auth`), retrying both until connect_timeout.

    The link (TCP_NODELAY) or None with (why, whether a peer answered and refused): the first refusal, and the
    last one when it differs (a wrong key is said first; a listener that gave up says "closed" last).
    Serve's controller and agents dial their links with this too (docs/security.md)."""
    began = time.monotonic()
    deadline, delay = began + connect_timeout, 0.05
    refusals: list[str] = []

    def why(otherwise: str) -> tuple[str, bool]:
        if not refusals:
            return otherwise, False
        return (refusals[0] if refusals[-1] == refusals[0] else f"{refusals[0]}; last: {refusals[-1]}"), True

    while True:
        left = deadline - time.monotonic()
        if left <= 0 or (stop is not None and stop.is_set()):
            return None, why("no attempt")
        sock, reason = dial(host, port, left, lambda r, w: waiting(r, time.monotonic() - began), stop)
        if sock is None:
            return None, why(reason)
        try:
            return secure(sock, auth, tls, server_side=False), why("")
        except HandshakeError as e:
            sock.close()
            refusals.append(str(e))
            waiting(str(e), time.monotonic() - began)
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.5)


def secure(sock: socket.socket, auth: Optional[LinkAuth], tls: Optional[ssl.SSLContext],
           server_side: bool, seconds: float = HANDSHAKE_SECONDS) -> socket.socket:
    """One end of a fresh link made sound: TLS first (with `tls`), then the key handshake inside it (with
    `auth`), both within one deadline. Returns the socket to use from now on (the TLS one with `tls`);
    raises HandshakeError (ProbeClosed for a listener's peer that closed without a byte)."""
    ends = time.monotonic() + seconds
    if tls is not None:
        sock = tls_wrap(sock, tls, server_side, seconds)
    if auth is not None:
        (listen_side if server_side else connect_side)(sock, auth, max(0.01, ends - time.monotonic()))
    return sock
