"""DNNPipe's dynamic program over (unit prefix, device subset), with and without pruning (Section 4).

V[j, S] is the smallest bottleneck of a plan for units 1..j that uses exactly the devices in S,
each for one contiguous stage. A transition appends stage (j, k] on a device d not in S:
V[k, S + {d}] <= max(V[j, S], time(j, k, d)). States are expanded in increasing j, so V[j, .] is
final when it is expanded.

Pruning (both keep optimality, also with memory constraints):
- UBP: UB is the bottleneck of a feasible plan (bounds.upper_bound), so no state or stage above it
  can be part of an optimal plan; a stage's time only grows with k, so the scan over k stops there.
- USP: if the stage (j, k] could also absorb unit k+1 while staying <= V[j, S] and within d's
  memory, ending it at k is dominated: the state (k+1, S + {d}) has the same value and its
  remainder is a subproblem of (k, S + {d})'s (drop unit k+1 from the next stage, or skip that
  stage's device if it held only that unit). So only k >= last_end(j, d, V[j, S]) are tried.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .bounds import upper_bound
from .plan import Solution
from .problem import Problem


def solve(problem: Problem, prune: bool = True) -> Optional[Solution]:
    problem.units_are_blocks()
    U, N = problem.U, problem.N
    full = 1 << N
    value = np.full((U + 1, full), np.inf)
    parent_cut = np.full((U + 1, full), -1, dtype=np.int32)
    parent_device = np.full((U + 1, full), -1, dtype=np.int8)
    value[0, 0] = 0.0
    bound = upper_bound(problem)[0] if prune else np.inf
    transitions = 0
    for j in range(U):
        row = value[j]
        live = np.flatnonzero(np.isfinite(row) & (row <= bound))
        if live.size == 0:
            continue
        for d in range(N):
            # Stage (j, k] on d for k = j+1..last: the scan over k stops at UB and memory (UBP) or
            # runs to U with memory-infeasible stages marked inf (no pruning).
            last = problem.last_end(j, d, bound) if prune else U
            if last == j:
                continue
            times = problem.stage_times(j, slice(j + 1, last + 1), d)
            if not prune:
                memory = problem.memory_prefix[j + 1:last + 1] - problem.memory_prefix[j]
                times[memory > problem.capacity[d]] = np.inf
            bit = 1 << d
            for S in live[(live & bit) == 0]:
                v = row[S]
                # USP: stages that could absorb their next unit and stay <= v are skipped; all
                # stages up to `last` fit memory, so that is the count of times <= v, minus one.
                first = max(int(np.searchsorted(times, v, side="right")) - 1, 0) if prune else 0
                transitions += len(times) - first
                candidate = np.maximum(times[first:], v)
                span = slice(j + 1 + first, last + 1)
                current = value[span, S | bit]
                better = candidate < current
                if better.any():
                    current[better] = candidate[better]
                    parent_cut[span, S | bit][better] = j
                    parent_device[span, S | bit][better] = d
    return _trace_back(value, parent_cut, parent_device, transitions)


def best_final_state(final: np.ndarray) -> int:
    """The smallest bottleneck over final states indexed by device subset (first axis); among equal ones
    the fewest devices: fewer hops, same throughput. Returns the flat index into `final`."""
    sizes = np.array([bin(S).count("1") for S in range(final.shape[0])])
    sizes = np.broadcast_to(sizes.reshape(-1, *([1] * (final.ndim - 1))), final.shape)
    return int(np.lexsort((sizes.ravel(), final.ravel()))[0])


def _trace_back(value, parent_cut, parent_device, transitions: int) -> Optional[Solution]:
    U = value.shape[0] - 1
    final = value[U]
    if not np.isfinite(final.min()):
        return None
    S = best_final_state(final)
    cuts, k = [], U
    while k > 0:
        j, d = int(parent_cut[k, S]), int(parent_device[k, S])
        cuts.append((j, k, d))
        k, S = j, S & ~(1 << d)
    return Solution(tuple(reversed(cuts)), transitions)
