"""The pacing model: each emulated stage's planned time and each hop's link time, from the config (pure).

A stage holding units a..b on device d takes sum(E[a..b]) / C[d] ms, or the sum of row d of E_device
(docs/config.md). Shipping cut b to the next stage's device e takes A[b] * 8e-3 / B_link[d][e] ms (without a
B_link matrix min(B[d], B[e])), and
the runtime sends while it computes, so a stage's period is max(compute, hop) and the pipeline's the
largest of those. On one host every time is divided by a common scale (speeds and bandwidths both times
scale), so the emulated cluster leaves the host room to compute each stage within its planned time.
The input and the result do not cross a link in the runtime (the first device reads its own copy of the
inputs, the last writes results locally), so the plan's input and output hops are not part of the period (the
CPU to take in an input and pass on a result is: config.stage_link_cpu_ms).

The paper's model counts no CPU for the links. On a board of one core or less (every board of the virtual
fleet) receiving and sending a cut take CPU from the same budget as the compute (TLS included), so compute and
send do not overlap: given each device's measured link CPU (device_config.link_cpu, written by per-device
profiling) a stage's period is max(receive + compute + send + frame, hop), frame being the stage's own CPU per
frame whatever its size (its threads' hand-offs, the frames' headers, waking on its sockets). The planner plans
with the very same stage times and hops: both take them from config (time_prefix, stage_compute_ms,
stage_link_cpu_ms, stage_cpu_ms, hop_ms, Cluster.pair_mbps), the one place that computes them. Without link CPU
the period is the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..config import Config, hop_ms, stage_compute_ms, stage_cpu_ms, stage_link_cpu_ms, time_prefix
from ..errors import ConfigError

HOST_SHARE = 0.25  # the emulated cluster's compute may use at most this share of the usable cores


@dataclass(frozen=True)
class StagePace:
    stage: int
    device: int
    units: tuple[int, int]
    compute_ms: float  # on the emulated device
    hop_ms: float  # its output cut to the next stage's device (0 for the last stage or without B and A)
    link_cpu_ms: float = 0.0  # the device's CPU receiving its input cut, sending its output cut, per frame (measured)

    @property
    def period_ms(self) -> float:
        return max(stage_cpu_ms(self.compute_ms, self.link_cpu_ms), self.hop_ms)

    @property
    def paper_period_ms(self) -> float:
        """The paper's cost model: links cost no device CPU."""
        return max(self.compute_ms, self.hop_ms)


@dataclass(frozen=True)
class Emulation:
    scale: float  # every speed and bandwidth times this; every time divided by it
    stages: tuple[StagePace, ...]
    link_mbps: Optional[tuple[float, ...]]  # each device's emulated bandwidth, or None: links not shaped

    @property
    def period_ms(self) -> float:
        return max(s.period_ms for s in self.stages)

    @property
    def throughput(self) -> float:
        return 1000.0 / self.period_ms

    @property
    def paper_throughput(self) -> float:
        """What the paper's cost model predicts (no CPU for the links); equal to throughput without link CPU."""
        return 1000.0 / max(s.paper_period_ms for s in self.stages)

    @property
    def devices(self) -> list[int]:
        return [s.device for s in self.stages]

    def pace_ms(self) -> list[float]:
        return [s.compute_ms for s in self.stages]


def device_ms(config: Config, units: tuple[int, int], device: int) -> float:
    """Units a..b (1-based, inclusive) on device d of the real cluster, ms, as the planner computes it."""
    start, end = units
    speed, rows = config.unit_times()
    prefix = time_prefix(rows[device - 1:device])[0]
    return float(stage_compute_ms(prefix, speed[device - 1], start - 1, end))


def speeds(config: Config) -> list[float]:
    """Each device's speed relative to E: C, or sum(E) / sum(E_device row) when rows are given."""
    if config.profile.E_device is None:
        return list(config.cluster.C)
    whole = (1, config.profile.U)
    return [sum(config.profile.E) / device_ms(config, whole, d) for d in range(1, config.cluster.N + 1)]


def emulation_scale(config: Config, cores: float) -> float:
    """One factor for every emulated speed and bandwidth, so the emulated cluster fits this host.

    Each stage computes on this host (E is the host's own profile) and then waits out the rest of its
    planned time: a cluster with sum(C) = 1.75 would need 1.75 cores for compute alone. The factor keeps
    that within a quarter of the usable cores, so each stage computes well inside its planned time even
    when stages compute at once. It leaves the plan and the speed-up unchanged.
    """
    return min(1.0, cores * HOST_SHARE / sum(speeds(config)))


def link_cpu_ms(config: Config, units: tuple[int, int], device: int) -> float:
    """Units a..b (1-based) on device d: its CPU beyond its compute, from the config's measured link CPU, as the
    planner counts it (config.stage_link_cpu_ms: the first stage takes in the model's input, the last passes on
    its result)."""
    link_cpu, A = config.cluster.link_cpu, config.profile.A
    if link_cpu is None or A is None:
        return 0.0
    start, end = units
    return float(stage_link_cpu_ms(link_cpu.device(device - 1), A, start - 1, end))


def emulation(config: Config, stages: Sequence[Sequence[int]], scale: float) -> Emulation:
    """The paced pipeline for plan stages [[start, end, device], ...] at the given scale. With the config's link
    CPU (device_config.link_cpu, measured on the emulated device itself, so not scaled) each stage also pays its
    links' CPU, as the planner counts it."""
    B, A = config.cluster.B, config.profile.A
    paces = []
    for k, (start, end, device) in enumerate(stages):
        if not (1 <= start <= end <= config.profile.U and 1 <= device <= config.cluster.N):
            raise ConfigError(f"{config.source}: stage {k + 1} (units {start}-{end} on device {device}) does not "
                              f"fit its {config.profile.U} units and {config.cluster.N} devices (re-partition "
                              f"after re-planning)")
        hop = 0.0
        if B is not None and A is not None and k + 1 < len(stages):
            hop = hop_ms(A[end], config.cluster.pair_mbps(device - 1, stages[k + 1][2] - 1))
        paces.append(StagePace(k + 1, device, (start, end), device_ms(config, (start, end), device) / scale,
                               hop / scale, link_cpu_ms(config, (start, end), device)))
    link = None if B is None else tuple(b * scale for b in B)
    return Emulation(scale, tuple(paces), link)


def fastest_device(config: Config) -> int:
    """The device that runs the whole model soonest, its CPU per frame included (the single-device comparison)."""
    whole = (1, config.profile.U)
    return min(range(1, config.cluster.N + 1),
               key=lambda d: stage_cpu_ms(device_ms(config, whole, d), link_cpu_ms(config, whole, d)))
