"""The controller's data path: inputs from the feed to a plan's first stage, results from its last to the feed.

One *route* per plan generation: the controller dials the first agent ("device 0 sends") and takes the last
agent's result link on its own listener, both proven for that generation. A planned switch opens the new route
behind the old one: the old source sends END at the barrier (the next input), the new source starts there, and
the new route's results are read as they come, also before the old route has drained: each route is FIFO, the
ledger keeps its epoch and maps each route's results by its own segment (Ledger.barrier), and the credits the new
plan's results free let the new pipeline fill while the old one drains. An aborting switch (a device lost) stops
the old route at once and starts a new ledger epoch: what was in flight is replayed, and late results of the old
route are dropped as stale.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from ..errors import DnnpipeError
from ..manifest import TensorSpec
from ..frameio import FrameReader, FrameWriter
from ..protocol import Kind
from ..runtime.agent import PreDial, dial_link, vet_link
from ..runtime.control import CONTROLLER
from ..runtime.dataio import to_real, to_wire
from ..runtime.handshake import ProbeClosed
from ..runtime.transport import HeldLinks
from .decide import staying_links
from .delivery import Ledger
from ..feeds import Feed
from .accept import accept_each, hang_up

POLL_SECONDS = 0.02
DELIVER_SECONDS = 10.0  # closing waits this long for results counted but not yet in the feed


@dataclass
class Route:
    generation: int
    epoch: int
    first: tuple[int, str, int]  # device, host, port
    last: int  # the device whose results come back
    previous: Optional["Route"]
    stop: threading.Event = field(default_factory=threading.Event)
    barrier: threading.Event = field(default_factory=threading.Event)  # a newer route takes over after END
    source_done: threading.Event = field(default_factory=threading.Event)
    results_done: threading.Event = field(default_factory=threading.Event)
    source_linked: threading.Event = field(default_factory=threading.Event)  # inputs reach the first stage
    results_linked: threading.Event = field(default_factory=threading.Event)  # the last stage's results link is in
    results_over: threading.Event = field(default_factory=threading.Event)  # its result reader returned, however
    base: Optional[int] = None  # the epoch's wire sequence of this route's first input
    first_result: Optional[float] = None  # monotonic
    sockets: list[socket.socket] = field(default_factory=list)
    chain: tuple[int, ...] = ()  # its plan's devices in order
    following: Optional["Route"] = None  # the route behind its barrier
    handed: Optional[socket.socket] = None  # its input link, gone on as the following route's after NEXT

    def keeps_input(self) -> bool:
        """Its input link stays from the route before (the same first device: decide.staying_links)."""
        return self._stays(0)

    def keeps_results(self) -> bool:
        """Its results come on the route before's result link, after that link's NEXT (decide.staying_links)."""
        return self._stays(-1)

    def _stays(self, link: int) -> bool:
        previous = self.previous
        return previous is not None and bool(self.chain) and staying_links(previous.chain, self.chain)[link]


class Stream:
    def __init__(self, ledger: Ledger, feed: Feed, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 key: Optional[bytes], model: bytes, session: bytes, host: str, connect_timeout: float,
                 pace: Callable[[], None], on_fault: Callable[[Route, str], None],
                 tls: Optional[tuple[ssl.SSLContext, ssl.SSLContext]] = None,
                 on_kept: Callable[[int], None] = lambda generation: None):
        self.tls = tls  # (listening, connecting) contexts: the links inside TLS
        self.ledger, self.feed, self.inputs, self.outputs = ledger, feed, list(inputs), list(outputs)
        self.key, self.model, self.session = key, model, session
        self.connect_timeout, self.pace, self.on_fault = connect_timeout, pace, on_fault
        self.on_kept = on_kept  # a route's input link stayed from the route before (the controller counts it)
        self.credit = threading.Condition()  # guards the ledger; notified on every result
        self.delivering = threading.Lock()  # one result into the feed at a time (old and new routes alike)
        self.undelivered = 0  # results the ledger counted that are not in the feed yet
        self.duplicates = 0
        self.result_times: list[float] = []
        self.last_progress = time.monotonic()  # the last result, or the last moment nothing was in flight
        self.route: Optional[Route] = None
        self.fatal: Optional[BaseException] = None  # the feed failed to take a result (a full disk): end the run
        self.closed = threading.Event()
        self._links = HeldLinks()  # result links, dialled or staying (after NEXT)
        self._links_changed = threading.Condition()
        self._ahead: dict[tuple[int, int], PreDial] = {}  # (generation, first device) -> input link dialled ahead
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        accept_each(self.listener, self.closed, self._vet, "serve results accept")

    # --- routes ------------------------------------------------------------------------------

    def open(self, generation: int, first: tuple[int, str, int], last: int, abort: bool,
             chain: tuple[int, ...] = ()) -> Route:
        """The next generation's route: behind the running one (a barrier), or instead of it (abort). `chain`:
        its plan's devices in order (links that stay are kept by it)."""
        with self.credit:
            previous = self.route
            if abort or previous is None:
                if previous is not None:
                    self._stop(previous)
                epoch = self.ledger.switch()
                previous = None
            else:
                epoch = self.ledger.epoch
            route = self.route = Route(generation, epoch, first, last, previous, chain=chain)
            if previous is not None:
                previous.following = route
                previous.barrier.set()
            self.credit.notify_all()
        for body in (self._source, self._results):
            threading.Thread(target=self._guarded, args=(body, route), daemon=True,
                             name=f"serve {body.__name__} {generation}").start()
        return route

    def dial_ahead(self, generation: int, firsts: Iterable[tuple[int, str, int]]) -> None:
        """Dial and prove the input link of `generation` to each device that may be the first of the next plan
        (the first device of each plan for the loss of one device), so a loss's new route dials nothing."""
        with self._links_changed:
            for device, host, port in firsts:
                if (generation, device) not in self._ahead and not self.closed.is_set():
                    self._ahead[(generation, device)] = PreDial().start(
                        partial(dial_link, host, port, CONTROLLER, device, generation, self.key, self.model,
                                self.session, self.connect_timeout, tls=None if self.tls is None else self.tls[1]),
                        f"serve dial ahead {generation} to {device}")

    def forget_ahead(self, device: int) -> None:
        """Links dialled ahead to `device` are to an agent that is gone or new: never used, dialled again."""
        with self._links_changed:
            for key in [k for k in self._ahead if k[1] == device]:
                self._ahead.pop(key).discard()

    def dialled_ahead(self, generation: int, device: int) -> bool:
        """The input link of `generation` to `device`, dialled ahead, is proven (or failed: it is dialled again)."""
        with self._links_changed:
            ahead = self._ahead.get((generation, device))
        return ahead is not None and ahead.done.is_set()

    def _dial(self, route: Route) -> socket.socket:
        """The route's input link: the previous route's when it stays (handed on at the barrier), else the one
        dialled ahead when there is one, else dialled now. Links dialled ahead for this generation or an older one
        that this route does not use are hung up."""
        device, host, port = route.first
        with self._links_changed:
            ahead = self._ahead.pop((route.generation, device), None)
            for key in [k for k in self._ahead if k[0] <= route.generation]:
                self._ahead.pop(key).discard()
        if route.previous is not None and route.keeps_input():
            self._wait(route.previous.source_done, route)
            if route.previous.handed is not None:  # NEXT went out: a link dialled ahead would never carry a frame
                if ahead is not None:
                    ahead.discard()
                return route.previous.handed
        if ahead is not None:
            try:
                return ahead.take(route.stop, self.connect_timeout)
            except DnnpipeError:
                pass  # refused or gone: dialled again below, with its own error
        return dial_link(host, port, CONTROLLER, device, route.generation, self.key, self.model, self.session,
                         self.connect_timeout, route.stop, None if self.tls is None else self.tls[1])

    def _stop(self, route: Optional[Route]) -> None:
        """Cut a route and every route before it (their late results are stale)."""
        while route is not None:
            route.stop.set()
            for sock in route.sockets:
                hang_up(sock)
            route = route.previous

    def _guarded(self, body: Callable[[Route], None], route: Route) -> None:
        try:
            body(route)
        except DnnpipeError as e:
            if not route.stop.is_set() and not self.closed.is_set():
                self.on_fault(route, str(e))
        except Exception as e:  # noqa: BLE001 - reported to the controller, never a silent thread
            if not route.stop.is_set() and not self.closed.is_set():
                self.on_fault(route, f"{body.__name__}: {type(e).__name__}: {e}")

    def _wait(self, event: threading.Event, route: Route) -> bool:
        while not event.wait(POLL_SECONDS):
            if route.stop.is_set():
                return False
        return not route.stop.is_set()

    def _source(self, route: Route) -> None:
        """The new route's first link is dialled and proven before the barrier (the first agent holds it until
        its old role ends), so the switch itself dials nothing. Done, however it ends (a failed dial included):
        a route behind it waits for that."""
        try:
            self._send_inputs(route)
        finally:
            route.source_done.set()

    def _send_inputs(self, route: Route) -> None:
        device, host, port = route.first
        sock = self._dial(route)
        route.sockets.append(sock)
        if route.stop.is_set():
            hang_up(sock)
            return
        if route.previous is not None and not self._wait(route.previous.source_done, route):
            return  # (a link that stays was handed on once it was done)
        if route.previous is not None and sock is route.previous.handed:
            self.on_kept(route.generation)
        writer = FrameWriter(sock, self.inputs, f"the first stage on device {device} at {host}:{port}", 60.0)
        route.source_linked.set()
        sent = 0
        while not route.stop.is_set():
            with self.credit:
                if route.base is None:
                    self.ledger.barrier()  # a route behind a barrier: a segment of its own
                    route.base = self.ledger.wire_sequence
                index = None if route.barrier.is_set() else self.ledger.peek()
                if index is None:
                    if route.barrier.is_set() or self.ledger.done:
                        self._end_inputs(route, writer, sent, sock)
                        return
                    if self.ledger.in_flight == 0:
                        self.last_progress = time.monotonic()
                    self.credit.wait(POLL_SECONDS)
                    continue
            arrays = self.feed.wait_input(index, POLL_SECONDS)
            if arrays is None:
                if self.feed.exhausted(index):
                    with self.credit:
                        self.ledger.end_at(index)
                        self.credit.notify_all()
                continue
            tensors = [to_wire(spec, np.asarray(a)) for spec, a in zip(self.inputs, arrays)]
            with self.credit:
                if route.stop.is_set() or route.barrier.is_set():
                    continue
                if self.ledger.in_flight == 0:
                    self.last_progress = time.monotonic()
                taken = self.ledger.next_input()
                if taken != index:  # cannot happen: one source sends at a time
                    raise DnnpipeError(f"the ledger gave input {taken} where {index} was peeked")
            self.pace()
            writer.send(sent, time.time_ns(), tensors)
            sent += 1

    def _end_inputs(self, route: Route, writer: FrameWriter, sent: int, sock: socket.socket) -> None:
        """END at the barrier, or NEXT when the following route starts on the same device: the link stays."""
        following = route.following
        if following is not None and following.keeps_input() and not following.stop.is_set():
            writer.next(sent, following.generation)
            route.handed = sock
        else:
            writer.end(sent)

    def _results(self, route: Route) -> None:
        try:
            self._read_results(route)
        finally:
            route.results_over.set()

    def _read_results(self, route: Route) -> None:
        if route.previous is not None and route.keeps_results():  # the last device may hand its link on
            self._wait(route.previous.results_over, route)
        sock, prefix = self._take(route)
        route.sockets.append(sock)
        reader = FrameReader(sock, self.outputs, f"results from device {route.last}", None, continues=True,
                             prefix=prefix)
        route.results_linked.set()
        buffers = [np.empty(s.shape, s.dtype) for s in self.outputs]
        while not route.stop.is_set():
            frame = reader.read(buffers)
            if frame.kind in (Kind.END, Kind.NEXT):
                self._keep_results(route, reader, sock)
                route.results_done.set()
                return
            with self.credit:
                if route.stop.is_set():
                    return
                assert route.base is not None  # set before the route's first input was sent
                index = self.ledger.result(route.epoch, route.base + frame.sequence)
                if index is None:
                    self.duplicates += 1
                    continue
                now = self.last_progress = time.monotonic()
                self.result_times.append(now)
                route.first_result = route.first_result or now
                self.undelivered += 1
                self.credit.notify_all()
            # outside the credit: a slow write (a flush to disk) holds up neither the source nor a switch
            try:
                with self.delivering:
                    self.feed.deliver(index, [to_real(s, b) for s, b in zip(self.outputs, buffers)])
            except Exception as e:  # noqa: BLE001 - a storage fault is no pipeline fault: never retried
                self.fatal = e
                return
            finally:
                with self.credit:
                    self.undelivered -= 1
                    self.credit.notify_all()

    # --- result links ------------------------------------------------------------------------

    def _vet(self, sock: socket.socket, peer: str) -> None:
        try:
            sock, sender, generation = vet_link(sock, CONTROLLER, self.key, self.model, lambda: self.session,
                                                None if self.tls is None else self.tls[0])
        except (DnnpipeError, OSError, ProbeClosed):
            sock.close()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._links_changed:
            self._links.dialled((generation, sender), sock)
            self._links_changed.notify_all()

    def _keep_results(self, route: Route, reader: FrameReader, sock: socket.socket) -> None:
        """After NEXT the result link is the named newer generation's, from the same last device."""
        following = reader.continues
        if following is None:
            return
        with self._links_changed:
            # only the route behind this one's barrier takes it (its roles go out before it opens)
            behind = route.following
            if following != route.generation + 1 or (behind is not None and behind.stop.is_set()) or \
                    self.closed.is_set():
                sock.close()
                return
            self._links.kept((following, route.last), sock, reader.leftover)
            self._links_changed.notify_all()

    def has_link(self, generation: int, sender: int) -> bool:
        """A last stage's results link of this generation is in and not yet taken by its route."""
        with self._links_changed:
            return (generation, sender) in self._links

    def _take(self, route: Route) -> tuple[socket.socket, bytes]:
        """The route's result link: the previous route's when it stays (after its NEXT), else the one dialled."""
        deadline = time.monotonic() + self.connect_timeout
        key = (route.generation, route.last)
        with self._links_changed:
            while key not in self._links:
                if route.stop.is_set() or self.closed.is_set():
                    raise DnnpipeError("stopped")
                if time.monotonic() > deadline:
                    raise DnnpipeError(f"device {route.last} sent no results link within {self.connect_timeout:g} s")
                self._links_changed.wait(POLL_SECONDS)
            waiting = set()  # generations of earlier routes behind a barrier: their links may come in later
            earlier = route.previous
            while earlier is not None:
                waiting.add(earlier.generation)
                earlier = earlier.previous
            self._links.drop(lambda generation: generation < route.generation and generation not in waiting)
            return self._links.pop(key)

    def close(self) -> None:
        """Every route stopped; returns once no result is being delivered (the feed may be closed after)."""
        self.closed.set()
        with self.credit:
            self._stop(self.route)
            self.credit.notify_all()
            deadline = time.monotonic() + DELIVER_SECONDS
            while self.undelivered and time.monotonic() < deadline:  # every result counted reaches the feed
                self.credit.wait(POLL_SECONDS)
        self.listener.close()
        with self._links_changed:
            self._links.close()
            for ahead in self._ahead.values():
                ahead.discard()
            self._ahead.clear()
