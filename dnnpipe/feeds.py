"""Where serve's inputs come from and where their results go, and what it tells the world while it runs.

The controller is written against these two protocols only, so the same adaptive pipeline serves an HDF5 file
(DATA in, OUT written in input order) and live requests (the inference service's front door). Inputs are numbered
0, 1, 2, ... in arrival order; the ledger may ask for an input again (a replay after a switch) until its result
was delivered, so a feed keeps every input until then.
"""

from __future__ import annotations

from typing import Optional, Protocol

import numpy as np


class Feed(Protocol):
    def wait_input(self, index: int, timeout: float) -> Optional[list[np.ndarray]]:
        """Input `index` (one array per manifest input, in the manifest's order, without a batch dimension:
        real-valued, or already of the wire's dtype), waiting up to `timeout` seconds for it to arrive; None when
        it has not arrived yet or never will (see `exhausted`)."""
        ...

    def exhausted(self, index: int) -> bool:
        """True once no input `index` will ever come (the end of a file; a service that is draining)."""
        ...

    def deliver(self, index: int, outputs: list[np.ndarray]) -> None:
        """Input `index`'s result (real-valued, one array per manifest output): called exactly once per index."""
        ...

    def abandon(self, index: int, reason: str) -> None:
        """Input `index` cannot be served (no plan can serve the devices left): at most once, never after
        `deliver`."""
        ...


class ServeEvents(Protocol):
    """What the controller reports as it runs (metrics and readiness); every call is cheap and never raises."""

    def ready(self, up: bool) -> None:
        """True while every stage of the running plan is up and answering; False during a switch or a fault."""
        ...

    def devices_up(self, count: int) -> None: ...

    def replanned(self, reason: str) -> None:
        """One re-plan; `reason` is a short, low-cardinality label: lost, frozen, slower, faster, joined."""
        ...

    def recovered(self, seconds: float) -> None:
        """From a fault's detection to the first new result."""
        ...

    def ready_for_loss(self, ready: bool) -> None:
        """True while the plan for the loss of each device of the running plan is loaded ahead on its devices
        (a loss then needs no cut or push, only the switch)."""
        ...

    def stage_time(self, stage: int, device: int, seconds: float) -> None:
        """One frame's compute time on a stage, as its device reported it."""
        ...


class NoEvents:
    """ServeEvents that are dropped (the file mode without metrics)."""

    def ready(self, up: bool) -> None:
        pass

    def devices_up(self, count: int) -> None:
        pass

    def replanned(self, reason: str) -> None:
        pass

    def recovered(self, seconds: float) -> None:
        pass

    def ready_for_loss(self, ready: bool) -> None:
        pass

    def stage_time(self, stage: int, device: int, seconds: float) -> None:
        pass
