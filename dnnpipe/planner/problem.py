"""The partitioning problem as prefix sums, so any stage's time and memory cost O(1)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from ..config import Config, hop_ms, link_cpu_ms, stage_compute_ms, stage_cpu_ms, stage_link_cpu_ms, time_prefix
from ..errors import ConfigError


@dataclass(frozen=True)
class Problem:
    """Units are addressed by cuts: stage (j, k] holds units j+1..k (1-based), 0 <= j < k <= U.

    Devices are 0-based here; plans shown to users are 1-based. A stage's time is
    (P[d][k] - P[d][j]) / C[d] and its memory RP[k] - RP[j]: both are monotone in k even in
    floating point, which the searches below rely on. In the paper's model every row P[d] is the
    prefix sum of E; with per-device times (E_device) row d is device d's own and C[d] = 1.
    With each device's link CPU (link_cpu) a stage also pays receiving and sending its cuts and a frame
    (stage_cpu_ms); stage_time stays the compute alone, which is monotone (the greedy bounds use it).
    """

    speed: np.ndarray  # C, shape (N,)
    capacity: np.ndarray  # M in MB, shape (N,)
    time_prefix: np.ndarray  # P, shape (N, U + 1)
    memory_prefix: np.ndarray  # RP, shape (U + 1,)
    link_mbps: Optional[np.ndarray] = None  # B, shape (N,): each device's link, Mbit/s
    cut_bytes: Optional[np.ndarray] = None  # A, shape (U + 1,): bytes crossing the cut after unit j
    link_matrix: Optional[np.ndarray] = None  # B_link, shape (N, N): Mbit/s from d to e; else min(B[d], B[e])
    cuts: Optional[tuple[int, ...]] = None  # legal stage ends below U (model_config.cuts); None: every unit
    link_cpu: Optional[np.ndarray] = None  # shape (3, N): each device's send and receive ms per MB, frame ms
    cut_index: np.ndarray = field(init=False, repr=False, compare=False)  # 0..U, once: the link CPU's cut numbers

    def __post_init__(self) -> None:
        object.__setattr__(self, "cut_index", np.arange(self.time_prefix.shape[1]))

    @classmethod
    def from_config(cls, config: Config) -> "Problem":
        B, A, B_link, cuts, cpu = (config.cluster.B, config.profile.A, config.cluster.B_link, config.profile.cuts,
                                   config.cluster.link_cpu)
        link_cpu = None if cpu is None else (cpu.send_ms_per_mb, cpu.receive_ms_per_mb, cpu.frame_ms)
        if B is None:
            A = None  # cut sizes alone are information; link bandwidth turns the model on
        elif A is None:
            raise ConfigError(f"{config.source}: the communication model needs both device_config.B (link "
                              f"Mbit/s per device) and model_config.A (bytes per cut), got only B")
        speed, rows = config.unit_times()
        return cls.from_lists(speed, config.cluster.M, rows, config.profile.R, B, A, B_link, cuts, link_cpu)

    @classmethod
    def from_lists(cls, C, M, E, R, B=None, A=None, B_link=None, cuts=None, link_cpu=None) -> "Problem":
        """E is one list of unit times on device 1, or one list per device (then C should be all 1).
        B (Mbit/s per device) and A (bytes per cut, U + 1 values) turn on the communication model; B_link
        (N x N Mbit/s) replaces min(B[d], B[e]) between devices. cuts: the legal stage ends below U.
        link_cpu: (send ms per MB, receive ms per MB, frame ms), N values each (needs B and A)."""
        speed = np.asarray(C, dtype=float)
        E = np.asarray(E, dtype=float)
        rows = np.broadcast_to(E, (len(speed), E.shape[-1])) if E.ndim == 1 else E
        if link_cpu is not None and (A is None or B is None):
            raise ValueError("link CPU (per MB of cut) needs link bandwidth (B) and cut sizes (A)")
        return cls(
            speed=speed,
            capacity=np.asarray(M, dtype=float),
            time_prefix=time_prefix(rows),
            memory_prefix=np.concatenate(([0.0], np.cumsum(np.asarray(R, dtype=float)))),
            link_mbps=None if B is None else np.asarray(B, dtype=float),
            cut_bytes=None if A is None else np.asarray(A, dtype=float),
            link_matrix=None if B is None or B_link is None else np.asarray(B_link, dtype=float),
            cuts=None if cuts is None else tuple(int(k) for k in cuts),
            link_cpu=None if link_cpu is None else np.asarray(link_cpu, dtype=float).reshape(3, len(speed)),
        )

    @property
    def has_links(self) -> bool:
        return self.link_mbps is not None

    @property
    def pair_mbps(self) -> np.ndarray:
        """Mbit/s from device d (row) to device e (column): B_link, or the slower of the two devices' links."""
        if self.link_matrix is not None:
            return self.link_matrix
        B = self.link_mbps if self.link_mbps is not None else np.full(self.N, np.inf)
        return np.minimum(B[:, None], B[None, :])

    def hop_ms(self, j: int, sender: Optional[int], receiver: Optional[int]) -> float:
        """Moving cut j's bytes from sender to receiver; None is the data source or the sink (device's own B)."""
        if self.link_mbps is None or self.cut_bytes is None:
            return 0.0
        if sender is None or receiver is None:
            mbps = self.link_mbps[receiver if sender is None else sender]
        else:
            mbps = self.pair_mbps[sender, receiver]
        return float(hop_ms(self.cut_bytes[j], mbps))

    @property
    def ends(self) -> np.ndarray:
        """Every unit boundary a stage may end at, U included, sorted."""
        return np.arange(1, self.U + 1) if self.cuts is None else np.array([*self.cuts, self.U])

    def units_are_blocks(self) -> None:
        """Algorithms end stages at any boundary: they take the problem over blocks (at_cuts), as solve_problem
        passes it, never one with cuts left to respect."""
        if self.cuts is not None:
            raise ValueError("this algorithm takes Problem.at_cuts() (legal cuts as blocks); use solve_problem")

    def at_cuts(self) -> "Problem":
        """The same problem over blocks of units between legal cuts, so every boundary is legal.

        Stage (i, l] of blocks is stage (ends[i-1], ends[l-1]] of units; the prefix sums are the very
        same numbers, so every stage time, memory and hop is computed identically: solving this one is
        exactly solving the original among plans with legal cuts.
        """
        if self.cuts is None:
            return self
        at = np.concatenate(([0], self.ends))
        return replace(self, time_prefix=self.time_prefix[:, at], memory_prefix=self.memory_prefix[at],
                       cut_bytes=None if self.cut_bytes is None else self.cut_bytes[at], cuts=None)

    def periods(self, cuts) -> tuple[list[float], float]:
        """Each stage's period and the input hop. A stage computes while it sends (the runtime's sender
        thread), so its period is max(compute, sending its output cut); the input reaching the first
        device is a resource of its own. Without links, periods are the compute times."""
        periods = []
        for i, (j, k, d) in enumerate(cuts):
            following = cuts[i + 1][2] if i + 1 < len(cuts) else None
            periods.append(max(self.stage_cpu_ms(j, k, d), self.hop_ms(k, d, following)))
        return periods, self.hop_ms(0, None, cuts[0][2]) if cuts else 0.0

    @property
    def U(self) -> int:
        return self.time_prefix.shape[1] - 1

    @property
    def N(self) -> int:
        return len(self.speed)

    @property
    def whole_ms(self) -> np.ndarray:
        """The whole model's time on each device."""
        return self.time_prefix[:, -1] / self.speed

    @property
    def ideal_ms(self) -> float:
        """Bottleneck if work could be split perfectly in proportion to speed: sum(E) / sum(C), or with
        per-device times 1 / sum(1 / whole model time on d)."""
        whole = self.whole_ms
        if np.all(self.time_prefix == self.time_prefix[0]):
            return float(self.time_prefix[0, -1] / self.speed.sum())
        return float(1.0 / np.sum(1.0 / whole)) if np.all(whole > 0) else 0.0

    def stage_time(self, j: int, k: int, d: int) -> float:
        return float(stage_compute_ms(self.time_prefix[d], self.speed[d], j, k))

    def link_cpu_ms(self, j, k, d: int):
        """Stage (j, k]'s CPU on device d for its links and frames (0 in the paper's model); j and k may be index
        arrays."""
        if self.link_cpu is None:
            return 0.0
        assert self.cut_bytes is not None  # from_lists refuses link CPU without cut sizes
        return stage_link_cpu_ms(self.link_cpu[:, d], self.cut_bytes, j, k)

    def stage_cpu_ms(self, j: int, k: int, d: int) -> float:
        """Stage (j, k]'s time on device d with its link CPU (stage_time in the paper's model), as config computes it
        for the planners, the plans and the fleet's prediction alike."""
        return float(stage_cpu_ms(self.stage_time(j, k, d), self.link_cpu_ms(j, k, d)))

    def stage_cpu_times(self, j: int, ks: slice, d: int) -> np.ndarray:
        """stage_cpu_ms of stages (j, k] on device d for every k in the slice, with the same arithmetic."""
        if self.link_cpu is None:
            return self.stage_times(j, ks, d)
        return stage_cpu_ms(self.stage_times(j, ks, d), self.link_cpu_ms(j, self.cut_index[ks], d))

    def stage_cpu_grid(self, d: int, ks: slice) -> np.ndarray:
        """stage_cpu_ms of every stage (j, k] on device d, [k in the slice, j in 0..U], same arithmetic (entries
        with j >= k are meaningless)."""
        j, k = self.cut_index[None, :], self.cut_index[ks][:, None]
        compute = stage_compute_ms(self.time_prefix[d], self.speed[d], j, k)
        if self.link_cpu is None:
            return compute
        return stage_cpu_ms(compute, self.link_cpu_ms(j, k, d))

    def most_link_cpu_ms(self) -> float:
        """No stage's link CPU exceeds this (receiving and sending the largest cut, and a frame)."""
        if self.link_cpu is None or self.cut_bytes is None:
            return 0.0
        most = float(self.cut_bytes.max())
        return max(float(link_cpu_ms(self.link_cpu[:, d], most, most)) for d in range(self.N))

    def stage_memory(self, j: int, k: int) -> float:
        return float(self.memory_prefix[k] - self.memory_prefix[j])

    def fits(self, j: int, k: int, d: int) -> bool:
        return self.stage_memory(j, k) <= self.capacity[d]

    def stage_times(self, j: int, ks: slice, d: int) -> np.ndarray:
        """Times of stages (j, k] on device d for every k in the slice."""
        return stage_compute_ms(self.time_prefix[d], self.speed[d], j, ks)

    def last_end(self, j: int, d: int, time_limit: float = np.inf) -> int:
        """Largest k >= j such that stage (j, k] fits device d's memory and takes <= time_limit.

        Returns j when not even unit j+1 fits. Binary search, then an exact correction with the
        same arithmetic as stage_time/stage_memory so that searches and checks never disagree.
        """
        P, RP, U = self.time_prefix[d], self.memory_prefix, self.U
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
