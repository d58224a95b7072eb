"""Pure planning: config in, optimal pipeline plan out. Imports neither TensorFlow nor files beyond config."""

from __future__ import annotations

import time
from typing import Callable, Optional

from ..config import ConfigSource, load_config
from . import bisect, dp, pipeedge
from .plan import Plan, Solution, make_plan, explain_no_plan
from .problem import Problem

__all__ = ["ALGORITHMS", "Plan", "Problem", "plan", "solve_problem"]

Solver = Callable[[Problem], Optional[Solution]]

ALGORITHMS: dict[str, Solver] = {
    "dnnpipe": lambda problem: dp.solve(problem, prune=True),
    "exhaustive": lambda problem: dp.solve(problem, prune=False),
    "pipeedge": pipeedge.solve,
    "bisect": bisect.solve,
}


def plan(config: ConfigSource, algorithm: str = "dnnpipe") -> Plan:
    """The optimal pipeline plan for a config (path, parsed dict or Config); raises NoPlanError."""
    return solve_problem(Problem.from_config(load_config(config)), algorithm)


def solve_problem(problem: Problem, algorithm: str = "dnnpipe") -> Plan:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    started = time.perf_counter()
    solution = ALGORITHMS[algorithm](problem)
    elapsed_ms = (time.perf_counter() - started) * 1000
    if solution is None:
        raise explain_no_plan(problem)
    return make_plan(problem, solution.cuts, algorithm, solution.transitions, elapsed_ms)
