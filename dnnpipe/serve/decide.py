"""serve's decisions as a pure function: state and one event in, the new state and actions out.

When to re-plan, which plan, what to push ahead of time and when to switch are decided here, without processes,
sockets or clocks (the planner is passed in), so every rule is unit-tested on plain values; the controller
(dnnpipe.serve.controller) only carries the actions out.

    Lost(devices)        -> Switch(abort=True) to the plan without them (the contingency plan computed ahead
                            of time when one device is lost), or GiveUp when no plan can serve the rest; an idle
                            device: Prepare the plans for a loss again when one of them used it
    Joined(devices)      -> Switch(abort=False) when the plan with them beats the running one by the threshold
    Measured(speeds)     -> the same for devices measured slower or faster than believed
    Switched             -> Prepare the sub-models of every single-device-loss plan (pushed in the background)

uncovered() says which of those are not loaded yet (serve says when none are: ready for a loss).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import AbstractSet, Callable, Iterable, Mapping, Optional, Sequence, Union

from .detect import worth_switching

Stages = tuple[tuple[int, int, int], ...]  # (first unit, last unit, device), in pipeline order
Placed = tuple[int, tuple[int, int]]  # (device, (first unit, last unit)): a stage's sub-model where an agent holds it
Loaded = Mapping[int, AbstractSet[tuple[int, int]]]  # device -> the units of the sub-models its agent has loaded


@dataclass(frozen=True)
class Proposal:
    """A plan the planner offers: its stages, bottleneck and the running plan's bottleneck under the same
    cluster (None when the running plan cannot run any more)."""

    stages: Stages
    bottleneck_ms: float
    throughput: float
    running_ms: Optional[float] = None


Planner = Callable[[frozenset[int], Mapping[int, float]], Optional[Proposal]]  # (absent devices, speeds) -> plan


@dataclass(frozen=True)
class State:
    stages: Stages  # the running plan
    devices: frozenset[int]  # devices with an agent up
    absent: frozenset[int]  # devices of the config that cannot be planned on (lost, or not in the registry)
    speeds: Mapping[int, float] = field(default_factory=dict)  # device -> the speed the planner assumes
    contingency: Mapping[int, Proposal] = field(default_factory=dict)  # device lost -> plan, computed ahead
    threshold: float = 0.10


@dataclass(frozen=True)
class Lost:
    devices: frozenset[int]
    reason: str
    label: str = "lost"  # lost or frozen (for ServeEvents.replanned)


@dataclass(frozen=True)
class Joined:
    devices: frozenset[int]


@dataclass(frozen=True)
class Measured:
    speeds: Mapping[int, float]  # devices whose speed settled away from the belief: their new speed


@dataclass(frozen=True)
class Switched:
    """A switch finished (or the run started): time to compute the next contingency plans."""


Event = Union[Lost, Joined, Measured, Switched]


@dataclass(frozen=True)
class Switch:
    stages: Stages
    throughput: float
    reason: str
    label: str  # lost, frozen, slower, faster, joined
    abort: bool  # True: cut the running plan now and replay (a device is gone); False: switch at a barrier


@dataclass(frozen=True)
class Prepare:
    """Cut and push this stage's sub-model to its device ahead of time."""

    device: int
    units: tuple[int, int]


@dataclass(frozen=True)
class GiveUp:
    reason: str


Action = Union[Switch, Prepare, GiveUp]


def decide(state: State, event: Event, planner: Planner) -> tuple[State, list[Action]]:
    if isinstance(event, Lost):
        return _lost(state, event, planner)
    if isinstance(event, Joined):
        new = replace(state, devices=state.devices | event.devices, absent=state.absent - event.devices)
        return _consider(new, planner, f"device {device_names(event.devices)} joined", "joined")
    if isinstance(event, Measured):
        label = "slower" if any(c < state.speeds.get(d, c + 1) for d, c in event.speeds.items()) else "faster"
        new = replace(state, speeds={**state.speeds, **event.speeds})
        reason = "measured speed " + ", ".join(f"device {d} {c:.3g}" for d, c in sorted(event.speeds.items()))
        return _consider(new, planner, reason, label)
    plans = contingencies(state, planner)
    return replace(state, contingency=plans), prepares(plans.values())


def _lost(state: State, event: Lost, planner: Planner) -> tuple[State, list[Action]]:
    new = replace(state, devices=state.devices - event.devices, absent=state.absent | event.devices)
    running = {d for _, _, d in state.stages}
    if not running & event.devices:  # an idle device: nothing to switch, but a plan for a loss may have used it
        if not any(d in event.devices for plan in state.contingency.values() for _, _, d in plan.stages):
            return new, []
        plans = contingencies(new, planner)
        return replace(new, contingency=plans), prepares(plans.values())
    [device] = event.devices if len(event.devices) == 1 else [None]
    proposal = state.contingency.get(device) if device is not None else None
    if proposal is None:
        proposal = planner(new.absent, new.speeds)
    if proposal is None:
        left = sorted(new.devices - new.absent)
        return new, [GiveUp(f"no plan can serve the remaining devices {left or 'none'}")]
    return replace(new, stages=proposal.stages, contingency={}), \
        [Switch(proposal.stages, proposal.throughput, event.reason, event.label, abort=True)]


def _consider(state: State, planner: Planner, reason: str, label: str) -> tuple[State, list[Action]]:
    proposal = planner(state.absent, state.speeds)
    if proposal is None or proposal.stages == state.stages or not worth_switching(
            proposal.running_ms, proposal.bottleneck_ms, state.threshold):
        return state, []
    return replace(state, stages=proposal.stages, contingency={}), \
        [Switch(proposal.stages, proposal.throughput, reason, label, abort=False)]


def contingencies(state: State, planner: Planner) -> dict[int, Proposal]:
    """For each device of the running plan, the plan without it (the planner takes milliseconds; this runs in
    the background after a switch, so a loss needs no planning)."""
    plans = {}
    for _, _, device in state.stages:
        proposal = planner(state.absent | {device}, state.speeds)
        if proposal is not None:
            plans[device] = proposal
    return plans


def placed(stages: Stages) -> list[Placed]:
    """Each stage as (device, units), in pipeline order."""
    return [(d, (s, e)) for s, e, d in stages]


def loss_placed(state: State) -> set[Placed]:
    """Every stage of the plans for a loss, as (device, units)."""
    return {p for plan in state.contingency.values() for p in placed(plan.stages)}


def not_loaded(wanted: Iterable[Placed], loaded: Loaded) -> list[Placed]:
    return [(d, units) for d, units in wanted if units not in loaded.get(d, set())]


def crowded(wanted: Iterable[Placed], limit: int) -> set[int]:
    """Devices these stages want more sub-models loaded on than an agent keeps (`limit`): pushing one of them
    again would only make the agent drop another."""
    counts = Counter(d for d, _ in set(wanted))
    return {d for d, n in counts.items() if n > limit}


def prepares(plans: Iterable[Proposal]) -> list[Action]:
    """Every stage of these plans, once per (device, units)."""
    seen = dict.fromkeys(p for proposal in plans for p in placed(proposal.stages))
    return [Prepare(device, units) for device, units in seen]


def next_push(deferred: Sequence[Prepare], state: State, loaded: Loaded
              ) -> tuple[Optional[Prepare], list[Prepare], list[Prepare]]:
    """The next contingency sub-model to push, the pushes still deferred after it and the stale ones let go.

    A deferred push is still wanted when its device is up, its units are not loaded there (a loss meanwhile may
    have pushed them on its critical path) and it is a stage of a plan for a loss of the running plan (a switch
    since it was deferred replaced those plans). The controller pushes one at a time, once a switch is over."""
    wanted = loss_placed(state)
    stale: list[Prepare] = []
    for k, action in enumerate(deferred):
        if ((action.device, action.units) in wanted and action.device in state.devices - state.absent
                and action.units not in loaded.get(action.device, set())):
            return action, list(deferred[k + 1:]), stale
        stale.append(action)
    return None, [], stale


def uncovered(state: State, loaded: Loaded) -> list[Placed]:
    """The stages of the plans for a loss not yet loaded on their devices. Until there are none, losing a device
    of the running plan means a cut and a push on the recovery's critical path."""
    return sorted(not_loaded(loss_placed(state), loaded))


def device_names(devices: Iterable[int]) -> str:
    """1, 2 and 4: devices as a sentence names them."""
    ordered = [str(d) for d in sorted(devices)]
    return ", ".join(ordered[:-1]) + " and " + ordered[-1] if len(ordered) > 1 else "".join(ordered)


def staying_links(old: Sequence[int], new: Sequence[int]) -> list[bool]:
    """For each link of the new plan's chain (controller -> its devices in order -> controller), whether the
    link of the plan before goes on carrying it (NEXT) instead of a new one being dialled: when the chain up to
    and including the link's receiving end is the same in both. Then every link before it stays too, so each
    carries the old plan's END ahead of the new plan's first frame and no new frame waits behind old ones it
    could have passed on a link of its own (a new plan that reaches a device by another way may)."""
    old_chain, new_chain = [0, *old, 0], [0, *new, 0]
    return [old_chain[:j + 2] == new_chain[:j + 2] for j in range(len(new) + 1)]
