"""Planning time per algorithm: the paper testbed and synthetic clusters, side by side.

    taskset -c 0 .venv/bin/python benchmarks/planner.py            # full table (a few minutes)
    taskset -c 0 .venv/bin/python benchmarks/planner.py --quick    # small sizes only
    taskset -c 0 .venv/bin/python benchmarks/planner.py --fleets-only --algorithms bisect   # fleets of 16-1000

Prints, per instance and algorithm, the median planning time over repeats (CPU time of this
process, so that other work on a shared machine does not inflate it; wall time beside it), the DP transitions
evaluated and the bottleneck; every algorithm on one instance must report the same bottleneck.
Algorithms whose estimated work exceeds --budget are skipped (shown as "skip"). The fleet rows (`fleet`: N devices
of 2-6 kinds, with and without binding memory; the paper testbed's four kinds x16) follow today's rows; there only
`bisect` runs (the DPs over 2^N device sets are skipped or refused).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnnpipe.config import load_config  # noqa: E402
from dnnpipe.planner import ALGORITHMS, Problem, solve_problem  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "efficientnetv2b0-paper-testbed.json"
PAPER_SPEEDS = [1.0, 0.33, 0.21, 0.21]


def synthetic(N: int, U: int, seed: int = 0, binding: bool = False) -> Problem:
    """Log-normal unit times (a few heavy layers, many light ones) on a testbed-like cluster.

    Memory binds on the small devices; with `binding` every device has 0.55-1.65x its share of the
    model (unrelated to its speed), so memory, not compute, decides the plan: the optimum lies far
    above the compute-only lower bound."""
    rng = np.random.default_rng(seed)
    E = rng.lognormal(mean=-4.0, sigma=1.0, size=U)
    R = rng.lognormal(mean=-1.0, sigma=1.0, size=U)
    C = [PAPER_SPEEDS[i % 4] * (1 + 0.05 * (i // 4)) for i in range(N)]
    if binding:
        M = list(np.maximum(np.random.default_rng(1).uniform(0.5, 1.5, N) * R.sum() / N * 1.1, R.max()))
    else:
        M = [max(R.sum() * c / sum(C) * 1.5, R.max()) for c in C]
    return Problem.from_lists(C, M, E, R)


FLEET_SPEEDS = [1.0, 0.33, 0.21, 0.5, 0.75, 0.15]  # the paper's kinds, then three more


def fleet(N: int, U: int, types: int, seed: int = 0, binding: bool = False) -> Problem:
    """N devices of a few kinds (device i is of kind i mod types), the synthetic model of `synthetic`.

    Memory per kind as in `synthetic`: 1.5x its speed's share of the model, or with `binding` 0.55-1.65x
    its share of the model, unrelated to speed (normalised so that all devices hold 1.1x the model), and
    at least the largest unit. At N=1000 and U=1000 a device's share is below the largest unit, so there
    the floor decides and memory binds less."""
    rng = np.random.default_rng(seed)
    E = rng.lognormal(mean=-4.0, sigma=1.0, size=U)
    R = rng.lognormal(mean=-1.0, sigma=1.0, size=U)
    kinds = np.arange(N) % types
    C = np.array(FLEET_SPEEDS[:types])[kinds]
    if binding:
        factor = np.random.default_rng(seed + 1).uniform(0.5, 1.5, types)[kinds]
        M = factor / factor.mean() * R.sum() / N * 1.1
    else:
        M = R.sum() * C / C.sum() * 1.5
    return Problem.from_lists(C, np.maximum(M, R.max()), E, R)


def work_estimate(problem: Problem, algorithm: str) -> float:
    """Rough count of inner numpy calls, to skip runs that would take minutes."""
    calls = problem.U * (1 << min(problem.N, 60)) * problem.N
    return {"pipeedge": calls, "exhaustive": calls / 2, "bisect": 0}.get(algorithm, calls / 20)


def measure(problem: Problem, algorithm: str, repeats: int):
    """Median CPU ms and median wall ms over repeats after one warm-up call, and the plan."""
    cpu, wall, result = [], [], solve_problem(problem, algorithm)
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = solve_problem(problem, algorithm)
        cpu.append((time.process_time() - started_cpu) * 1000)
        wall.append((time.perf_counter() - started) * 1000)
    return statistics.median(cpu), statistics.median(wall), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fleets-only", action="store_true", help="only the fleet rows")
    parser.add_argument("--reference", default=str(REFERENCE), help="the paper testbed's profile (skipped if absent)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=3e5, help="skip runs above this work estimate")
    parser.add_argument("--algorithms", nargs="+", default=["dnnpipe", "exhaustive", "pipeedge", "bisect"],
                        choices=sorted(ALGORITHMS))
    parser.add_argument("--sizes", nargs="+", metavar="NxU", help="synthetic sizes, e.g. 16x1000")
    parser.add_argument("--fleets", nargs="*", metavar="NxUxK", help="fleet sizes, e.g. 64x1000x4 (none: no fleets)")
    args = parser.parse_args()

    instances = []
    reference = Path(args.reference)
    if reference.exists():
        paper = Problem.from_config(load_config(reference))
        instances.append(("paper testbed (EfficientNetV2B0)", paper))
        kinds = np.arange(64) % paper.N  # 64 boards of the testbed's four kinds
        instances.append(("paper testbed x16 (N=64, 4 kinds)",
                          Problem.from_lists(paper.speed[kinds], paper.capacity[kinds], np.diff(paper.time_prefix[0]),
                                             np.diff(paper.memory_prefix))))
    sizes = [(2, 50), (4, 100), (4, 273)] if args.quick else [
        (2, 50), (2, 1000), (4, 100), (4, 273), (4, 1000), (6, 273), (6, 1000), (8, 273), (8, 1000), (10, 50),
        (10, 273), (10, 1000), (12, 1000), (16, 1000)]
    if args.sizes:
        sizes = [(int(size.split("x")[0]), int(size.split("x")[1])) for size in args.sizes]
    if args.fleets_only:
        instances, sizes = instances[1:], []
    instances += [(f"synthetic N={N} U={U}", synthetic(N, U)) for N, U in sizes]
    binding = [] if args.fleets_only else [(4, 1000), (8, 273)] if args.quick else [(4, 1000), (8, 273), (8, 1000),
                                                                                    (12, 1000)]
    instances += [(f"binding memory N={N} U={U}", synthetic(N, U, binding=True)) for N, U in binding]
    fleets = [(16, 1000, 4), (64, 273, 4), (64, 1000, 4), (256, 1000, 2)] if args.quick else [
        (16, 1000, 2), (16, 1000, 4), (16, 1000, 6), (64, 273, 4), (64, 1000, 2), (64, 1000, 4), (64, 1000, 6),
        (96, 273, 4), (96, 1000, 4), (256, 1000, 2), (256, 1000, 3), (256, 1000, 4), (1000, 1000, 2),
        (1000, 1000, 3)]
    if args.fleets is not None:
        fleets = [tuple(int(x) for x in size.split("x")) for size in args.fleets]  # type: ignore[misc]
    for binds in (False, True):
        instances += [(f"fleet N={N} U={U} {k} kinds{' binding' if binds else ''}", fleet(N, U, k, binding=binds))
                      for N, U, k in fleets]

    print(f"{'instance':<40} {'algorithm':<11} {'median ms':>11} {'wall ms':>9} {'vs dnnpipe':>10} "
          f"{'transitions':>13} {'bottleneck ms':>14}")
    for name, problem in instances:
        bottlenecks, times = set(), {}
        for algorithm in args.algorithms:
            if work_estimate(problem, algorithm) > args.budget:
                print(f"{name:<40} {algorithm:<11} {'skip':>11}")
                continue
            ms, wall, result = measure(problem, algorithm, args.repeats)
            times[algorithm] = ms
            bottlenecks.add(result.bottleneck)  # the same arithmetic everywhere: equal, not close
            ratio = f"{times['dnnpipe'] / ms:.1f}x" if "dnnpipe" in times else ""
            print(f"{name:<40} {algorithm:<11} {ms:>11.2f} {wall:>9.2f} {ratio:>10} {result.transitions:>13,} "
                  f"{result.bottleneck:>14.6f}", flush=True)
        if len(bottlenecks) > 1:
            raise SystemExit(f"{name}: algorithms disagree on the bottleneck: {sorted(bottlenecks)}")


if __name__ == "__main__":
    main()
