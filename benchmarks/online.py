"""Beyond the paper: planning with link costs, and re-planning a running pipeline online.

    .venv/bin/python benchmarks/online.py

Link model: synthetic clusters with B (Mbit/s) per device and cut sizes A that rise and fall along
the model; solved by the exact 'links' DP. Re-planning: a device leaves, or the fastest device
slows to a quarter, in a running plan; solved with the default algorithm.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dnnpipe.planner import solve_problem  # noqa: E402
from dnnpipe.planner.replan import ClusterChange, replan  # noqa: E402
from planner import synthetic  # noqa: E402


def median_ms(function, repeats: int = 3):
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), result


def as_config(problem) -> dict:
    E = np.diff(problem.time_prefix[0]).tolist()
    R = np.diff(problem.memory_prefix).tolist()
    return {"device_config": {"N": problem.N, "C": problem.speed.tolist(), "M": problem.capacity.tolist()},
            "model_config": {"U": problem.U, "E": E, "R": R}}


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"{'link model':<28} {'median ms':>10} {'transitions':>12} {'bottleneck ms':>14} {'no-link ms':>11}")
    for N, U in ((4, 100), (4, 273), (6, 273), (8, 100)):
        problem = synthetic(N, U)
        links = replace(problem, link_mbps=rng.choice([100.0, 300.0, 1000.0], N),
                        cut_bytes=rng.lognormal(11, 1.0, U + 1))
        ms, result = median_ms(lambda links=links: solve_problem(links))
        plain = solve_problem(problem).bottleneck
        print(f"{f'N={N} U={U}':<28} {ms:>10.1f} {result.transitions:>12,} {result.bottleneck:>14.6f} "
              f"{plain:>11.6f}", flush=True)
    print()
    print(f"{'re-plan':<28} {'median ms':>10} {'moved stages':>12} {'units moved':>14}")
    for N, U in ((4, 273), (10, 1000), (16, 1000)):
        config = as_config(synthetic(N, U))
        running = solve_problem(synthetic(N, U)).stages
        first = running[0][2]
        for label, change in ((f"N={N} U={U}, device {first} leaves", ClusterChange(removed=frozenset({first}))),
                              (f"N={N} U={U}, device {first} slows", ClusterChange(speeds={first: 0.25}))):
            ms, result = median_ms(lambda config=config, running=running, change=change:
                                   replan(config, running, change))
            print(f"{label:<28} {ms:>10.1f} {len(result.moved):>12} {result.units_moved:>14}", flush=True)


if __name__ == "__main__":
    main()
