"""What the control channel says about the devices: which one is lost, and how fast each really is.

Pure functions over plain state (times are passed in), so the rules are tested without processes.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence


@dataclass
class StageState:
    """One running stage as its control channel shows it."""

    stage: int
    device: int
    started: float  # when the controller started it (monotonic seconds)
    hello: bool = False
    last_beat: float = 0.0
    ended: Optional[str] = None  # "done", "error" (said why) or "silent" (closed without a word)
    message: str = ""
    sent: int = 0
    times: list[float] = field(default_factory=list)  # stage ms per frame not yet used for the speed estimate


def find_lost(states: Sequence[StageState], now: float, progress_timeout: float,
              connect_timeout: float) -> Optional[tuple[int, str]]:
    """The device whose stage failed first, and why; None while every stage is healthy or only reports errors
    caused by a neighbour (a neighbour's error is a symptom: the stage that went silent is the cause)."""
    for s in states:
        if s.ended == "silent":
            return s.device, (f"stage {s.stage} stopped without a word (process killed, or its device "
                              f"unreachable)")
    for s in states:
        if s.hello and s.ended is None and now - s.last_beat > progress_timeout:
            return s.device, (f"stage {s.stage} sent no heartbeat for {now - s.last_beat:.1f} s "
                              f"(frozen; --progress-timeout {progress_timeout:g})")
    for s in states:
        if not s.hello and s.ended is None and now - s.started > connect_timeout:
            return s.device, f"stage {s.stage} did not come up within {connect_timeout:g} s"
    return None


@dataclass(frozen=True)
class SpeedModel:
    """Smoothing and hysteresis of measured speeds (Section 3.1's C, measured instead of profiled)."""

    smoothing: float = 0.3  # weight of a new measurement in the moving average
    band: float = 0.25  # a belief changes only when the measurement leaves it by more than this (relative)
    min_frames: int = 5  # frames per measurement


def measured_speed(stage_ms: Sequence[float], units_ms: float) -> Optional[float]:
    """C of a device from its stage times: the stage's units take `units_ms` at C = 1."""
    if not stage_ms:
        return None
    median = statistics.median(stage_ms)
    return units_ms / median if median > 0 else None


def smooth(previous: Optional[float], measured: float, model: SpeedModel) -> float:
    return measured if previous is None else (1 - model.smoothing) * previous + model.smoothing * measured


def revised_beliefs(beliefs: Mapping[int, float], smoothed: Mapping[int, float],
                    model: SpeedModel) -> dict[int, float]:
    """The speeds the planner should now assume: a device's belief moves to its smoothed measurement only when
    the two differ by more than the band, so timing noise never changes a plan."""
    revised = dict(beliefs)
    for device, speed in smoothed.items():
        belief = beliefs.get(device)
        if belief is None or abs(speed - belief) > model.band * belief:
            revised[device] = speed
    return revised


def worth_switching(running_ms: Optional[float], candidate_ms: float, threshold: float) -> bool:
    """Re-plan only when the new bottleneck beats the running one by more than the threshold (or the running
    plan cannot run at all)."""
    return running_ms is None or candidate_ms < running_ms / (1 + threshold)
