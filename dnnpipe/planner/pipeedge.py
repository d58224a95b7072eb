"""PipeEdge's dynamic program (Hu et al., 2022), the paper's runtime-overhead baseline.

Its state carries the device that runs the next stage: H[j, S, u] is the smallest bottleneck for
units j+1..U when the devices in S are already used and u (not in S) runs the stage starting at
unit j+1. It is solved backwards from the last unit and explores every state, reachable or not;
the extra device index is what lets PipeEdge charge a per-link communication cost.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .plan import Solution
from .problem import Problem


def solve(problem: Problem) -> Optional[Solution]:
    problem.units_are_blocks()
    U, N = problem.U, problem.N
    full = 1 << N
    H = np.full((U + 1, full, N), np.inf)
    best_end = np.full((U + 1, full, N), -1, dtype=np.int32)
    # NEXT[k, S]: the best H[k, S, v] over next devices v not in S; 0 once every unit is placed.
    NEXT = np.full((U + 1, full), np.inf)
    NEXT_device = np.full((U + 1, full), -1, dtype=np.int8)
    NEXT[U, :] = 0.0
    transitions = 0
    for j in range(U - 1, -1, -1):
        for S in range(full):
            for u in range(N):
                if S >> u & 1:
                    continue
                hi = problem.last_end(j, u)
                if hi == j:
                    continue
                span = slice(j + 1, hi + 1)
                transitions += hi - j
                total = np.maximum(problem.stage_times(j, span, u), NEXT[span, S | (1 << u)])
                k = int(np.argmin(total))
                H[j, S, u], best_end[j, S, u] = total[k], j + 1 + k
            if S < full - 1:
                d = int(np.argmin(H[j, S]))
                NEXT[j, S], NEXT_device[j, S] = H[j, S, d], d
    if not np.isfinite(NEXT[0, 0]):
        return None
    cuts, j, S = [], 0, 0
    while j < U:
        u = int(NEXT_device[j, S])
        k = int(best_end[j, S, u])
        cuts.append((j, k, u))
        j, S = k, S | (1 << u)
    return Solution(tuple(cuts), transitions)
