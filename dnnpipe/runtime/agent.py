"""A device agent: one long-lived process per device that runs whatever stage role its controller gives it.

The controller (serve) starts one agent per device once. The agent holds an authenticated control link to it
and a listener on its device's runtime_port that stays open for the whole run. A *role* is a stage of one plan:
its units, whose sub-model the controller cut from the whole model.tflite and pushed over the control link in
the background before any switch needs it (its tensors are the manifest's cut tensors), the device it receives
from and the one it sends to (0 is the controller), and its pacing. Roles are numbered by a *generation*: every
switch of plan is a new generation, and every data link proves in its handshake which generation it belongs
to, so a frame of an old plan can never reach a new role.

A planned switch is a barrier in the frame sequence: the controller ends the old plan's input stream (END) at
frame B and feeds frames from B on to the new plan. Each agent starts its new role as soon as the role arrives,
beside the running one (its sub-model already loaded and warmed up, its links dialled): the new role's threads wait
on its upstream link, which carries frame B once B's new upstream stage has run it. The old role finishes the
frames before B and ends when END reaches it; meanwhile both roles take turns on the device (one frame at a time,
on one device clock: runtime.stage.DeviceTurn), so the new pipeline fills while the old one drains. No process
starts, no model loads on the switch, and a link the new plan shares with the old one up to its receiving end
stays: the old role ends its stream with NEXT and hands the connection to the new one (HandOver). A device loss
aborts every role at once (the controller replays what was in flight). See docs/protocol.md for the control
messages.
"""

from __future__ import annotations

import hashlib
import os
import queue
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..errors import DnnpipeError
from ..interpreter import StageRunner
from ..manifest import MANIFEST_FILE, StageSpec, WholeModel, read_manifest
from ..pipeline_key import stage_key, tls_context
from .control import CONTROLLER, LOADED_SUB_MODELS, ControlSession, LineReader, encode, integer, number, \
    MIN_PACE_MS, MAX_PACE_MS
from .handshake import HANDSHAKE_SECONDS, HandshakeError, LinkAuth, ProbeClosed, connect_side, listen_side_for, \
    manifest_identity, tls_wrap
from .heap import fault_in
from .stage import DeviceTurn, StageLoop
from .transport import Downstream, HeldLinks, Say, Upstream, dial, listen, shut_link

HEARTBEAT_SECONDS = 0.1  # a frozen device misses a few in a row: detected within a second
MAX_VETTING = 16  # connections vetted at once; a slot is taken before accept(), so more wait in the backlog
MAX_GENERATION = 0xFFFF  # generations travel in the handshake's u16 receiver field
INSECURE_HELLO = struct.Struct("!4sHH")  # without a key: "DNNA" | sender device | generation (no proof)
MAX_MODEL_BYTES = 1 << 30  # a pushed sub-model
TENSOR_ROOM = 8 << 20  # a build's memory beyond its weights, faulted in ahead (EfficientNetV2B0's first units: 5 MiB)
SESSION_WAIT = 2.0  # a link that arrives before the control link said the session waits this long
CONTROLLER_WAIT = 5.0  # the controller listens before it starts an agent: if it does not answer, it is gone
PORT_WAIT = 5.0  # how long a busy runtime_port may take to come free (an old agent on its way out)


def link_identity(model: bytes, session: bytes, generation: int, receiver: int) -> bytes:
    """What a data link between agents is bound to: the model (manifest), this controller's run, the plan
    generation and the receiving device; the handshake's MAC covers it."""
    return hashlib.sha256(b"|".join([b"dnnpipe agent link", model, session,
                                     struct.pack("!HH", generation & MAX_GENERATION, receiver)])).digest()


def dial_link(host: str, port: int, sender: int, receiver: int, generation: int, key: Optional[bytes], model: bytes,
              session: bytes, timeout: float, stop: Optional[threading.Event] = None,
              tls: Optional[ssl.SSLContext] = None) -> socket.socket:
    """A data link of one generation, dialled and proven (sender -> receiver device; 0 is the controller), inside
    TLS when `tls` is given (the handshake then runs inside it)."""
    sock, reason = dial(host, port, timeout, stop=stop)
    if sock is None:
        raise DnnpipeError(f"cannot reach {host}:{port} within {timeout:g} s ({reason})")
    try:
        if tls is not None:
            sock = tls_wrap(sock, tls, False)
        if key is None:
            sock.sendall(INSECURE_HELLO.pack(b"DNNA", sender, generation))
        else:
            connect_side(sock, LinkAuth(key, link_identity(model, session, generation, receiver), sender, generation))
    except (HandshakeError, OSError) as e:
        sock.close()
        raise DnnpipeError(f"{host}:{port} refused the link of generation {generation}: {e}") from None
    sock.settimeout(None)
    return sock


def vet_link(sock: socket.socket, receiver: int, key: Optional[bytes], model: bytes, session: Callable[[], bytes],
             tls: Optional[ssl.SSLContext] = None) -> tuple[socket.socket, int, int]:
    """The far end of dial_link: the link (inside TLS when `tls` is given), its sender device and generation once
    the peer proved them."""
    if tls is not None:
        sock = tls_wrap(sock, tls, True)
    if key is None:
        sock.settimeout(HANDSHAKE_SECONDS)
        data = b""
        while len(data) < INSECURE_HELLO.size:
            chunk = sock.recv(INSECURE_HELLO.size - len(data))
            if not chunk:
                raise ProbeClosed("closed before the link's hello")
            data += chunk
        magic, sender, generation = INSECURE_HELLO.unpack(data)
        if magic != b"DNNA":
            raise HandshakeError(f"not an agent link (starts with {magic!r})")
        return sock, sender, generation

    def auth_for(sender: int, generation: int) -> LinkAuth:
        return LinkAuth(key, link_identity(model, session(), generation, receiver), sender, generation)

    auth = listen_side_for(sock, auth_for)
    return sock, auth.sender, auth.receiver


@dataclass(frozen=True)
class Role:
    """One stage of one plan generation, as the controller gives it (units None: no stage in it)."""

    generation: int
    stage: int
    units: Optional[tuple[int, int]]
    upstream: int = 0  # the device that sends to it (0: the controller)
    downstream: int = 0  # the device it sends to (0: the controller)
    host: str = ""
    port: int = 0
    pace_ms: Optional[float] = None
    abort: bool = False  # cut the running role now (a device was lost) instead of at the barrier
    keep_from: Optional[int] = None  # its upstream link may be this older generation's role's, which stays (NEXT)
    keep_to: Optional[int] = None  # its downstream link stays: this older generation's role's, handed on at NEXT


def check_units(message: dict[str, Any], units: int, peer: str) -> tuple[int, int]:
    value = message.get("units")
    if not isinstance(value, list) or len(value) != 2:
        raise DnnpipeError(f"{peer}: {message['kind']!r} needs units [first, last]")
    first = integer({"kind": message["kind"], "first unit": value[0]}, "first unit", 1, units, peer)
    last = integer({"kind": message["kind"], "last unit": value[1]}, "last unit", first, units, peer)
    return first, last


def check_role(message: dict[str, Any], units: int, peer: str) -> Role:
    """A "role" command, every field checked (the controller is trusted only after the handshake, and its
    numbers are still bounded here)."""
    generation = integer(message, "generation", 0, MAX_GENERATION, peer)
    abort = message.get("abort", False)
    if not isinstance(abort, bool):
        raise DnnpipeError(f"{peer}: 'role' needs abort true or false")
    if message.get("units") is None:
        return Role(generation, 0, None, abort=abort)
    host = message.get("host")
    if not isinstance(host, str) or not 0 < len(host) <= 255 or any(c.isspace() or ord(c) < 32 for c in host):
        raise DnnpipeError(f"{peer}: 'role' needs host a host name or address")
    keep = [None if abort or message.get(name) is None else integer(message, name, 0, generation - 1, peer)
            for name in ("keep_from", "keep_to")]
    return Role(generation, integer(message, "stage", 1, 4096, peer), check_units(message, units, peer),
                integer(message, "from", 0, 4096, peer), integer(message, "to", 0, 4096, peer), host,
                integer(message, "port", 1, 65535, peer),
                number(message, "pace", MIN_PACE_MS, MAX_PACE_MS, peer, optional=True), abort, *keep)


class PreDial:
    """A link dialled and proven ahead, on its own thread: a role's downstream link as soon as the role arrives,
    while the running role still serves (at the barrier the new role finds it ready), or the controller's input
    link of the next generation to the first device of each plan it may switch to."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.sock: Optional[socket.socket] = None
        self.error = ""

    def start(self, connect: Callable[[threading.Event], socket.socket], name: str) -> "PreDial":
        """Run connect(cancel) on a thread; its link (or its error) waits here for take()."""
        def body() -> None:
            try:
                self.sock = connect(self.cancel)
            except DnnpipeError as e:
                self.error = str(e)
            finally:
                self.done.set()
                if self.cancel.is_set():
                    self.discard()

        threading.Thread(target=body, daemon=True, name=name).start()
        return self

    def take(self, stop: threading.Event, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while not self.done.wait(0.01):
            if stop.is_set() or time.monotonic() > deadline:
                self.discard()
                raise DnnpipeError("stopped while dialling the downstream link" if stop.is_set() else
                                   f"the downstream link was not up within {timeout:g} s")
        if self.sock is None:
            raise DnnpipeError(self.error)
        sock, self.sock = self.sock, None
        return sock

    def discard(self) -> None:
        self.cancel.set()
        if self.done.is_set():
            _close(self)


class HandOver:
    """A running role's downstream link, promised to the role that follows it on this device when both send to
    the same device: the link stays. At the end of its stream the old role sends NEXT instead of END and gives
    the link here; if it ends without (an error, or its END went out before the new role arrived) it gives
    nothing, and the new role dials its own link."""

    def __init__(self, generation: int):
        self.generation = generation  # the new role's
        self.done = threading.Event()
        self.sock: Optional[socket.socket] = None
        self.discarded = False

    def give(self, sock: Optional[socket.socket]) -> None:
        self.sock = sock
        self.done.set()
        if self.discarded:
            self.discard()

    def take(self, stop: threading.Event) -> Optional[socket.socket]:
        """The link once the old role's stream ended (None: not handed on); as long as the old role drains,
        which its own deadlines and the controller's heartbeats bound."""
        while not self.done.wait(0.05):  # returns as soon as the link is given; the poll only watches `stop`
            if stop.is_set():
                self.discard()
                raise DnnpipeError("stopped while the previous role drained")
        sock, self.sock = self.sock, None
        return sock

    def discard(self) -> None:
        self.discarded = True
        if self.done.is_set():
            _close(self)


def _close(holder: PreDial | HandOver) -> None:
    """The held socket closed, once, whichever thread (its taker's, its giver's) gets here first."""
    sock, holder.sock = holder.sock, None
    if sock is not None:
        sock.close()


@dataclass(frozen=True)
class AgentOptions:
    device: int
    folder: Path  # model_path / model_name: manifest.json, model.tflite, pipeline.key
    control_host: str
    control_port: int
    bind_port: int
    bind_addr: str = "0.0.0.0"
    connect_timeout: float = 30.0  # how long to reach the controller, or a neighbour
    timeout: float = 60.0  # longest wait for a frame inside a role
    queue_size: int = 4
    num_threads: Optional[int] = None
    delegate: Optional[str] = None
    key_file: Optional[Path] = None
    insecure: bool = False
    tls: bool = False  # every link inside mutual TLS with pipeline.crt beside the manifest (serve's default)


class Agent:
    def __init__(self, options: AgentOptions, say: Say = print):
        self.options, self.say = options, say
        self.name = f"[agent {options.device}]"
        manifest = read_manifest(options.folder)
        if manifest.whole_model is None:
            raise DnnpipeError(f"{options.folder / MANIFEST_FILE}: no whole model.tflite recorded; an agent cuts its "
                               f"roles from it (partition the model again)")
        self.whole: WholeModel = manifest.whole_model
        self.units = manifest.units
        self.key = stage_key(options.folder, options.key_file, options.insecure)
        self.model = manifest_identity((options.folder / MANIFEST_FILE).read_bytes())
        self.tls_listen = tls_context(options.folder, server_side=True) if options.tls else None
        self.tls_connect = tls_context(options.folder, server_side=False) if options.tls else None
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._session: Optional[bytes] = None
        self._session_known = threading.Event()
        self._links = HeldLinks()  # (generation, sender) -> proven data link, dialled or staying
        self._links_changed = threading.Condition(self._lock)
        # generation -> its role's downstream link: dialled ahead, or an older role's that stays (handed at NEXT)
        self._dials: dict[int, PreDial | HandOver] = {}
        self._handovers: dict[int, HandOver] = {}  # old generation -> its downstream link's promise to a new role
        self._ending: set[int] = set()  # generations whose stream's end went out (END or NEXT): too late to promise
        self._upstream_done: dict[int, threading.Event] = {}  # generation -> its upstream link ended (END or NEXT)
        self._prepared: OrderedDict[tuple[int, int], tuple[StageSpec, StageRunner]] = OrderedDict()
        self._prepare: queue.Queue[tuple[tuple[int, int], bytes]] = queue.Queue()
        self._aborted_below = -1  # roles of generations below this are dropped
        self.loops: dict[int, StageLoop] = {}  # generation -> its running role (two overlap at a barrier)
        self._reported: dict[int, int] = {}  # generation -> its role's frames already reported in a beat
        self._late: list[float] = []  # stage times of an ended role not yet reported
        self._live: dict[int, Role] = {}  # generation -> its role, given and not ended
        self._paces: dict[int, float] = {}  # generation -> a pace that came before its role's loop was made
        self.device = DeviceTurn()  # the roles of this device take turns, one frame at a time
        self.generation = -1  # the newest role's
        self._send_lock = threading.Lock()
        self.control: Optional[ControlSession] = None

    # --- the control link --------------------------------------------------------------------

    def run(self) -> None:
        """Until the controller says stop or goes away (then every role ends: nothing outlives it)."""
        o = self.options
        listener = self._listen()
        wait = min(o.connect_timeout, CONTROLLER_WAIT)
        sock, reason = dial(o.control_host, o.control_port, wait, stop=self.stop)
        if sock is None:
            listener.close()
            raise DnnpipeError(f"{self.name} cannot reach the controller at {o.control_host}:{o.control_port} "
                               f"within {wait:g} s ({reason})")
        try:
            if self.tls_connect is not None:
                sock = tls_wrap(sock, self.tls_connect, False)
            if self.key is not None:
                connect_side(sock, LinkAuth(self.key, self.model, o.device, CONTROLLER))
        except HandshakeError as e:
            sock.close()
            listener.close()
            raise DnnpipeError(f"{self.name} the controller at {o.control_host}:{o.control_port} refused the control "
                               f"link: {e}") from None
        sock.settimeout(None)
        self.control = ControlSession(sock)  # from here read and written by several threads
        self._send({"kind": "hello", "device": o.device, "pid": os.getpid(), "units": self.units})
        for body in (self._accept, self._beat, self._prepare_roles):
            threading.Thread(target=body, args=(listener,) if body == self._accept else (), daemon=True,
                             name=f"{self.name} {body.__name__}").start()
        peer = f"{self.name} controller {o.control_host}:{o.control_port}"
        reader = LineReader(self.control, peer)
        why = "the controller closed the control link"
        try:
            while not self.stop.is_set():
                message = reader.read()
                if message is None:
                    break
                if not self._command(message, peer, reader):
                    why = ""
                    break
        except (OSError, DnnpipeError) as e:
            why = f"control link lost: {e}"
        finally:
            self._shutdown(listener, sock)
        if why:
            raise DnnpipeError(f"{self.name} {why}; every role stopped")

    def _listen(self) -> socket.socket:
        """The device's port, waiting a little while it is still held: an agent of a controller that was just
        killed lets go of it within moments (its control link closed), a foreign program does not."""
        o = self.options
        deadline = time.monotonic() + min(o.connect_timeout, PORT_WAIT)
        while True:
            try:
                return listen(self.name, o.bind_addr, o.bind_port)
            except DnnpipeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _command(self, message: dict[str, Any], peer: str, reader: LineReader) -> bool:
        kind = message["kind"]
        if kind == "session":
            session = message.get("id")
            if not isinstance(session, str) or len(session) != 32 or not all(c in "0123456789abcdef" for c in session):
                raise DnnpipeError(f"{peer}: 'session' needs id, 32 hex digits")
            self._session = bytes.fromhex(session)
            self._session_known.set()
        elif kind == "model":
            units = check_units(message, self.units, peer)
            size = integer(message, "size", 8, MAX_MODEL_BYTES, peer)
            digest = message.get("sha256")
            if not isinstance(digest, str) or len(digest) != 64:
                raise DnnpipeError(f"{peer}: 'model' needs sha256, 64 hex digits")
            flatbuffer = reader.read_exact(size)
            if hashlib.sha256(flatbuffer).hexdigest() != digest:
                raise DnnpipeError(f"{peer}: the sub-model for units {units[0]}-{units[1]} differs from its sha256")
            self._prepare.put((units, flatbuffer))
        elif kind == "role":
            self._assign(check_role(message, self.units, peer))
        elif kind == "pace":
            self._pace(message, peer)
        elif kind == "stop":
            return False
        else:
            raise DnnpipeError(f"{peer}: unknown control command {kind[:40]!r}")
        return True

    def _pace(self, message: dict[str, Any], peer: str) -> None:
        """One role's planned stage time (a changed device speed): the roles overlapping at a barrier run different
        units, so each keeps its own pace; without a generation, the newest role's."""
        ms = number(message, "ms", MIN_PACE_MS, MAX_PACE_MS, peer)
        assert ms is not None  # not optional: refused above when missing
        generation = None if message.get("generation") is None else \
            integer(message, "generation", 0, MAX_GENERATION, peer)
        with self._lock:
            g = self.generation if generation is None else generation
            loop = self.loops.get(g)
            if loop is not None:
                loop.pace_ms = ms
            elif g in self._live:  # its role is still loading: it starts at this pace
                self._paces[g] = ms

    def _send(self, message: dict[str, Any]) -> bool:
        if self.control is None:
            return False
        with self._send_lock:
            try:
                self.control.sendall(encode(message))
                return True
            except OSError:
                return False

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            sent = 0
            with self._lock:
                times, self._late = self._late, []
                generation = self.generation
                for g, loop in sorted(self.loops.items()):
                    done = len(loop.timings)
                    if g == generation:  # an old role draining beside it ran another stage: not this one's speed
                        times += [round(t.inference_ms + t.emulation_ms, 4)
                                  for t in loop.timings[self._reported.get(g, 0):done]]
                    self._reported[g], sent = done, loop.sent
            if not self._send({"kind": "beat", "generation": generation, "sent": sent, "times": times}):
                return

    def _shutdown(self, listener: socket.socket, sock: socket.socket) -> None:
        self.stop.set()
        with self._lock:
            loops = list(self.loops.values())
            self._links.close()
            for dial in self._dials.values():
                dial.discard()
            self._dials.clear()
        for loop in loops:
            loop.abort(f"{self.name} stopped")
        listener.close()
        shut_link(sock)  # the socket's own shutdown: SSLSocket's would drop TLS under a thread still sending
        sock.close()

    # --- roles -------------------------------------------------------------------------------

    def _assign(self, role: Role) -> None:
        """Start a role at once, beside the running one: its links are taken and its threads wait on its upstream
        link, which carries nothing before the barrier (END of the old role's stream, upstream) has passed. An
        aborting role first cuts every older role."""
        with self._lock:
            if role.generation <= self.generation or role.generation < self._aborted_below:
                return  # the controller numbers generations upwards: a repeat or a stale role
            self.generation = role.generation
            if role.units is not None:
                self._live[role.generation] = role  # with the generation: its early links are not stale
                self._upstream_done[role.generation] = threading.Event()
            if role.abort:
                self._aborted_below = role.generation
            older = [(g, loop) for g, loop in self.loops.items() if g < role.generation] if role.abort else []
            if role.units is None:
                self._close_stale()
        for g, loop in older:
            loop.abort(f"{self.name} role of generation {g} replaced (a device was lost)")
        if role.units is None:
            return
        with self._lock:
            sends = None if role.keep_to is None else self._live.get(role.keep_to)
            if sends is not None and (sends.downstream, sends.host, sends.port) == \
                    (role.downstream, role.host, role.port) and sends.generation not in self._ending | \
                    set(self._handovers):  # the older role's link stays: promised to this one at its NEXT
                self._dials[role.generation] = self._handovers[sends.generation] = HandOver(role.generation)
            else:
                self._dials[role.generation] = PreDial().start(partial(self._dial_downstream, role),
                                                               f"{self.name} dial {role.generation}")
            receives = None if role.keep_from is None else self._live.get(role.keep_from)
            drains = receives.generation if receives is not None and receives.upstream == role.upstream else None
        threading.Thread(target=self._run_role, args=(role, drains), daemon=True,
                         name=f"{self.name} role {role.generation}").start()

    def _dial_downstream(self, role: Role, cancel: threading.Event) -> socket.socket:
        o = self.options
        return dial_link(role.host, role.port, o.device, role.downstream, role.generation, self.key, self.model,
                         self._wait_session(), o.connect_timeout, cancel, self.tls_connect)

    def _run_role(self, role: Role, drains: Optional[int]) -> None:
        """`drains`: the older role whose upstream link this one's may continue (same sending device): its
        link is taken once that role's stream ended, kept (after NEXT) or dialled (after END)."""
        o = self.options
        assert role.units is not None
        try:
            spec, runner = self._runner(role.units, role.stage)
        except DnnpipeError as e:
            with self._lock:
                self._role_gone(role.generation)
            self._send({"kind": "error", "generation": role.generation, "message": str(e)})
            return
        name = f"[device {o.device} stage {role.stage}]"
        loop = StageLoop(name, spec, runner, o.queue_size, lambda text: None, role.pace_ms, device=self.device,
                         rank=role.generation)
        with self._lock:
            dial = self._dials.pop(role.generation, None)
            if role.generation < self._aborted_below or self.stop.is_set():  # aborted while it was set up
                if dial is not None:
                    dial.discard()
                self._role_gone(role.generation)
                return
            self.loops[role.generation], self._reported[role.generation] = loop, 0
            loop.pace_ms = self._paces.pop(role.generation, loop.pace_ms)
            loop.continue_as = partial(self._continue_as, role.generation)

        def source() -> None:
            try:
                if drains is not None:
                    self._await_upstream_end(drains, loop.stop)
                up, prefix = self._take_link(role.generation, role.upstream, loop.stop)
                # a live feed may pause (idle): heartbeats tell a stalled neighbour
                loop.upstream = Upstream(up, f"{name} upstream device {role.upstream}", spec.inputs, o.timeout,
                                         idle=True, continues=True, prefix=prefix)
                loop.receive()
                self._keep_upstream(role, loop.upstream)
            finally:
                with self._lock:
                    done = self._upstream_done.get(role.generation)
                if done is not None:
                    done.set()

        def sink() -> None:  # the first frame runs while the downstream link is still being proven
            if isinstance(dial, HandOver):
                sock = dial.take(loop.stop) or self._dial_downstream(role, loop.stop)
            elif dial is not None:
                sock = dial.take(loop.stop, o.connect_timeout)
            else:
                raise DnnpipeError("no downstream link was dialled for this role")
            loop.downstream = Downstream(sock, f"{role.host}:{role.port}", spec.outputs, o.timeout)
            loop.send()
            if loop.continued_as is not None and not self._hand_on(role.generation, loop.downstream):
                loop.continued_as = None  # its new role was cut meanwhile: the link closed, not kept

        try:  # (an aborting role's predecessors gave the device back when cut: StageLoop.abort)
            loop.run(source, sink)
        except DnnpipeError as e:
            loop.fail(str(e) if str(e).startswith("[") else f"{name} {e}")
        finally:
            for link in (loop.upstream, loop.downstream):
                if link is not None:
                    link.close()
        with self._lock:
            self._report_last(role.generation, loop)
            del self.loops[role.generation]
            self._role_gone(role.generation)
        if loop.error and not self.stop.is_set():
            self._send({"kind": "error", "generation": role.generation, "message": loop.error})
        elif not loop.error:
            self._send({"kind": "ended", "generation": role.generation, "sent": loop.sent,
                        "continues": loop.continued_as})

    def _role_gone(self, generation: int) -> None:
        """A role ended however it ended (hold self._lock): a promise of its link it did not keep lets its
        successor dial; a role waiting for its upstream to end takes its own."""
        self._live.pop(generation, None)
        self._ending.discard(generation)
        promised = self._handovers.pop(generation, None)
        if promised is not None and not promised.done.is_set():
            promised.give(None)
        done = self._upstream_done.pop(generation, None)
        if done is not None:
            done.set()
        self._close_stale()

    def _continue_as(self, generation: int) -> Optional[int]:
        """At the end of a role's stream: the generation its downstream link goes on as (NEXT), or None (END)."""
        with self._lock:
            self._ending.add(generation)
            promised = self._handovers.get(generation)
            return promised.generation if promised is not None and self._kept_promise(promised) else None

    def _hand_on(self, generation: int, downstream: Downstream) -> bool:
        """NEXT went out: the link is the new role's now (False: that role was cut meanwhile; closed)."""
        sock = downstream.detach()
        with self._lock:
            promised = self._handovers.pop(generation, None)
            if promised is None or not self._kept_promise(promised):
                sock.close()
                return False
            promised.give(sock)
            return True

    def _kept_promise(self, promised: HandOver) -> bool:
        """Whether a promise of a link still has a role to take it (hold self._lock)."""
        return not promised.discarded and not self._stale(promised.generation)

    def _await_upstream_end(self, generation: int, stop: threading.Event) -> None:
        """Until the older role's upstream link ended: after NEXT it is this role's link."""
        with self._lock:
            done = self._upstream_done.get(generation)
        while done is not None and not done.wait(0.05):
            if stop.is_set() or self.stop.is_set():
                raise DnnpipeError("stopped while the previous role drained")

    def _keep_upstream(self, role: Role, upstream: Upstream) -> None:
        """After NEXT the upstream link is the role's of the generation it names (same sending device), with the
        bytes read past NEXT; that generation must be newer and still to run here."""
        following = upstream.reader.continues
        if following is None:
            return
        sock, prefix = upstream.detach()
        with self._links_changed:
            successor = self._live.get(following)  # None: its role is still to come
            if following <= role.generation or self._stale(following) or self.stop.is_set() or (
                    successor is not None and (successor.keep_from, successor.upstream) != (role.generation,
                                                                                            role.upstream)):
                sock.close()
                return
            self._links.kept((following, role.upstream), sock, prefix)
            self._links_changed.notify_all()

    def _report_last(self, generation: int, loop: StageLoop) -> None:
        """The stage times of the current role's last frames go out with the next beat (the speed measure keeps
        every frame of the running stage); those of a role a switch replaced measured other units: dropped."""
        done = self._reported.pop(generation, 0)
        if generation == self.generation:  # a role a switch replaced ran another stage's units
            self._late += [round(t.inference_ms + t.emulation_ms, 4) for t in loop.timings[done:]]

    def _wait_session(self) -> bytes:
        if not self._session_known.wait(SESSION_WAIT) or self._session is None:
            raise DnnpipeError("no session from the controller yet")
        return self._session

    def _take_link(self, generation: int, sender: int, stop: threading.Event) -> tuple[socket.socket, bytes]:
        """The upstream link: one that stays (an older role's, after its NEXT) before one dialled for it."""
        deadline = time.monotonic() + self.options.connect_timeout
        key = (generation, sender)
        with self._links_changed:
            while key not in self._links:
                if stop.is_set() or self.stop.is_set():
                    raise DnnpipeError("stopped while waiting for the upstream link")
                if time.monotonic() > deadline:
                    raise DnnpipeError(f"device {sender} did not link within {self.options.connect_timeout:g} s")
                self._links_changed.wait(0.05)
            return self._links.pop(key)

    def _stale(self, generation: int) -> bool:
        """A generation no role of this agent runs or will run (hold self._lock)."""
        return generation < self._aborted_below or (generation <= self.generation and generation not in self._live)

    def _close_stale(self) -> None:
        """Links and dials no role will take (hold self._lock)."""
        self._links.drop(self._stale)
        for g in [g for g in self._dials if self._stale(g)]:
            self._dials.pop(g).discard()
        for g in [g for g in self._paces if self._stale(g)]:
            del self._paces[g]

    # --- sub-models --------------------------------------------------------------------------

    def _prepare_roles(self) -> None:
        """Load pushed sub-models in the background, beside the running role."""
        while not self.stop.is_set():
            try:
                units, flatbuffer = self._prepare.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                for dropped in self._load(units, flatbuffer):
                    self._send({"kind": "unloaded", "units": list(dropped)})
                self._send({"kind": "prepared", "units": list(units)})
            except Exception as e:  # noqa: BLE001 - answered either way (MemoryError on a small board, too)
                why = e if isinstance(e, DnnpipeError) else f"{type(e).__name__}: {e}"
                self._send({"kind": "error", "generation": -1, "message": f"units {units[0]}-{units[1]}: {why}"})

    def _spec(self, units: tuple[int, int], stage: int, digest: str) -> StageSpec:
        inputs, outputs = self.whole.boundaries(units)
        return StageSpec(stage, self.options.device, units, f"units {units[0]}-{units[1]}", digest, inputs, outputs)

    def _load(self, units: tuple[int, int], flatbuffer: bytes) -> list[tuple[int, int]]:
        """Load and run once; the sub-models dropped to make room (the least recently used). The build holds
        Python's lock, so the pages it will write are faulted in first, without it (runtime.heap)."""
        spec = self._spec(units, 0, hashlib.sha256(flatbuffer).hexdigest())
        fault_in(len(flatbuffer) + TENSOR_ROOM)
        runner = StageRunner(flatbuffer, spec, self.options.num_threads, self.options.delegate)
        try:  # TFLite's first invoke plans its kernels: here, in the background, not on a switch's path. At this
            # thread's own priority: lowered, it would take Python's lock back at nice 19 (runtime.priority)
            runner([np.zeros(t.shape, t.dtype) for t in spec.inputs])
        except (ValueError, RuntimeError) as e:
            raise DnnpipeError(f"the sub-model does not run: {e}") from None
        with self._lock:
            self._prepared[units] = (spec, runner)
            self._prepared.move_to_end(units)
            dropped = []
            while len(self._prepared) > LOADED_SUB_MODELS:
                dropped.append(self._prepared.popitem(last=False)[0])
        return dropped

    def _runner(self, units: tuple[int, int], stage: int) -> tuple[StageSpec, StageRunner]:
        """The loaded sub-model for these units; a role may arrive just before its model finished loading."""
        deadline = time.monotonic() + self.options.connect_timeout
        while not self.stop.is_set():
            with self._lock:
                found = self._prepared.get(units)
                if found is not None:
                    self._prepared.move_to_end(units)
                    return found
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
        raise DnnpipeError(f"no sub-model for units {units[0]}-{units[1]} was pushed")

    # --- data links --------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        """Every incoming data link is vetted on its own thread; a vetting slot is taken before accept()."""
        slots = threading.BoundedSemaphore(MAX_VETTING)
        listener.settimeout(0.2)
        while not self.stop.is_set():
            if not slots.acquire(timeout=0.2):
                continue
            try:
                sock, address = listener.accept()
            except socket.timeout:
                slots.release()
                continue
            except OSError:
                slots.release()
                return
            threading.Thread(target=self._vet, args=(sock, f"{address[0]}:{address[1]}", slots), daemon=True).start()

    def _vet(self, sock: socket.socket, peer: str, slots: threading.BoundedSemaphore) -> None:
        try:
            sock, sender, generation = vet_link(sock, self.options.device, self.key, self.model, self._wait_session,
                                                self.tls_listen)
        except ProbeClosed:
            sock.close()
            return
        except (HandshakeError, DnnpipeError, OSError) as e:
            self.say(f"{self.name} dropped {peer}: {e}")
            sock.close()
            return
        finally:
            slots.release()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._links_changed:
            if self._stale(generation) or self.stop.is_set():
                sock.close()
                return
            self._links.dialled((generation, sender), sock)
            self._links_changed.notify_all()
