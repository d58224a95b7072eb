"""Beyond the paper: planning with link costs, and re-planning a running pipeline online.

    taskset -c 0 .venv/bin/python benchmarks/online.py            # a few minutes
    taskset -c 0 .venv/bin/python benchmarks/online.py --quick

Link model: synthetic clusters with B (Mbit/s) per device, cut sizes A that rise and fall along the
model, and either min(B[d], B[e]) between devices ("per device") or a random link matrix B_link
("matrix"). The exact `bisect-links` and the reference `links` DP run side by side and must agree on
the bottleneck and the plan; the DP is skipped where it would take minutes. Rows marked "link CPU" also give
each device (each kind, in fleets) its CPU per MB sent and received and per frame (device_config.link_cpu), which
`bisect-links` plans with by its exact valid-start masks instead of its prefix sums. Re-planning: a device
leaves, or the first device slows to a quarter, in a running plan; solved with the default algorithm; the
fleet rows are benchmarks/planner.py's fleets with binding memory (64 devices of 4 kinds).
Times are the median CPU time of this process over repeats (wall time beside it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dnnpipe.planner import Problem, solve_problem  # noqa: E402
from dnnpipe.planner.replan import ClusterChange, replan  # noqa: E402
from planner import fleet, synthetic  # noqa: E402

LINKS_DP_LIMIT = 8  # devices; the DP takes 98 s at N=12, U=273


def median_ms(function, repeats: int = 3):
    cpu, wall, result = [], [], None
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = function()
        cpu.append((time.process_time() - started_cpu) * 1000)
        wall.append((time.perf_counter() - started) * 1000)
    return statistics.median(cpu), statistics.median(wall), result


def as_config(problem) -> dict:
    E = np.diff(problem.time_prefix[0]).tolist()
    R = np.diff(problem.memory_prefix).tolist()
    return {"device_config": {"N": problem.N, "C": problem.speed.tolist(), "M": problem.capacity.tolist()},
            "model_config": {"U": problem.U, "E": E, "R": R}}


def linked(N: int, U: int, matrix: bool, binding: bool = False, kinds: int = 0, link_cpu: bool = False) -> Problem:
    """A synthetic cluster with links; with `kinds`, planner.py's fleet of that many kinds, B shared by a kind;
    with `link_cpu` each device (kind) pays 10-40 ms per MB sent and received and 0.05-0.2 ms per frame."""
    rng = np.random.default_rng(N * 1000 + U)
    problem = fleet(N, U, kinds, binding=binding) if kinds else synthetic(N, U, binding=binding)
    of = np.arange(N) % kinds if kinds else np.arange(N)
    B = rng.choice([100.0, 300.0, 1000.0], len(set(of)))[of]
    A = rng.lognormal(11, 1.0, U + 1)
    B_link = rng.choice([100.0, 300.0, 1000.0], (N, N)) if matrix else None
    # Drawn last, so the rows without link CPU are the very instances of the tables before link CPU existed.
    cpu = np.stack([rng.uniform(10, 40, len(set(of)))[of], rng.uniform(10, 40, len(set(of)))[of],
                    rng.uniform(0.05, 0.2, len(set(of)))[of]])
    return replace(problem, link_mbps=B, cut_bytes=A, link_matrix=B_link, link_cpu=cpu if link_cpu else None)


def link_table(sizes, repeats: int, link_cpu: bool = False) -> None:
    print(f"{'link model':<53} {'algorithm':<13} {'median ms':>10} {'wall ms':>9} {'transitions':>12} "
          f"{'bottleneck ms':>14} {'no-link ms':>11}")
    for N, U, matrix, binding, *kinds in sizes:
        problem = linked(N, U, matrix, binding, kinds[0] if kinds else 0, link_cpu=link_cpu)
        name = (f"N={N} U={U} {'matrix' if matrix else 'per device'}{' binding' if binding else ''}"
                f"{f' fleet of {kinds[0]} kinds' if kinds else ''}{' link CPU' if link_cpu else ''}")
        plain = solve_problem(replace(problem, link_mbps=None, cut_bytes=None, link_matrix=None,
                                      link_cpu=None)).bottleneck
        plans = set()
        for algorithm in ("bisect-links", "links"):
            if algorithm == "links" and N > LINKS_DP_LIMIT:
                print(f"{name:<53} {algorithm:<13} {'skip':>10}")
                continue
            ms, wall, result = median_ms(lambda problem=problem, algorithm=algorithm: solve_problem(problem, algorithm),
                                         repeats)
            plans.add((result.bottleneck, str(result.stages)))
            print(f"{name:<53} {algorithm:<13} {ms:>10.1f} {wall:>9.1f} {result.transitions:>12,} "
                  f"{result.bottleneck:>14.6f} {plain:>11.6f}", flush=True)
        if len(plans) > 1:
            raise SystemExit(f"{name}: the algorithms disagree: {sorted(plans)}")


def replan_table(sizes, repeats: int) -> None:
    """(N, U) rows on `synthetic` clusters, (N, U, kinds) rows on fleets of that many kinds."""
    print(f"{'re-plan':<40} {'median ms':>10} {'wall ms':>9} {'moved stages':>12} {'units moved':>12}")
    for size in sizes:
        N, U = size[:2]
        problem = synthetic(N, U) if len(size) == 2 else fleet(N, U, size[2], binding=True)
        config = as_config(problem)
        running = solve_problem(problem).stages
        first = running[0][2]
        name = f"N={N} U={U}" + (f" fleet of {size[2]} kinds" if len(size) == 3 else "")
        for label, change in ((f"{name}, device {first} leaves", ClusterChange(removed=frozenset({first}))),
                              (f"{name}, device {first} slows", ClusterChange(speeds={first: 0.25}))):
            ms, wall, result = median_ms(lambda config=config, running=running, change=change:
                                         replan(config, running, change), repeats)
            print(f"{label:<40} {ms:>10.1f} {wall:>9.1f} {len(result.moved):>12} {result.units_moved:>12}",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        sizes: list[tuple] = [(4, 100, False, False), (6, 273, True, False)]
    else:
        sizes = [(4, 100, False, False), (4, 273, False, False), (6, 273, False, False), (8, 100, False, False),
                 (4, 273, True, False), (6, 273, True, False), (8, 273, True, False), (8, 273, True, True),
                 (10, 273, True, False), (12, 273, True, False), (12, 273, True, True), (16, 1000, False, False, 4),
                 (64, 273, False, True, 4)]
    link_table(sizes, args.repeats)
    print()
    cpu_sizes: list[tuple] = ([(4, 100, False, False), (6, 273, False, False, 3)] if args.quick else
                              [(4, 100, False, False), (4, 273, False, False), (6, 273, False, False),
                               (8, 273, True, False), (8, 273, False, True, 3), (16, 1000, False, False, 4),
                               (64, 273, False, True, 4)])
    link_table(cpu_sizes, args.repeats, link_cpu=True)
    print()
    replan_table([(4, 273), (64, 273, 4)] if args.quick else [(4, 273), (10, 1000), (16, 1000), (64, 273, 4),
                                                             (64, 1000, 4)], args.repeats)


if __name__ == "__main__":
    main()
