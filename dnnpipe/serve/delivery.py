"""The controller's ledger: which inputs are stored, which are in flight, and which come next.

Pure bookkeeping (no sockets, no files), so replay and de-duplication are property-tested on their own.
Inputs are numbered 0, 1, 2, ... and re-read from the feed when needed, so "keeping" an input costs one
index; the total need not be known up front (a live feed): `end_at` records it once the feed is exhausted.
The pipeline is FIFO, so the ledger maps the k-th result of an epoch to the k-th input sent in it. A planned
switch at a barrier keeps the epoch and starts a new *segment* of it (`barrier`): each route is FIFO on its own,
and the new plan's results may come in before the old plan has drained (they free their credits at once, so the
new pipeline fills while the old one drains); a switch that aborts the running plan (a device lost) starts a new
epoch, and the source replays from the first unstored input; a result arriving from an older epoch, or for an
input already stored, is dropped, so every result is stored exactly once.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

from ..errors import DnnpipeError


class DeliveryError(DnnpipeError):
    """A result the pipeline could not have produced (a FIFO or numbering violation)."""


class Ledger:
    def __init__(self, total: Optional[int], window: int, stored: int = 0):
        """`stored` inputs (a prefix, as a resumed run finds them in OUT) need no result; `total` None: not
        known yet."""
        if (total is not None and total < 0) or window < 1 or not 0 <= stored <= (stored if total is None else total):
            raise ValueError(f"bad ledger: total {total}, window {window}, stored {stored}")
        self.total, self.window = total, window
        self.first_unstored = stored  # every input below this is stored
        self._stored_above: set[int] = set()  # stored inputs above first_unstored (none while FIFO holds)
        self.epoch = 0
        self._cursor = stored  # the next input this epoch sends
        self._sent: deque[int] = deque()  # inputs sent this epoch whose results have not come back
        self._received = 0  # every result below this wire sequence was received this epoch
        self._starts = [0]  # the wire sequence each open segment (a route behind a barrier) starts at
        self._next = [0]  # the next result each segment expects
        self._early: set[int] = set()  # results received above _received (a newer segment's)
        self.taken = stored  # inputs 0..taken-1 were asked of the feed at least once

    # --- source side -------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._sent) - len(self._early)

    @property
    def wire_sequence(self) -> int:
        """The wire sequence number the next input sent this epoch carries."""
        return self._received + len(self._sent)

    def peek(self) -> Optional[int]:
        """The input next_input would send, without sending it."""
        while not self._beyond(self._cursor) and self.is_stored(self._cursor):
            self._cursor += 1
        if self.in_flight >= self.window or self._beyond(self._cursor):
            return None
        return self._cursor

    def next_input(self) -> Optional[int]:
        """The next input to send, or None while the credit window is full or everything was sent."""
        index = self.peek()
        if index is None:
            return None
        self._sent.append(index)
        self._cursor += 1
        self.taken = max(self.taken, self._cursor)
        return index

    def end_at(self, total: int) -> None:
        """The feed has no input `total` (nor any after it): the run is done once everything below is stored."""
        if total < self.first_unstored or (self.total is not None and total != self.total) or total < self._cursor:
            raise DeliveryError(f"the feed ended at {total} after {self._cursor} inputs were sent"
                                f"{'' if self.total is None else f' (total {self.total})'}")
        self.total = total

    def _beyond(self, index: int) -> bool:
        return self.total is not None and index >= self.total

    # --- result side -------------------------------------------------------------------------

    def result(self, epoch: int, wire_sequence: int) -> Optional[int]:
        """The input a result belongs to, if it is to be stored now; None for a stale or duplicate result."""
        if epoch != self.epoch:
            return None  # from a connection the switch already closed: its inputs are replayed
        segment = max((k for k, start in enumerate(self._starts) if start <= wire_sequence), default=0)
        expected = self._next[segment]
        if wire_sequence != expected or wire_sequence >= self._received + len(self._sent):
            raise DeliveryError(f"result {wire_sequence} of epoch {epoch} where {expected} was expected "
                                f"({self.in_flight} in flight)")
        index = self._sent[wire_sequence - self._received]
        self._next[segment] += 1
        self._early.add(wire_sequence)
        while self._received in self._early:
            self._early.remove(self._received)
            self._received += 1
            self._sent.popleft()
        while len(self._starts) > 1 and self._next[0] == self._starts[1]:  # the oldest route has drained
            del self._starts[0], self._next[0]
        if self.is_stored(index):
            return None
        self._mark(index)
        return index

    def is_stored(self, index: int) -> bool:
        return index < self.first_unstored or index in self._stored_above

    def _mark(self, index: int) -> None:
        self._stored_above.add(index)
        while self.first_unstored in self._stored_above:
            self._stored_above.remove(self.first_unstored)
            self.first_unstored += 1

    # --- switching ---------------------------------------------------------------------------

    def barrier(self) -> None:
        """The inputs sent from now on go to a new route behind a barrier: a segment of its own, FIFO in itself."""
        start = self.wire_sequence
        if start != self._starts[-1]:
            self._starts.append(start)
            self._next.append(start)

    def switch(self) -> int:
        """A new epoch (new connections): everything in flight is dropped and replayed from the first unstored
        input. Returns the new epoch number, which the caller tags its result reader with."""
        self.epoch += 1
        self._cursor = self.first_unstored
        self._sent.clear()
        self._received = 0
        self._starts, self._next, self._early = [0], [0], set()
        return self.epoch

    @property
    def done(self) -> bool:
        return self.total is not None and self.first_unstored >= self.total

    @property
    def stored(self) -> int:
        return self.first_unstored + len(self._stored_above)
