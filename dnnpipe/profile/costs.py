"""What a profile is, whoever measured it (a Keras model or a .tflite file): unit costs, checks, the config."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from ..interpreter import call_seconds, prepared_invoke

MIB = float(1 << 20)
SUM_TOLERANCE = 0.15


@dataclass(frozen=True)
class UnitCost:
    name: str
    time_ms: float
    weights_mb: float
    activations_mb: float

    @property
    def memory_mb(self) -> float:
        return self.weights_mb + self.activations_mb


@dataclass(frozen=True)
class ModelProfile:
    units: tuple[UnitCost, ...]
    whole_ms: float  # the whole model in one invoke
    probe_ms: float  # an empty signature's invoke: the fixed cost removed from each unit
    cut_bytes: tuple[int, ...] = ()  # A: bytes crossing the cut after unit j, j = 0..U
    cuts: Optional[tuple[int, ...]] = None  # inner cuts a plan may end at (Keras: legal cuts); None: not known

    @property
    def E(self) -> list[float]:
        return [u.time_ms for u in self.units]

    @property
    def R(self) -> list[float]:
        return [u.memory_mb for u in self.units]

    @property
    def sum_gap(self) -> float:
        """Relative difference between the sum of unit times and the whole model's time."""
        return sum(self.E) / self.whole_ms - 1 if self.whole_ms > 0 else 0.0

    def check(self) -> str:
        verdict = "within" if abs(self.sum_gap) <= SUM_TOLERANCE else "WARNING: outside"
        return (f"sum of unit times {sum(self.E):.2f} ms vs whole model {self.whole_ms:.2f} ms "
                f"({self.sum_gap:+.1%}, {verdict} {SUM_TOLERANCE:.0%})")


def time_invoke(runner, feed: dict[str, np.ndarray], repeats: int, warmup: int) -> float:
    """Median ms of the interpreter's invoke alone, inputs set once beforehand."""
    return statistics.median(call_seconds(prepared_invoke(runner, feed, warmup), repeats)) * 1000


def shared(together: float, alone: Sequence[float]) -> list[float]:
    """A fused group's time shared among its units in proportion to their own times (evenly if all are 0)."""
    total = sum(alone)
    if total <= 0:
        return [together / len(alone)] * len(alone)
    return [together * ms / total for ms in alone]


def unit_times(probe_ms: float, units_ms: Sequence[float], groups_ms: Mapping[tuple[int, int], float]) -> list[float]:
    """Each unit's time without the probe's fixed cost, the units between two legal cuts (i..k] given their fused
    group's time shared (profiler.py says why): the host's E and each device's row, computed alike (pure)."""
    times = [max(0.0, ms - probe_ms) for ms in units_ms]
    for (i, k), ms in sorted(groups_ms.items()):
        times[i:k] = shared(max(0.0, ms - probe_ms), times[i:k])
    return times


def config_from(profile: ModelProfile, devices: dict) -> dict:
    model = {"U": len(profile.units), "E": [round(e, 6) for e in profile.E], "R": [round(r, 6) for r in profile.R]}
    if profile.cut_bytes:
        model["A"] = list(profile.cut_bytes)
    return {"device_config": devices, "model_config": model}


def describe(profile: ModelProfile, top: int = 5) -> str:
    lines = [f"{len(profile.units)} units, whole model {profile.whole_ms:.2f} ms, memory {sum(profile.R):.1f} MiB",
             profile.check(), "costliest units:"]
    for unit in sorted(profile.units, key=lambda u: -u.time_ms)[:top]:
        lines.append(f"  {unit.name:<32} {unit.time_ms:8.3f} ms {unit.memory_mb:8.2f} MiB")
    return "\n".join(lines)
