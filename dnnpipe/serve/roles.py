"""The "role" lines of one switch, one per agent (docs/protocol.md): a pure function of the plans, so the
controller and the tests that drive agents directly send the same roles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from .decide import Stages, staying_links

Address = tuple[str, int]  # where a device (or, for device 0, the controller's result listener) takes links


@dataclass(frozen=True)
class Running:
    """The plan that runs until the switch: its generation and its devices in order."""

    generation: int
    devices: tuple[int, ...]


def role_messages(generation: int, stages: Stages, abort: bool, running: Optional[Running],
                  address: Callable[[int], Address], pace: Callable[[int, tuple[int, int]], Optional[float]],
                  idle: Iterable[int] = ()) -> list[tuple[int, dict[str, Any]]]:
    """(device, message) for every stage of the new plan, and a role without a stage for each `idle` device.
    Behind a barrier (not `abort`), a link the running plan has too stays where decide.staying_links says so:
    the role names the running generation in `keep_from` / `keep_to`, whose link it takes over."""
    devices = [d for _, _, d in stages]
    stays = [False] * (len(stages) + 1) if abort or running is None else staying_links(running.devices, devices)
    kept = [running.generation if stay and running is not None else None for stay in stays]
    messages = []
    for k, (first, last, device) in enumerate(stages):
        to = devices[k + 1] if k + 1 < len(devices) else 0
        host, port = address(to)
        messages.append((device, {"kind": "role", "generation": generation, "stage": k + 1, "units": [first, last],
                                  "from": devices[k - 1] if k else 0, "to": to, "host": host, "port": port,
                                  "pace": pace(device, (first, last)), "abort": abort,
                                  "keep_from": kept[k], "keep_to": kept[k + 1]}))
    for device in sorted(set(idle) - set(devices)):
        messages.append((device, {"kind": "role", "generation": generation, "units": None, "abort": abort}))
    return messages
