"""The live Feed: requests' inputs numbered in arrival order for the controller, results routed back to the
request that is waiting for them. Bounded (a full queue refuses a request at once) and never hangs: every
request ends answered, failed (abandoned, shut down) or expired, exactly once."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np


class Refused(Exception):
    """The feed cannot take a request now: full (503 with Retry-After; gRPC RESOURCE_EXHAUSTED) or draining
    (503; gRPC UNAVAILABLE)."""

    def __init__(self, message: str, full: bool = False):
        super().__init__(message)
        self.full = full


@dataclass(frozen=True)
class Outcome:
    """A request's end as both front doors answer it: its results (status 200), or an HTTP-equivalent status
    and one line; `refused` when its inputs were never queued (the body may be reused), `full` when that was
    the queue being full (REST 503 with Retry-After; gRPC RESOURCE_EXHAUSTED rather than UNAVAILABLE)."""

    status: int
    error: Optional[str] = None
    results: tuple[list, ...] = ()
    refused: bool = False
    full: bool = False


class Ticket:
    """One request's `batch` consecutive inputs from `first`; `wait` returns once all are delivered or the
    request failed (`error` set, with the HTTP status that says why)."""

    def __init__(self, first: int, batch: int):
        self.first, self.batch = first, batch
        self.results: list[Optional[list[np.ndarray]]] = [None] * batch
        self.error: Optional[str] = None
        self.status = 200
        self._left = batch
        self._done = threading.Event()
        self._lock = threading.Lock()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(max(0.0, timeout))

    def _deliver(self, index: int, outputs: list[np.ndarray]) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.results[index - self.first] = outputs
            self._left -= 1
            if self._left == 0:
                self._done.set()

    def expire(self, status: int, reason: str) -> None:
        """Give up on the request (its inputs stay queued: the pipeline takes inputs in order)."""
        self._fail(status, reason)

    def _fail(self, status: int, reason: str) -> None:
        with self._lock:
            if not self._done.is_set():
                self.status, self.error = status, reason
                self._done.set()


class LiveFeed:
    """A Feed (dnnpipe.feeds) over live requests, holding at most `capacity` inputs not yet delivered."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.monotonic):
        self.capacity, self.clock = capacity, clock
        self._cond = threading.Condition()
        self._inputs: dict[int, list[np.ndarray]] = {}  # accepted, not yet delivered nor abandoned
        self._owner: dict[int, Ticket] = {}
        self._next = 0  # the next input's index
        self._handed = 0  # inputs below this were handed to the pipeline at least once
        self._draining = False

    def submit(self, rows: list[list[np.ndarray]]) -> Ticket:
        """Queue a request's inputs (one list of arrays per pipeline input), or refuse it at once."""
        with self._cond:
            if self._draining:
                raise Refused("the service is shutting down")
            if len(self._inputs) + len(rows) > self.capacity:
                raise Refused(f"the queue is full ({len(self._inputs)} of {self.capacity} inputs waiting)", full=True)
            ticket = Ticket(self._next, len(rows))
            for row in rows:
                self._inputs[self._next] = row
                self._owner[self._next] = ticket
                self._next += 1
            self._cond.notify_all()
            return ticket

    def drain(self) -> None:
        """No new requests; the pipeline sees the end after the inputs already accepted."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    def fail_all(self, status: int, reason: str) -> None:
        """Answer every request still waiting with an error (the pipeline stopped)."""
        with self._cond:
            for ticket in set(self._owner.values()):
                ticket._fail(status, reason)
            self._owner.clear()
            self._inputs.clear()
            self._cond.notify_all()

    @property
    def depth(self) -> int:
        """Inputs held and not yet handed to the pipeline (counted from the held inputs: failed or abandoned
        ones leave both gauges, whether or not the pipeline had taken them)."""
        with self._cond:
            return sum(1 for index in self._inputs if index >= self._handed)

    @property
    def inflight(self) -> int:
        """Inputs handed to the pipeline and not yet delivered."""
        with self._cond:
            return sum(1 for index in self._inputs if index < self._handed)

    # The Feed protocol, called by the controller.

    def wait_input(self, index: int, timeout: float) -> Optional[list[np.ndarray]]:
        with self._cond:
            self._cond.wait_for(lambda: index in self._inputs or index < self._next
                                or self._draining, timeout)
            row = self._inputs.get(index)
            if row is not None:
                self._handed = max(self._handed, index + 1)
            return row

    def exhausted(self, index: int) -> bool:
        """Draining, nothing new comes: an input not held now (never accepted, or failed) never will be."""
        with self._cond:
            return self._draining and index not in self._inputs

    def deliver(self, index: int, outputs: list[np.ndarray]) -> None:
        with self._cond:
            self._inputs.pop(index, None)
            ticket = self._owner.pop(index, None)
            if ticket is not None:
                ticket._deliver(index, outputs)
            self._cond.notify_all()

    def abandon(self, index: int, reason: str) -> None:
        with self._cond:
            self._inputs.pop(index, None)
            ticket = self._owner.pop(index, None)
            if ticket is not None:
                ticket._fail(503, f"input could not be served: {reason}")
            self._cond.notify_all()
