"""An independent reference for fleets: a plain dynamic program over how many devices of each type are used.

Written for clarity, not speed, and sharing no code with dnnpipe.planner: devices with the same speed, memory and
time row form a type; for a bottleneck T, reach[c] is the longest unit prefix that c[t] devices of each type t can
cover (each stage extended as far as T and memory allow), and T is feasible iff some c reaches the last unit. The
optimum is the smallest feasible stage time (a binary search over all of them), and the plan's devices are the rule's:
the fewest, then the lowest ids (each type's lowest ids). With integer unit times the stage times here and in the
planner are the very same floats (exact integer sums divided by the same speed), so results compare equal.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence


def device_types(C: Sequence[float], M: Sequence[float], rows: Sequence[Sequence[float]]) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for d in range(len(C)):
        groups.setdefault((C[d], M[d], tuple(rows[d])), []).append(d)
    return list(groups.values())


def type_count_plan(C: Sequence[float], M: Sequence[float], E, R: Sequence[float]
                    ) -> Optional[tuple[float, tuple[int, ...]]]:
    """(optimal bottleneck, sorted 0-based ids of the rule's devices), or None if no plan fits memory."""
    rows = E if isinstance(E[0], (list, tuple)) else [E] * len(C)
    U = len(R)
    types = device_types(C, M, rows)
    speed = [C[m[0]] for m in types]
    memory = [M[m[0]] for m in types]
    work = [rows[m[0]] for m in types]

    def time(t: int, j: int, k: int) -> float:
        return math.fsum(work[t][j:k]) / speed[t]

    def fits(t: int, j: int, k: int) -> bool:
        return math.fsum(R[j:k]) <= memory[t]

    values = sorted({time(t, j, k) for t in range(len(types)) for j in range(U) for k in range(j + 1, U + 1)
                     if fits(t, j, k)})
    counts = [len(m) for m in types]
    vectors = sorted(itertools.product(*(range(n + 1) for n in counts)), key=sum)

    def covering(limit: float) -> list[tuple[int, ...]]:
        """The count vectors whose devices cover all units with no stage above `limit`."""
        end = [[max(k for k in range(j, U + 1) if k == j or (time(t, j, k) <= limit and fits(t, j, k)))
                for j in range(U + 1)] for t in range(len(types))]
        reach: dict[tuple[int, ...], int] = {}
        for c in vectors:
            reach[c] = max((end[t][reach[c[:t] + (c[t] - 1,) + c[t + 1:]]] for t in range(len(c)) if c[t]),
                           default=0)
        return [c for c in vectors if reach[c] == U]

    if not values or not covering(values[-1]):
        return None
    lo, hi = -1, len(values) - 1  # values[hi] is feasible; values[lo] (if any) is not
    while hi - lo > 1:
        middle = (lo + hi) // 2
        if covering(values[middle]):
            hi = middle
        else:
            lo = middle
    best = values[hi]
    sets = [tuple(sorted(d for t, n in enumerate(c) for d in types[t][:n])) for c in covering(best)]
    return best, min(sets, key=lambda s: (len(s), s))
