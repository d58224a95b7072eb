"""An independent oracle: enumerate every plan (cut positions x device sequences) on small instances."""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence


def brute_force_bottleneck(C: Sequence[float], M: Sequence[float], E, R: Sequence[float], B=None,
                           A=None) -> Optional[float]:
    """E is one list of unit times (scaled by 1/C[d]) or one list per device. With links B (Mbit/s) and
    cut bytes A, every hop takes A[cut] * 8e-3 / min(B of both ends) ms: source to first device, between
    stages, last device to sink; a stage's period is max(compute, its outgoing hop)."""
    rows = E if isinstance(E[0], (list, tuple)) else [E] * len(C)
    U, N = len(R), len(C)
    best = math.inf
    for stages in range(1, min(N, U) + 1):
        for inner_cuts in itertools.combinations(range(1, U), stages - 1):
            bounds = (0, *inner_cuts, U)
            ranges = list(zip(bounds, bounds[1:]))
            for devices in itertools.permutations(range(N), stages):
                worst = 0.0 if B is None else A[0] * 8e-3 / B[devices[0]]
                for i, ((j, k), d) in enumerate(zip(ranges, devices)):
                    if math.fsum(R[j:k]) > M[d]:
                        break
                    worst = max(worst, math.fsum(rows[d][j:k]) / C[d])
                    if B is not None:
                        link = B[d] if i + 1 == len(devices) else min(B[d], B[devices[i + 1]])
                        worst = max(worst, A[k] * 8e-3 / link)
                else:
                    best = min(best, worst)
    return None if math.isinf(best) else best
