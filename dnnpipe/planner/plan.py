"""The result of planning as plain data, and the reasons a plan may not exist."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import NoPlanError
from .problem import Problem

Cut = tuple[int, int, int]  # (j, k, d): units j+1..k on device d (0-based device)


@dataclass(frozen=True)
class Solution:
    """What an algorithm returns: the stages as cuts, and how many DP transitions it evaluated."""

    cuts: tuple[Cut, ...]
    transitions: int
    canonical: bool = False  # already the tie-break rule's plan (the bisections end with its probe)


@dataclass(frozen=True)
class Plan:
    """A pipeline plan: stages in pipeline order, 1-based units (inclusive) and device ids."""

    stages: list[list[int]]
    stage_times_ms: list[float]
    stage_memory_mb: list[float]
    stage_capacity_mb: list[float]
    bottleneck: float
    ideal_ms: float
    algorithm: str
    transitions: int = 0
    planning_time_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Predicted inferences per second: one result per bottleneck interval."""
        return 1000.0 / self.bottleneck if self.bottleneck > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        return {
            "pipeline_plan": self.stages,
            "bottleneck_ms": self.bottleneck,
            "algorithm": self.algorithm,
            "planning_time_ms": self.planning_time_ms,
            "ideal_ms": self.ideal_ms,
            "stage_times_ms": self.stage_times_ms,
            "stage_memory_mb": self.stage_memory_mb,
            "transitions": self.transitions,
            **self.extra,
        }


def make_plan(problem: Problem, cuts: Sequence[Cut], algorithm: str, transitions: int = 0,
              planning_time_ms: float = 0.0) -> Plan:
    """Turn cuts into a Plan, recomputing every number from the problem (never trusting the solver)."""
    check_cuts(problem, cuts)
    periods, input_hop = problem.periods(cuts)
    extra = {}
    if problem.has_links:
        extra = {"compute_ms": [problem.stage_time(*c) for c in cuts], "input_hop_ms": input_hop,
                 "output_hop_ms": [problem.hop_ms(k, d, cuts[i + 1][2] if i + 1 < len(cuts) else None)
                                   for i, (_, k, d) in enumerate(cuts)]}
    if problem.link_cpu is not None:
        extra["link_cpu_ms"] = [problem.link_cpu_ms(*c) for c in cuts]
    return Plan(
        stages=[[j + 1, k, d + 1] for j, k, d in cuts],
        stage_times_ms=periods,
        stage_memory_mb=[problem.stage_memory(j, k) for j, k, _ in cuts],
        stage_capacity_mb=[float(problem.capacity[d]) for _, _, d in cuts],
        bottleneck=bottleneck_of(problem, cuts),
        ideal_ms=problem.ideal_ms,
        algorithm=algorithm,
        transitions=transitions,
        planning_time_ms=planning_time_ms,
        extra=extra,
    )


def bottleneck_of(problem: Problem, cuts: Sequence[Cut]) -> float:
    """The largest period or input hop, with the plan's own arithmetic."""
    periods, input_hop = problem.periods(cuts)
    return max([*periods, input_hop])


def check_cuts(problem: Problem, cuts: Sequence[Cut]) -> None:
    """Raise ValueError unless the cuts cover all units in order, on distinct devices, within memory,
    each stage ending at a legal cut."""
    if not cuts:
        raise ValueError("a plan needs at least one stage")
    expected = 0
    legal = set(problem.ends.tolist())
    for j, k, d in cuts:
        if j != expected or k <= j:
            raise ValueError(f"stage ({j}, {k}] does not continue from unit {expected}")
        if k not in legal:
            raise ValueError(f"a stage ends after unit {k}, which is not a legal cut (model_config.cuts)")
        if not 0 <= d < problem.N:
            raise ValueError(f"device {d + 1} does not exist")
        if not problem.fits(j, k, d):
            raise ValueError(f"units {j + 1}..{k} need {problem.stage_memory(j, k):.1f} MB, "
                             f"device {d + 1} has {problem.capacity[d]:.1f} MB")
        expected = k
    if expected != problem.U:
        raise ValueError(f"plan ends at unit {expected}, the model has {problem.U}")
    devices = [d for _, _, d in cuts]
    if len(set(devices)) != len(devices):
        raise ValueError(f"a device is used twice: {[d + 1 for d in devices]}")


def explain_no_plan(problem: Problem) -> NoPlanError:
    """Say why the memory constraints admit no plan, most specific reason first."""
    R = np.diff(problem.memory_prefix)
    biggest = float(problem.capacity.max())
    largest_device = int(problem.capacity.argmax()) + 1
    too_big = [u for u in range(problem.U) if R[u] > biggest]
    if too_big:
        u = too_big[0]
        more = f" (and {len(too_big) - 1} more units)" if len(too_big) > 1 else ""
        return NoPlanError(f"unit {u + 1} needs {R[u]:.1f} MB, more than any device has "
                           f"(largest: {biggest:.1f} MB on device {largest_device}){more}")
    if problem.cuts is not None:
        starts = np.concatenate(([0], problem.ends[:-1]))
        needs = problem.memory_prefix[problem.ends] - problem.memory_prefix[starts]
        if needs.max() > biggest:
            i = int(np.argmax(needs > biggest))
            return NoPlanError(f"units {starts[i] + 1}..{problem.ends[i]} lie between two legal cuts "
                               f"(model_config.cuts) and need {needs[i]:.1f} MB together, more than any device has "
                               f"(largest: {biggest:.1f} MB on device {largest_device})")
    total, capacity = float(problem.memory_prefix[-1]), float(problem.capacity.sum())
    if total > capacity:
        return NoPlanError(f"the model needs {total:.1f} MB in total but all {problem.N} devices "
                           f"together have {capacity:.1f} MB")
    return NoPlanError(f"the {problem.U} units cannot be split into at most {problem.N} contiguous "
                       f"stages that each fit a distinct device's memory (model: {total:.1f} MB, "
                       f"devices: {capacity:.1f} MB in total)")
