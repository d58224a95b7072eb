"""What the agents' heartbeats say about the devices' speed: how fast each really is.

Pure functions over plain state (times are passed in), so the rules are tested without processes.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence


@dataclass(frozen=True)
class SpeedModel:
    """How measured stage times become speeds (Section 3.1's C, measured instead of profiled)."""

    window: int = 32  # per device, the median of its last `window` stage times (smoothing)
    min_frames: int = 16  # frames in the window before it counts
    band: float = 0.5  # hysteresis: how far beyond the expected bottleneck a stage must be to count as slow (on a
    # shared 2-core host a stage's compute alone wanders by a third; a 4x slowdown is +300%)
    recent_ms: float = 200.0  # ... or, when its last frames are all slower than that median, the fastest of them:
    recent_min: int = 4  # the last frames that cover `recent_ms` of stage time, at least `recent_min` of them.
    # A real slowdown shows in every new frame at once, while host noise slows a few in a row at most (the dwell
    # still applies). Counted in time, a fast stage still needs a run of frames as long as before (8 of 25 ms) and
    # a stage slowed to 110 ms a frame is seen after 4 of them, not 8: it keeps the frames' own span, not their count
    dwell: int = 5  # consecutive evaluations a device must stay out of the band before its belief changes


def stage_median(times: Sequence[float], model: SpeedModel) -> Optional[float]:
    """A stage's smoothed time: the median of its last frames (robust to the host's scheduling hiccups)."""
    recent = list(times)[-model.window:]
    return statistics.median(recent) if len(recent) >= model.min_frames else None


def recent_frames(times: Sequence[float], model: SpeedModel) -> list[float]:
    """The last frames that together took at least `recent_ms` (and are at least `recent_min`), or all of them."""
    recent: list[float] = []
    span = 0.0
    for t in reversed(times):
        recent.append(t)
        span += t
        if len(recent) >= model.recent_min and span >= model.recent_ms:
            break
    return recent


def stage_time(times: Sequence[float], model: SpeedModel) -> Optional[float]:
    """A stage's time as the speed rules see it: the window's median, or the fastest of its recent frames when even
    that is slower (every recent frame slowed: a change, not noise)."""
    median = stage_median(times, model)
    if median is None:
        return None
    return max(median, min(recent_frames(list(times)[-model.window:], model)))


def speed_outliers(predicted_ms: Mapping[int, float], measured_ms: Mapping[int, float], beliefs: Mapping[int, float],
                   profiled: Mapping[int, float], model: SpeedModel) -> dict[int, float]:
    """Devices whose speed is not what the planner believes, and the speed they now show.

    Measured times include what the profile leaves out (per-frame work, this host's other load), alike on
    every stage; that common factor, the median of measured over predicted on the other devices, is divided
    out, so only a device that differs from the others counts. A device is slow when its stage, so corrected, takes more
    than the expected bottleneck plus the band: a small stage's larger share of per-frame work never makes
    it look slow, and a slowed device that is still no bottleneck changes nothing. A device believed slower
    than profiled recovers when it runs faster than believed by more than the band (up to its profiled C).
    """
    devices = [d for d in measured_ms if d in predicted_ms and predicted_ms[d] > 0]
    if len(devices) < 2:
        return {}
    ratio = {d: measured_ms[d] / predicted_ms[d] for d in devices}
    bottleneck = max(predicted_ms[d] for d in devices)
    slow, recovered = {}, {}
    for d in devices:
        common = statistics.median(ratio[e] for e in devices if e != d)  # the others: d's own change left out
        expected, seen = predicted_ms[d] * common, measured_ms[d]
        factor = expected / seen if seen > 0 else 1.0
        if beliefs[d] < profiled[d] and factor > 1 + model.band:
            recovered[d] = (factor, min(profiled[d], beliefs[d] * factor))
        elif seen > bottleneck * common * (1 + model.band):
            slow[d] = (1 / factor, beliefs[d] * factor)
    # Only relative speeds are measurable: one device per evaluation, a recovery first (its slowness was seen
    # before), else the slowest, and the next evaluation sees the others against the revised belief.
    for found in (recovered, slow):
        if found:
            d = max(found, key=lambda e: found[e][0])
            return {d: found[d][1]}
    return {}


def worth_switching(running_ms: Optional[float], candidate_ms: float, threshold: float) -> bool:
    """Re-plan only when the new bottleneck beats the running one by more than the threshold (or the running
    plan cannot run at all)."""
    return running_ms is None or candidate_ms < running_ms / (1 + threshold)


PAUSE_SECONDS = 0.2  # a controller that could not run its threads this long may have missed two heartbeats


def listening_since(since: float, last_tick: float, now: float, pause: float = PAUSE_SECONDS) -> float:
    """When the controller last resumed listening: a tick that comes `pause` late means its process could not run
    (a stalled VM, a long GC), its heartbeat readers neither, so silence counts again from now."""
    return now if now - last_tick > pause else since


def silence(last_beat: float, now: float, since: float) -> float:
    """How long a device has been silent while the controller listened: its own pause is no device's silence.
    Seen once: all four agents of a run 'silent' for 0.7-0.8 s together, the controller's readers not running."""
    return now - max(last_beat, since)
