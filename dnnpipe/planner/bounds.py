"""A feasible plan to bound the DP from above (sound UBP: the bound is a real plan's bottleneck)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .plan import Cut
from .problem import Problem

BISECTION_STEPS = 60


def greedy_cuts(problem: Problem, order: Sequence[int], limit: float) -> Optional[list[Cut]]:
    """Fill the devices in the given order, each as far as `limit` and its memory allow.

    For a fixed device order this is exact: covering a longer prefix never hurts, so if any plan
    using the devices in this order has bottleneck <= limit, this one finds a plan too.
    """
    j, cuts = 0, []
    for d in order:
        k = problem.last_end(j, d, limit)
        if k > j:
            cuts.append((j, k, d))
            j = k
        if j == problem.U:
            return cuts
    return None


def best_plan_for_order(problem: Problem, order: Sequence[int]) -> Optional[list[Cut]]:
    """Bisect the bottleneck for one device order; returns the best plan found, or None."""
    hi = float(problem.whole_ms.max())  # any stage fits under this
    best = greedy_cuts(problem, order, hi)
    if best is None:
        return None
    lo = 0.0
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        cuts = greedy_cuts(problem, order, mid)
        if cuts is None:
            lo = mid
        else:
            hi, best = mid, cuts
    return best


def upper_bound(problem: Problem) -> tuple[float, Optional[list[Cut]]]:
    """The best bottleneck among a few device orders (fastest first, roomiest first), or inf.

    The paper bounds with ideal + max(E)/min(C), which ignores memory and can cut off the only
    feasible plans; a bound taken from an actual plan is always safe.
    """
    C, M = problem.speed, problem.capacity
    orders = {tuple(np.lexsort((-M, -C))), tuple(np.lexsort((-C, -M)))}
    best_value, best_cuts = np.inf, None
    for order in sorted(orders):
        cuts = best_plan_for_order(problem, [int(d) for d in order])
        if cuts is not None:
            value = max(problem.stage_time(j, k, d) for j, k, d in cuts)
            if value < best_value:
                best_value, best_cuts = value, cuts
    return best_value, best_cuts
