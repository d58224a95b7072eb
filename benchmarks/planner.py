"""Planning time per algorithm: the paper testbed and synthetic clusters, side by side.

    taskset -c 0 .venv/bin/python benchmarks/planner.py            # full table (a few minutes)
    taskset -c 0 .venv/bin/python benchmarks/planner.py --quick    # small sizes only

Prints, per instance and algorithm, the median planning time over repeats (CPU time of this
process, so that other work on a shared machine does not inflate it; wall time beside it), the DP transitions
evaluated and the bottleneck; every algorithm on one instance must report the same bottleneck.
Algorithms whose estimated work exceeds --budget are skipped (shown as "skip").
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


def work_estimate(problem: Problem, algorithm: str) -> float:
    """Rough count of inner numpy calls, to skip runs that would take minutes."""
    calls = problem.U * (1 << problem.N) * problem.N
    return {"pipeedge": calls, "exhaustive": calls / 2, "bisect": 0}.get(algorithm, calls / 20)


def measure(problem: Problem, algorithm: str, repeats: int):
    """Median CPU ms and median wall ms over repeats, and the plan."""
    cpu, wall, result = [], [], None
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = solve_problem(problem, algorithm)
        cpu.append((time.process_time() - started_cpu) * 1000)
        wall.append((time.perf_counter() - started) * 1000)
    return statistics.median(cpu), statistics.median(wall), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=3e5, help="skip runs above this work estimate")
    parser.add_argument("--algorithms", nargs="+", default=["dnnpipe", "exhaustive", "pipeedge", "bisect"],
                        choices=sorted(ALGORITHMS))
    parser.add_argument("--sizes", nargs="+", metavar="NxU", help="synthetic sizes, e.g. 16x1000")
    args = parser.parse_args()

    instances = []
    if REFERENCE.exists():
        instances.append(("paper testbed (EfficientNetV2B0)", Problem.from_config(load_config(REFERENCE))))
    sizes = [(2, 50), (4, 100), (4, 273)] if args.quick else [
        (2, 50), (2, 1000), (4, 100), (4, 273), (4, 1000), (6, 273), (6, 1000), (8, 273), (8, 1000), (10, 50),
        (10, 273), (10, 1000), (12, 1000), (16, 1000)]
    if args.sizes:
        sizes = [(int(size.split("x")[0]), int(size.split("x")[1])) for size in args.sizes]
    instances += [(f"synthetic N={N} U={U}", synthetic(N, U)) for N, U in sizes]
    binding = [(4, 1000), (8, 273)] if args.quick else [(4, 1000), (8, 273), (8, 1000), (12, 1000)]
    instances += [(f"binding memory N={N} U={U}", synthetic(N, U, binding=True)) for N, U in binding]

    print(f"{'instance':<34} {'algorithm':<11} {'median ms':>11} {'wall ms':>9} {'vs dnnpipe':>10} "
          f"{'transitions':>13} {'bottleneck ms':>14}")
    for name, problem in instances:
        bottlenecks, times = set(), {}
        for algorithm in args.algorithms:
            if work_estimate(problem, algorithm) > args.budget:
                print(f"{name:<34} {algorithm:<11} {'skip':>11}")
                continue
            ms, wall, result = measure(problem, algorithm, args.repeats)
            times[algorithm] = ms
            bottlenecks.add(result.bottleneck)  # the same arithmetic everywhere: equal, not close
            ratio = f"{times['dnnpipe'] / ms:.1f}x" if "dnnpipe" in times else ""
            print(f"{name:<34} {algorithm:<11} {ms:>11.2f} {wall:>9.2f} {ratio:>10} {result.transitions:>13,} "
                  f"{result.bottleneck:>14.6f}", flush=True)
        if len(bottlenecks) > 1:
            raise SystemExit(f"{name}: algorithms disagree on the bottleneck: {sorted(bottlenecks)}")


if __name__ == "__main__":
    main()
