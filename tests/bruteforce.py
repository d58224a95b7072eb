"""An independent oracle: enumerate every plan (cut positions x device sequences) on small instances."""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

Plan = tuple[float, tuple[int, ...], tuple[int, ...]]  # bottleneck, device sequence (0-based), stage ends


def all_plans(C: Sequence[float], M: Sequence[float], E, R: Sequence[float], B=None, A=None, B_link=None,
              cuts=None, link_cpu=None) -> list[Plan]:
    """Every valid plan. E is one list of unit times (scaled by 1/C[d]) or one list per device. With links B
    (Mbit/s) and cut bytes A, every hop takes A[cut] * 8e-3 / link ms: source to first device and last device
    to sink over B of that device, between stages over B_link[d][e] if given, else min(B[d], B[e]); a stage's
    period is max(compute, its outgoing hop). Stages end only at the legal `cuts` (all boundaries if None).
    link_cpu = (send ms per MB, receive ms per MB, frame ms), one value per device each: a stage's compute then
    also pays receiving its input cut (the model's input for the first stage), sending its output cut (the
    result for the last) and a frame."""
    rows = E if isinstance(E[0], (list, tuple)) else [E] * len(C)
    U, N = len(R), len(C)
    legal = range(1, U) if cuts is None else cuts
    plans = []
    for stages in range(1, min(N, U) + 1):
        for inner_cuts in itertools.combinations(legal, stages - 1):
            bounds = (0, *inner_cuts, U)
            ranges = list(zip(bounds, bounds[1:]))
            for devices in itertools.permutations(range(N), stages):
                worst = 0.0 if B is None else A[0] * 8e-3 / B[devices[0]]
                for i, ((j, k), d) in enumerate(zip(ranges, devices)):
                    if math.fsum(R[j:k]) > M[d]:
                        break
                    compute = math.fsum(rows[d][j:k]) / C[d]
                    if link_cpu is not None:
                        send, receive, frame = (values[d] for values in link_cpu)
                        compute += receive * A[j] / 1e6 + send * A[k] / 1e6 + frame
                    worst = max(worst, compute)
                    if B is not None:
                        if i + 1 == len(devices):
                            link = B[d]
                        else:
                            e = devices[i + 1]
                            link = B_link[d][e] if B_link is not None else min(B[d], B[e])
                        worst = max(worst, A[k] * 8e-3 / link)
                else:
                    plans.append((worst, devices, bounds[1:]))
    return plans


def brute_force_bottleneck(*instance, **options) -> Optional[float]:
    plans = all_plans(*instance, **options)
    return min(p[0] for p in plans) if plans else None


def tie_break(*instance, **options) -> Optional[tuple[float, tuple[int, ...]]]:
    """The rule's choice among optimal plans: the bottleneck and the device set (sorted 0-based ids) with the
    fewest devices, then the lowest ids."""
    plans = all_plans(*instance, **options)
    if not plans:
        return None
    best = min(p[0] for p in plans)
    sets = [tuple(sorted(devices)) for value, devices, _ in plans if value <= best * (1 + 1e-12) + 1e-12]
    return best, min(sets, key=lambda s: (len(s), s))
