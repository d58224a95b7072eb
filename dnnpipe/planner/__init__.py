"""Pure planning: config in, optimal pipeline plan out. Imports neither TensorFlow nor files beyond config."""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np

from ..config import ConfigSource, load_config
from ..errors import ConfigError
from . import bisection, dp, linkbisect, links, pipeedge
from .plan import Cut, Plan, Solution, bottleneck_of, explain_no_plan, make_plan
from .problem import Problem

__all__ = ["ALGORITHMS", "Plan", "Problem", "plan", "solve_problem"]

Solver = Callable[[Problem], Optional[Solution]]

ALGORITHMS: dict[str, Solver] = {
    "dnnpipe": lambda problem: dp.solve(problem, prune=True),
    "exhaustive": lambda problem: dp.solve(problem, prune=False),
    "pipeedge": pipeedge.solve,
    "bisect": bisection.solve,
    "links": links.solve,
    "bisect-links": linkbisect.solve,
}
DEFAULT = "bisect"  # exact and fastest everywhere measured (benchmarks/planner.py)
DEFAULT_LINKS = "bisect-links"  # exact and fastest with links everywhere measured (benchmarks/online.py)
LINK_AWARE = {"links", "bisect-links"}  # the algorithms that model link bandwidth (device_config.B)


def plan(config: ConfigSource, algorithm: Optional[str] = None) -> Plan:
    """The optimal pipeline plan for a config (path, parsed dict or Config); raises NoPlanError.

    By default: 'bisect', or 'bisect-links' when the config describes links (device_config.B).
    """
    return solve_problem(Problem.from_config(load_config(config)), algorithm)


def solve_problem(problem: Problem, algorithm: Optional[str] = None) -> Plan:
    """The optimal plan by one algorithm, its stages ending only at legal cuts (model_config.cuts).

    Tie-break, the same for every algorithm: among plans with the smallest bottleneck, the fewest
    devices, then the lowest device ids (sorted ids compared in order). The order of those devices
    and the cuts are then chosen by one deterministic probe at the optimum (`canonical`), so every
    algorithm returns the very same plan.
    """
    algorithm = algorithm or (DEFAULT_LINKS if problem.has_links else DEFAULT)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if problem.has_links and algorithm not in LINK_AWARE:
        cpu = " and each device's link CPU (device_config.link_cpu)" if problem.link_cpu is not None else ""
        raise ConfigError(f"algorithm {algorithm!r} ignores link bandwidth (device_config.B){cpu}; use "
                          f"{' or '.join(sorted(LINK_AWARE))}, or remove B{', link_cpu' if cpu else ''} and A from the "
                          f"config")
    if algorithm in LINK_AWARE and not problem.has_links:
        raise ConfigError(f"algorithm {algorithm!r} needs device_config.B and model_config.A")
    started = time.perf_counter()
    blocks = problem.at_cuts()
    check_table_size(blocks, algorithm)
    solution = ALGORITHMS[algorithm](blocks)
    if solution is None:
        raise explain_no_plan(problem)
    cuts = solution.cuts if solution.canonical else canonical(blocks, solution.cuts, algorithm)
    elapsed_ms = (time.perf_counter() - started) * 1000
    at = np.concatenate(([0], problem.ends))
    cuts = [(int(at[j]), int(at[k]), d) for j, k, d in cuts]
    return make_plan(problem, cuts, algorithm, solution.transitions, elapsed_ms)


TABLE_BYTES = 1 << 30  # the largest DP table the exponential algorithms may allocate (1 GiB)
# Bytes per (unit prefix, device set) entry of each exponential algorithm's tables; x N where it keeps a last device.
ENTRY_BYTES = {"dnnpipe": (13, False), "exhaustive": (13, False), "pipeedge": (21, True), "links": (14, True)}


def check_table_size(problem: Problem, algorithm: str) -> None:
    """The DP algorithms keep tables over all 2^N device sets: refuse, in one line, what would not fit."""
    if algorithm not in ENTRY_BYTES:
        return
    per_entry, per_device = ENTRY_BYTES[algorithm]

    def size(N: int) -> int:
        return (problem.U + 1) * (1 << N) * per_entry * (N if per_device else 1)

    if size(problem.N) > TABLE_BYTES:
        largest = max([n for n in range(1, problem.N) if size(n) <= TABLE_BYTES], default=0)
        need = f"{size(problem.N) / 1e6:.3g} MB" if problem.N < 64 else f"over 2^{problem.N} entries"
        raise ConfigError(f"algorithm {algorithm!r} keeps tables over all 2^N device sets: {need}"
                          f" at N={problem.N}, U={problem.U}, over its limit of {TABLE_BYTES >> 20} MiB (at most "
                          f"N={largest} here); use 'bisect' or 'bisect-links', which group identical devices")


def canonical(problem: Problem, cuts: tuple[Cut, ...], algorithm: str) -> list[Cut]:
    """The tie-break rule's plan at the bottleneck of an optimal plan `cuts`.

    One probe of the feasibility DP at that value finds the fewest devices and lowest ids. A probe just
    below it checks the algorithm: no plan may be better than the one it returned.
    """
    value = bottleneck_of(problem, cuts)
    probe = linkbisect.LinkProbe(problem) if problem.has_links else bisection.Probe(problem)
    better = probe(float(np.nextafter(value, -np.inf)))
    if better is not None:
        raise RuntimeError(f"algorithm {algorithm!r} returned bottleneck {value!r}, the probe found {better[0]!r}")
    found = probe(value)
    if found is None:
        raise RuntimeError(f"algorithm {algorithm!r} returned bottleneck {value!r}, which the probe finds infeasible")
    return found[1]
