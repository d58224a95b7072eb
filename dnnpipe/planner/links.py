"""Exact planning when links cost time (beyond the paper): a DP over (prefix, device set, last device).

The reference for `bisect-links` (tested equal); exponential with N^2 work per state, so slow beyond 8 devices.

With link bandwidth B and cut sizes A a stage's period is max(compute, sending its output cut), and
a hop's time depends on both ends, so the state must carry the last device (as PipeEdge's does).
Cut sizes are not monotone along the model (a pooling layer shrinks them), so a longer prefix no
longer dominates: greedy probes and USP do not apply. What remains sound is UBP: UB is the period
of an actual plan under this model, and a stage's compute only grows with its end unit.

V[k, S, e] is the smallest bottleneck of a plan for units 1..k over devices S whose last stage runs
on e, not counting that stage's outgoing hop (it depends on the next device). Appending stage
(j, k] on e after a stage on d: V[k, S + e, e] <= max(V[j, S, d], hop(j, d, e), compute(j, k, e)),
and min over d of max(V[j, S, d], hop(j, d, e)) is taken first, one vector operation per (j, S, e).
hop(j, d, e) uses the link matrix B_link when given, else the slower of B[d] and B[e].
With each device's link CPU (device_config.link_cpu) compute(j, k, e) is Problem.stage_cpu_ms: receiving cut j
and sending cut k add to the compute. It is no longer monotone in k, but its compute part is, so the UBP end
(last_end on compute alone) still drops only stages above the bound.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..config import hop_ms
from .bounds import upper_bound
from .dp import best_final_state
from .plan import Solution, bottleneck_of
from .problem import Problem


def solve(problem: Problem) -> Optional[Solution]:
    problem.units_are_blocks()
    U, N = problem.U, problem.N
    full = 1 << N
    B, A = problem.link_mbps, problem.cut_bytes
    if B is None or A is None:
        raise ValueError("the links algorithm needs link bandwidth (B) and cut sizes (A)")
    with np.errstate(divide="ignore", invalid="ignore"):
        pair_hop = hop_ms(A[:, None, None], problem.pair_mbps[None, :, :])  # [j, d, e]
    pair_hop[:, np.arange(N), np.arange(N)] = np.inf  # a device never sends to itself
    value = np.full((U + 1, full, N), np.inf)
    parent_cut = np.full((U + 1, full, N), -1, dtype=np.int32)
    parent_device = np.full((U + 1, full, N), -1, dtype=np.int16)  # N stands for the data source
    bound = _bound(problem)
    transitions = 0
    for j in range(U):
        for S in range(full):
            if j == 0 and S == 0:
                arrival = hop_ms(A[0], B)  # from the data source to each possible first device
                source = np.full(N, N)
            elif j > 0 and S > 0:
                held = value[j, S]
                if not np.isfinite(held).any() or held.min() > bound:
                    continue
                # Each possible next device e: the best previous device d and the value with its hop.
                with_hop = np.maximum(held[:, None], pair_hop[j])  # [d, e]
                source = np.argmin(with_hop, axis=0)
                arrival = with_hop[source, np.arange(N)]
            else:
                continue
            for e in range(N):
                if S >> e & 1 or arrival[e] > bound:
                    continue
                last = problem.last_end(j, e, bound)  # memory and UBP on compute
                if last == j:
                    continue
                span = slice(j + 1, last + 1)
                candidate = np.maximum(problem.stage_cpu_times(j, span, e), arrival[e])
                transitions += last - j
                T = S | (1 << e)
                current = value[span, T, e]
                better = candidate < current
                if better.any():
                    current[better] = candidate[better]
                    parent_cut[span, T, e][better] = j
                    parent_device[span, T, e][better] = source[e]
    departure = hop_ms(A[U], B)  # the result leaving the last device
    total = np.maximum(value[U], departure[None, :])
    if not np.isfinite(total).any():
        return None
    S, e = divmod(best_final_state(total), N)
    cuts, k = [], U
    while k > 0:
        j, d = int(parent_cut[k, S, e]), int(parent_device[k, S, e])
        cuts.append((j, k, e))
        k, S, e = j, S & ~(1 << e), d
    return Solution(tuple(reversed(cuts)), transitions)


def _bound(problem: Problem) -> float:
    """The period of a real plan under the link model (a greedy plan from bounds), or inf."""
    _, cuts = upper_bound(problem)
    return np.inf if cuts is None else bottleneck_of(problem, cuts)
