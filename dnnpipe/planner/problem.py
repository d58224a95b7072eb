"""The partitioning problem as prefix sums, so any stage's time and memory cost O(1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import Config


@dataclass(frozen=True)
class Problem:
    """Units are addressed by cuts: stage (j, k] holds units j+1..k (1-based), 0 <= j < k <= U.

    Devices are 0-based here; plans shown to users are 1-based. A stage's time is
    (P[k] - P[j]) / C[d] and its memory RP[k] - RP[j]: both are monotone in k even in floating
    point, which the searches below rely on.
    """

    speed: np.ndarray  # C, shape (N,)
    capacity: np.ndarray  # M in MB, shape (N,)
    time_prefix: np.ndarray  # P, shape (U + 1,)
    memory_prefix: np.ndarray  # RP, shape (U + 1,)

    @classmethod
    def from_config(cls, config: Config) -> "Problem":
        return cls.from_lists(config.cluster.C, config.cluster.M, config.profile.E, config.profile.R)

    @classmethod
    def from_lists(cls, C, M, E, R) -> "Problem":
        return cls(
            speed=np.asarray(C, dtype=float),
            capacity=np.asarray(M, dtype=float),
            time_prefix=np.concatenate(([0.0], np.cumsum(np.asarray(E, dtype=float)))),
            memory_prefix=np.concatenate(([0.0], np.cumsum(np.asarray(R, dtype=float)))),
        )

    @property
    def U(self) -> int:
        return len(self.time_prefix) - 1

    @property
    def N(self) -> int:
        return len(self.speed)

    @property
    def ideal_ms(self) -> float:
        """Bottleneck if work could be split perfectly in proportion to speed: sum(E) / sum(C)."""
        return float(self.time_prefix[-1] / self.speed.sum())

    def stage_time(self, j: int, k: int, d: int) -> float:
        return float((self.time_prefix[k] - self.time_prefix[j]) / self.speed[d])

    def stage_memory(self, j: int, k: int) -> float:
        return float(self.memory_prefix[k] - self.memory_prefix[j])

    def fits(self, j: int, k: int, d: int) -> bool:
        return self.stage_memory(j, k) <= self.capacity[d]

    def stage_times(self, j: int, ks: slice, d: int) -> np.ndarray:
        """Times of stages (j, k] on device d for every k in the slice."""
        return (self.time_prefix[ks] - self.time_prefix[j]) / self.speed[d]

    def last_end(self, j: int, d: int, time_limit: float = np.inf) -> int:
        """Largest k >= j such that stage (j, k] fits device d's memory and takes <= time_limit.

        Returns j when not even unit j+1 fits. Binary search, then an exact correction with the
        same arithmetic as stage_time/stage_memory so that searches and checks never disagree.
        """
        P, RP, U = self.time_prefix, self.memory_prefix, self.U
        k_mem = int(np.searchsorted(RP, RP[j] + self.capacity[d], side="right")) - 1
        k = min(k_mem, U)
        if time_limit < np.inf:
            k_time = int(np.searchsorted(P, P[j] + time_limit * self.speed[d], side="right")) - 1
            k = min(k, k_time)
        k = max(k, j)
        ok = lambda k: self.fits(j, k, d) and self.stage_time(j, k, d) <= time_limit  # noqa: E731
        while k > j and not ok(k):
            k -= 1
        while k < U and ok(k + 1):
            k += 1
        return k
