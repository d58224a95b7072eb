"""The controller's side of the device agents: one agent process per device, started once, one control link each.

Every control link passes the pipeline key handshake (agent d -> controller 0) before a line is read, and every
line is checked at the boundary: a peer that sends anything malformed loses its link (one line says why), never a
thread of the controller. What the agents say becomes events on one queue, read by the controller's loop:

    ("up", d)                      the agent said hello
    ("lost", d, why)               its control link closed or broke (process killed, device gone)
    ("prepared", d, (first, last)) a pushed sub-model is loaded
    ("unloaded", d, (first, last)) the agent dropped a loaded sub-model to make room for another
    ("ended", d, generation, g)    its role's stream ended cleanly (the barrier passed); g: the generation its
                                   downstream link went on as (None: END, the link closed)
    ("kept", 0, generation)        the controller's input link went on as this generation's
    ("error", d, generation, why)  its role failed (generation -1: a push could not be loaded)

A frozen device (SIGSTOP, cut off) sends no heartbeat: `silent()` names the agents silent too long. No ssh call
runs on the controller's loop: a remote agent is started (and a device admitted later shipped) in the background,
every ssh call bounded by the connect timeout; a start that fails reads as an exited agent. Stopping never waits on
ssh: a remote device is cleaned up in the background with a bounded timeout.
"""

from __future__ import annotations

import io
import ipaddress
import os
import queue
import signal
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from ..deploy.registry import Device
from ..deploy.transport import SshOptions, SshTransport, TransportError
from ..errors import DnnpipeError
from ..runtime.agent import check_units
from ..runtime.argv import agent_argv
from ..runtime.control import CONTROLLER, ControlSession, LineReader, encode, integer, text, times
from ..runtime.handshake import HandshakeError, LinkAuth, ProbeClosed, listen_side_for, tls_wrap
from .accept import accept_each, hang_up
from .detect import listening_since, silence

Payload = Union[bytes, Path]  # what follows a control line: bytes, or a file's (a sub-model cut in the background)
PUSH_PIECE = 1 << 20  # a push is written a piece at a time, each piece taken in a sign of life
STOP_SECONDS = 3.0  # how long an agent gets to stop before SIGKILL
CLEANUP_SECONDS = 10.0  # the background ssh clean-up of an unreachable device gives up after this
TICK_SECONDS = 0.05  # the controller's own clock: a late tick is a pause of its process (detect.listening_since)
START_FAILED = 255  # the exit status of an agent whose ssh start failed (ssh's own for a failed connection)
LOG = "logs/agent.out"
PID = "logs/agent.pid"
Echo = Callable[[str], None]


@dataclass
class AgentLink:
    device: Device
    started: float  # monotonic
    process: Optional[subprocess.Popen] = None
    remote: Optional[SshTransport] = None
    sock: Optional[socket.socket] = None
    pid: Optional[int] = None
    last_beat: float = 0.0
    generation: int = -1
    sent: int = 0
    loading: int = 0  # sub-models pushed to it and not yet loaded (or refused): it may be too busy to beat
    writing: bool = False  # its sender is in a write: an agent that does not take its bytes in is not busy loading
    taken: float = 0.0  # when it last took in a piece of a push (monotonic): while written to, that is a sign of life
    gone: bool = False
    stopped: bool = False  # its process was told to stop (once)
    start_failed: bool = False  # its ssh start failed: it will never say hello
    times: list[float] = field(default_factory=list)  # stage ms of frames not yet used for the speed estimate
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards what the heartbeats report (times, ...)
    # Writes on the control link, in order, by the link's own sender thread: a push or a role line to a frozen or
    # cut-off agent (its buffers full) blocks that thread alone, never the controller's loop, which is the loop
    # that finds the agent silent and hangs its link up (ending the blocked write). Seen before: the loop's role
    # line to a cut board waited 30 s behind a background push.
    outbox: queue.Queue[Optional[tuple[dict[str, Any], Payload]]] = field(default_factory=queue.Queue)
    sender: Optional[threading.Thread] = None


class Fleet:
    def __init__(self, host: str, key: Optional[bytes], model: bytes, session: bytes, models_dir: str,
                 model_name: str, connect_timeout: float, ssh: SshOptions, echo: Echo,
                 tls: Optional[ssl.SSLContext] = None):
        self.tls = tls  # the control links inside TLS (the agents get --tls)
        self.session = session  # binds every data link to this run (dnnpipe.runtime.agent.link_identity)
        self.key, self.model, self.models_dir, self.model_name = key, model, models_dir, model_name
        self.connect_timeout, self.echo = connect_timeout, echo
        self.ssh = replace(ssh, connect_timeout=min(ssh.connect_timeout, connect_timeout),
                           command_timeout=min(ssh.command_timeout, connect_timeout))  # no ssh call outlasts it
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.agents: dict[int, AgentLink] = {}
        self._lost: list[tuple[float, AgentLink]] = []  # (when, link) of lost agents not stopped yet
        self._lock = threading.Lock()
        self.closed = threading.Event()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(64)
        self.host, self.port = host, self.listener.getsockname()[1]
        accept_each(self.listener, self.closed, self._link, "serve control accept")
        self.listening = self._ticked = time.monotonic()  # since when its heartbeat readers could run (detect)
        threading.Thread(target=self._tick, daemon=True, name="serve listening").start()

    def _tick(self) -> None:
        while not self.closed.wait(TICK_SECONDS):
            now = time.monotonic()
            self.listening, self._ticked = listening_since(self.listening, self._ticked, now), now

    # --- processes ---------------------------------------------------------------------------

    def start(self, device: Device) -> None:
        """Start (or restart) the device's agent in its remote_dir: a local child in its own session, or over
        ssh by the deployer's transport (the same command either way)."""
        argv = agent_argv(device.interpreter, device.device_id, self.models_dir, self.model_name,
                          "127.0.0.1" if device.is_local else "0.0.0.0", device.runtime_port, self.host, self.port,
                          self.connect_timeout, self.key is None, self.tls is not None)
        link = AgentLink(device, time.monotonic())
        with self._lock:
            old = self.agents.get(device.device_id)
            self.agents[device.device_id] = link
        if old is not None:
            self._retire(old)
        if device.is_local:
            root = Path(os.path.expanduser(device.remote_dir))
            (root / "logs").mkdir(parents=True, exist_ok=True)
            with open(root / LOG, "w") as log:
                link.process = subprocess.Popen([os.path.expanduser(argv[0]), *argv[1:]], cwd=root, stdout=log,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True)
            link.pid = link.process.pid
        else:
            link.remote = SshTransport(device, self.ssh)
            threading.Thread(target=self._start_remote, args=(link, argv), daemon=True,
                             name=f"serve ssh start {device.device_id}").start()

    def _start_remote(self, link: AgentLink, argv: list[str]) -> None:
        """Off the controller's loop: a cut-off device takes the ssh connect timeout to fail."""
        assert link.remote is not None
        try:
            link.remote.start(argv, LOG, PID)
        except TransportError as e:
            if not link.gone:
                self.echo(f"serve: device {link.device.device_id}: cannot start its agent over ssh: {e}")
            link.start_failed = True

    def admit(self, devices: list[Device], ship: Callable[[list[Device]], None]) -> None:
        """Devices that join (or are probed again): shipped, then their agents started, in the background; each
        says hello when up."""
        def run() -> None:
            try:
                ship(devices)
            except DnnpipeError as e:
                self.echo(f"serve: shipping to devices {[d.device_id for d in devices]} failed: {e}")
            if not self.closed.is_set():
                for device in devices:
                    self.start(device)

        threading.Thread(target=run, daemon=True, name="serve admit").start()

    def exited(self, device: int) -> Optional[int]:
        """The agent's exit status once it ended (a local one), START_FAILED when its ssh start failed."""
        link = self.agents.get(device)
        if link is not None and link.start_failed:
            return START_FAILED
        return None if link is None or link.process is None else link.process.poll()

    # --- control links -----------------------------------------------------------------------

    def _auth_for(self, sender: int, receiver: int) -> LinkAuth:
        assert self.key is not None
        if receiver != CONTROLLER or sender not in self.agents:
            raise HandshakeError(f"the peer says it is device {sender} sending to {receiver}; no such agent here")
        return LinkAuth(self.key, self.model, sender, CONTROLLER)

    def _link(self, sock: socket.socket, peer: str) -> None:
        """One agent's control link, from the handshake to its end."""
        try:
            if self.tls is not None:
                sock = tls_wrap(sock, self.tls, True)
            reader = LineReader(sock, f"agent control link {peer}")
            if self.key is not None:
                device = listen_side_for(sock, self._auth_for).sender
            sock.settimeout(5.0)
            hello = reader.read()
            sock.settimeout(None)
            if hello is None or hello["kind"] != "hello":
                raise DnnpipeError(f"{peer}: the agent did not say hello")
            said = integer(hello, "device", 1, 4096, peer)
            if self.key is None:
                device = said
            elif said != device:
                raise DnnpipeError(f"{peer}: proved device {device} but says it is device {said}")
        except ProbeClosed:
            sock.close()
            return
        except (DnnpipeError, OSError) as e:
            self.echo(f"serve: dropped control link {peer}: {e}")
            sock.close()
            return
        with self._lock:
            link = self.agents.get(device)
            if link is None or link.sock is not None or link.gone:
                sock.close()
                return
            link.sock, link.last_beat = sock, time.monotonic()
            if isinstance(hello.get("pid"), int):
                link.pid = hello["pid"]
            session = reader.sock = ControlSession(sock)  # from here read and written by two threads
            link.sender = threading.Thread(target=send_each, args=(link, session, self.closed), daemon=True,
                                           name=f"serve control send {device}")
            link.sender.start()
        self.send(device, {"kind": "session", "id": self.session.hex()})
        self.events.put(("up", device))
        why = "its control link closed (agent killed, or its device gone)"
        try:
            while True:
                message = reader.read()
                if message is None:
                    break
                self._heard(link, message, reader.peer)
        except (DnnpipeError, OSError) as e:
            why = f"its control link broke: {e}"
        if not link.gone and not self.closed.is_set():
            link.gone = True
            self.events.put(("lost", device, why))

    def _heard(self, link: AgentLink, message: dict[str, Any], peer: str) -> None:
        d = link.device.device_id
        kind = message["kind"]
        if kind == "beat":
            frames = times(message, "times", peer)
            generation = integer(message, "generation", -1, 1 << 16, peer)
            with link.lock:
                link.last_beat, link.generation = time.monotonic(), generation
                link.sent = integer(message, "sent", 0, 1 << 62, peer)
                link.times += frames
                del link.times[:-256]
        elif kind == "prepared":
            units = check_units(message, 1 << 20, peer)
            self._loaded(link)
            self.events.put(("prepared", d, units))
        elif kind == "unloaded":
            self.events.put(("unloaded", d, check_units(message, 1 << 20, peer)))
        elif kind == "ended":
            continues = None if message.get("continues") is None else \
                integer(message, "continues", 0, 1 << 16, peer)
            self.events.put(("ended", d, integer(message, "generation", 0, 1 << 16, peer), continues))
        elif kind == "error":
            generation = integer(message, "generation", -1, 1 << 16, peer)
            if generation == -1:  # a pushed sub-model it could not load
                self._loaded(link)
            self.events.put(("error", d, generation, text(message, "message", peer)))
        else:
            raise DnnpipeError(f"{peer}: unknown message {kind[:40]!r}")

    def send(self, device: int, message: dict[str, Any], payload: Payload = b"") -> bool:
        """Queue a control line (and the bytes that follow it, or a file's) for the device's agent, without
        waiting; False when the device has no live link."""
        link = self.agents.get(device)
        if link is None or link.sock is None or link.gone:
            return False
        if message.get("kind") == "model":
            with link.lock:
                link.loading += 1
        link.outbox.put((message, payload))
        return True

    def settled(self, device: int) -> bool:
        """Everything pushed to the device is loaded (or refused), or the device is gone."""
        link = self.agents.get(device)
        return link is None or link.gone or link.sock is None or link.loading == 0

    @staticmethod
    def _loaded(link: AgentLink) -> None:
        with link.lock:
            link.loading = max(0, link.loading - 1)

    def silent(self, now: float, limit: float, loading_limit: float = 0.0) -> list[tuple[int, float]]:
        """Agents up not heard for more than `limit` seconds while the controller listened: frozen or cut off.
        One loading a pushed sub-model gets `loading_limit` if that is longer (a board of a sliver of a core did
        not beat for 2.3 s while it took an EfficientNetV2B0 sub-model in); one being written a push has the
        progress limit, counted from the last piece it took in."""
        since = listening_since(self.listening, self._ticked, now)  # a pause its clock has not ticked past yet
        found = []
        for d, link in list(self.agents.items()):
            if link.sock is None or link.gone:
                continue
            if link.writing:  # a piece taken in is a sign of life only while it is being written pieces
                quiet, allowed = silence(max(link.last_beat, link.taken), now, since), limit
            else:
                quiet = silence(link.last_beat, now, since)
                allowed = max(limit, loading_limit) if link.loading else limit
            if quiet > allowed:
                found.append((d, quiet))
        return found

    def take_times(self, device: int) -> list[float]:
        link = self.agents.get(device)
        if link is None:
            return []
        with link.lock:
            found, link.times = link.times, []
        return found

    def up(self) -> set[int]:
        return {d for d, link in list(self.agents.items()) if link.sock is not None and not link.gone}

    def lose(self, device: int) -> None:
        """Give up on a device: its link is closed at once; its process is stopped by stop_lost, after the recovery.
        Stopping a frozen agent wakes it to run its own shutdown, and stopping a remote one starts ssh: CPU taken
        from the stages that recover on a host of a few cores (a switch after a freeze waited 20 ms for it)."""
        link = self.agents.get(device)
        if link is not None:
            self._hang_up(link)
            with self._lock:
                self._lost.append((time.monotonic(), link))

    def stop_lost(self, before: float = float("inf")) -> None:
        """The processes of the devices lost before `before` (monotonic; all by default) stopped."""
        with self._lock:
            due = [link for at, link in self._lost if at < before]
            self._lost = [(at, link) for at, link in self._lost if at >= before]
        for link in due:
            self._stop(link)

    # --- the end -----------------------------------------------------------------------------

    def _retire(self, link: AgentLink) -> None:
        self._hang_up(link)
        self._stop(link)

    @staticmethod
    def _hang_up(link: AgentLink) -> None:
        link.gone = True
        link.outbox.put(None)  # its sender ends (at once, or when hanging up ends the write it is blocked in)
        if link.sock is not None:
            hang_up(link.sock)

    def _stop(self, link: AgentLink) -> None:
        with self._lock:  # once: the loop's stop_lost and a restart's _retire (the admit thread) may race
            if link.stopped:
                return
            link.stopped = True
        if link.process is not None and link.process.poll() is None:
            _signal_group(link.process.pid, signal.SIGCONT)  # a frozen one must wake to see SIGTERM
            _signal_group(link.process.pid, signal.SIGTERM)
        elif link.remote is not None:
            remote = link.remote
            threading.Thread(target=_stop_remote, args=(remote,), daemon=True).start()

    def close(self) -> None:
        """Every agent told to stop, then made sure of; nothing is left running."""
        self.closed.set()
        self.listener.close()
        for d in list(self.agents):
            self.send(d, {"kind": "stop"})
        deadline = time.monotonic() + STOP_SECONDS
        for link in list(self.agents.values()):
            link.outbox.put(None)
            if link.sender is not None and not link.gone:  # "stop" goes out after the lines queued before it
                link.sender.join(max(0.0, deadline - time.monotonic()))
        for link in list(self.agents.values()):
            self._retire(link)
        deadline = time.monotonic() + STOP_SECONDS
        for link in list(self.agents.values()):
            if link.process is not None:
                try:
                    link.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _signal_group(link.process.pid, signal.SIGKILL)
                    link.process.wait()
                _signal_group(link.process.pid, signal.SIGKILL)


def send_each(link: AgentLink, session: ControlSession, closing: threading.Event) -> None:
    """The link's queued control lines, in order, until it is retired. A write that fails hangs the link up (its
    reader then reports the device lost) and drops the rest; once serve closes, queued pushes are dropped ("stop"
    is not kept waiting behind them)."""
    broken = False
    while True:
        item = link.outbox.get()
        if item is None:
            return
        message, payload = item
        if broken or link.gone or (closing.is_set() and message.get("kind") == "model"):
            continue
        try:
            source = payload.open("rb") if isinstance(payload, Path) else payload
        except OSError:  # serve's own file, gone: not the link's fault, and nothing of it was sent
            if message.get("kind") == "model":
                Fleet._loaded(link)  # (no answer will come for it)
            continue
        link.writing = True
        try:
            session.sendall(encode(message))
            for piece in pieces(source):  # a frozen or cut-off agent stops taking pieces in once the buffers
                session.sendall(piece)  # between are full
                link.taken = time.monotonic()
        except OSError:  # (a file that cannot be read once its size went out leaves the link no way on either)
            broken = True
            hang_up(session.sock)
        finally:
            link.writing = False
            if not isinstance(source, bytes):
                source.close()


def pieces(payload: bytes | io.BufferedReader) -> Iterator[memoryview]:
    """A payload PUSH_PIECE at a time; an open file's read into one buffer over and over (no copy of it all), so
    each piece holds only until the next is taken."""
    if not isinstance(payload, bytes):
        buffer = bytearray(PUSH_PIECE)
        while count := payload.readinto(buffer):
            yield memoryview(buffer)[:count]
        return
    view = memoryview(payload)
    for start in range(0, len(view), PUSH_PIECE):
        yield view[start:start + PUSH_PIECE]


def controller_address(given: str, devices: Iterable[Device]) -> str:
    """The address the agents dial: as given, but a loopback one when devices are remote (they cannot reach this
    host's loopback) becomes the address this host reaches them from (on the virtual fleet, its hub address)."""
    remote = sorted({d.host for d in devices if not d.is_local})
    try:
        loopback = ipaddress.ip_address(given).is_loopback
    except ValueError:  # a host name: as given
        return given
    if not remote or not loopback:
        return given
    sources = {_source_address(host) for host in remote}
    if len(sources) != 1:
        raise DnnpipeError(f"the devices reach this host at different addresses ({', '.join(sorted(sources))}): "
                           f"give --controller-host, the one they all reach")
    return sources.pop()


def _source_address(host: str) -> str:
    """The local address the kernel would send from to host (a UDP socket's connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))
            return str(probe.getsockname()[0])
    except OSError as e:
        raise DnnpipeError(f"device host {host}: no route from this host ({e.strerror or e}); give "
                           f"--controller-host") from None


def _stop_remote(remote: SshTransport) -> None:
    """Off the critical path, bounded: an unreachable device is left to its own agent, which stops when its
    control link is gone."""
    done = threading.Event()

    def stop() -> None:
        try:
            remote.stop(PID)
        except Exception:  # noqa: BLE001 - an unreachable device cannot be stopped from here
            pass
        done.set()

    threading.Thread(target=stop, daemon=True).start()
    done.wait(CLEANUP_SECONDS)


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except OSError:
        pass
