"""Pure planning: config in, optimal pipeline plan out. Imports neither TensorFlow nor files beyond config."""

from __future__ import annotations

import time
from typing import Callable, Optional

from ..config import ConfigSource, load_config
from ..errors import ConfigError
from . import bisect, dp, links, pipeedge
from .plan import Plan, Solution, make_plan, explain_no_plan
from .problem import Problem

__all__ = ["ALGORITHMS", "Plan", "Problem", "plan", "solve_problem"]

Solver = Callable[[Problem], Optional[Solution]]

ALGORITHMS: dict[str, Solver] = {
    "dnnpipe": lambda problem: dp.solve(problem, prune=True),
    "exhaustive": lambda problem: dp.solve(problem, prune=False),
    "pipeedge": pipeedge.solve,
    "bisect": bisect.solve,
    "links": links.solve,
}
DEFAULT = "bisect"  # exact and fastest everywhere measured (benchmarks/planner.py)
LINK_AWARE = {"links"}  # the algorithms that model link bandwidth (device_config.B)


def plan(config: ConfigSource, algorithm: Optional[str] = None) -> Plan:
    """The optimal pipeline plan for a config (path, parsed dict or Config); raises NoPlanError.

    By default: 'bisect', or 'links' when the config describes links (device_config.B).
    """
    return solve_problem(Problem.from_config(load_config(config)), algorithm)


def solve_problem(problem: Problem, algorithm: Optional[str] = None) -> Plan:
    algorithm = algorithm or ("links" if problem.has_links else DEFAULT)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if problem.has_links and algorithm not in LINK_AWARE:
        raise ConfigError(f"algorithm {algorithm!r} ignores link bandwidth (device_config.B); use "
                          f"{' or '.join(sorted(LINK_AWARE))}, or remove B and A from the config")
    if algorithm in LINK_AWARE and not problem.has_links:
        raise ConfigError(f"algorithm {algorithm!r} needs device_config.B and model_config.A")
    started = time.perf_counter()
    solution = ALGORITHMS[algorithm](problem)
    elapsed_ms = (time.perf_counter() - started) * 1000
    if solution is None:
        raise explain_no_plan(problem)
    return make_plan(problem, solution.cuts, algorithm, solution.transitions, elapsed_ms)
