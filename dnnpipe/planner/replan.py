"""Re-planning online: a running plan, a changed cluster, the new optimal plan and what has to move.

Devices keep their ids: a removed device is left out of the problem and the result is mapped back.
If the running plan is still feasible and still optimal it is kept, so nothing moves for nothing.
The model's legal cuts (model_config.cuts) carry over: the new plan, like any, ends stages only there,
and a running plan that does not is not kept.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional, Sequence

import numpy as np

from ..config import ConfigSource, load_config
from ..errors import ConfigError
from .plan import Plan, make_plan
from .problem import Problem


@dataclass(frozen=True)
class Replan:
    plan: Plan  # the new optimal plan (device ids as in the config)
    moved: list[list[int]]  # stages of the new plan that were not running exactly so
    kept: list[list[int]]  # stages that stay as they are
    units_moved: int  # units that now run on another device
    previous_bottleneck: Optional[float]  # the running plan under the new cluster, None if it cannot run

    def describe(self) -> str:
        before = ("the running plan cannot run any more" if self.previous_bottleneck is None else
                  f"the running plan would now take {self.previous_bottleneck:.4f} ms")
        return (f"new bottleneck {self.plan.bottleneck:.4f} ms ({before}); {len(self.moved)} of "
                f"{len(self.plan.stages)} stages change, {self.units_moved} units move")


@dataclass(frozen=True)
class ClusterChange:
    removed: frozenset[int] = frozenset()  # device ids that left
    speeds: Mapping[int, float] = field(default_factory=dict)  # device id -> new C
    memory: Mapping[int, float] = field(default_factory=dict)  # device id -> new M (MB)


def changed_problem(problem: Problem, change: ClusterChange) -> tuple[Problem, list[int]]:
    """The problem over the remaining devices, and each remaining device's id."""
    unknown = sorted((set(change.removed) | set(change.speeds) | set(change.memory)) - set(range(1, problem.N + 1)))
    if unknown:
        raise ConfigError(f"device {unknown[0]} is not in the cluster (devices 1..{problem.N})")
    ids = [d for d in range(1, problem.N + 1) if d not in change.removed]
    if not ids:
        raise ConfigError("every device was removed")
    speed, capacity = problem.speed.copy(), problem.capacity.copy()
    for d, value in change.speeds.items():
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"device {d}: speed must be a finite number > 0, got {value}")
        speed[d - 1] = value
    for d, value in change.memory.items():
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"device {d}: memory must be a finite number >= 0, got {value}")
        capacity[d - 1] = value
    keep = np.array(ids) - 1
    # A device's link CPU is in its own ms: a device that slows down takes as much longer for it as for its compute.
    link_cpu = None if problem.link_cpu is None else (problem.link_cpu * (problem.speed / speed)[None, :])[:, keep]
    return replace(problem, speed=speed[keep], capacity=capacity[keep], time_prefix=problem.time_prefix[keep],
                   link_mbps=None if problem.link_mbps is None else problem.link_mbps[keep],
                   link_matrix=None if problem.link_matrix is None else problem.link_matrix[np.ix_(keep, keep)],
                   link_cpu=link_cpu), ids


def replan(config: ConfigSource, running: Sequence[Sequence[int]], change: ClusterChange,
           algorithm: Optional[str] = None) -> Replan:
    from . import solve_problem

    started = time.perf_counter()
    problem, ids = changed_problem(Problem.from_config(load_config(config)), change)
    check_running(running, problem.U)
    index = {d: i for i, d in enumerate(ids)}
    fresh = solve_problem(problem, algorithm)
    previous = None
    if all(d in index for _, _, d in running):
        try:
            old = make_plan(problem, [(s - 1, e, index[d]) for s, e, d in running], "running")
            previous = old.bottleneck
        except ValueError:  # no longer fits (memory changed) or does not cover the model
            old = None
        if old is not None and old.bottleneck <= fresh.bottleneck:
            fresh = replace(old, algorithm=fresh.algorithm)  # still optimal: keep it, move nothing
    stages = [[s, e, ids[d - 1]] for s, e, d in fresh.stages]
    result = replace(fresh, stages=stages, planning_time_ms=(time.perf_counter() - started) * 1000,
                     stage_capacity_mb=[float(problem.capacity[index[d]]) for _, _, d in stages])
    running_set = {tuple(s) for s in running}
    moved = [s for s in stages if tuple(s) not in running_set]
    return Replan(result, moved, [s for s in stages if tuple(s) in running_set],
                  int(np.sum(_owner(stages, problem.U) != _owner(running, problem.U))), previous)


def check_running(running: Sequence[Sequence[int]], U: int) -> None:
    """The running plan must cover units 1..U in order before anything is indexed by it."""
    expected = 1
    for i, (start, end, _) in enumerate(running):
        if start != expected or not start <= end <= U:
            raise ConfigError(f"running plan: stage {i + 1} covers units {start}-{end}, but the stages must cover "
                              f"units 1-{U} of this config in order (a plan for another model or config?)")
        expected = end + 1
    if expected != U + 1:
        raise ConfigError(f"running plan: covers units 1-{expected - 1}, the config has {U} units")


def _owner(stages: Sequence[Sequence[int]], U: int) -> np.ndarray:
    """The device of every unit (0 where none)."""
    owner = np.zeros(U + 1, dtype=int)
    for s, e, d in stages:
        owner[s:e + 1] = d
    return owner[1:]
