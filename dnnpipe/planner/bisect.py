"""Exact planning by bisection on the bottleneck (beyond the paper): much faster than the DP.

Feasibility of a bottleneck T is decided exactly by a DP over sets of used devices: reach[S] is the
longest unit prefix that the devices in S can cover, each with one stage of time <= T within its
memory. A longer prefix never hurts (a stage starting later can end at least as late), so each
device in turn extends greedily: reach[S] = max over d in S of end(reach[S - d], d, T). The end of
a greedy stage from every start j is one vectorised search per device, after which the DP is pure
array gathers, layer by layer over |S|.

Identical devices (same times, speed and memory) are one type with a count, as in PipeEdge: the DP
runs over count vectors, so ten identical boards cost 11 states, not 1024.

The search: probing upwards from a lower bound brackets the optimum between an infeasible T and
the real bottleneck of a feasible plan; the optimum is one of the stage times inside the bracket,
so a binary search over those values (each probe with the plan's own arithmetic) ends exactly on
it: the true optimum, not an approximation. Only stages that fit their device's memory are
candidates: when memory binds, the optimum lies far above the compute-only lower bound, and the
wide bracket used to hold hundreds of thousands of stage times that no plan can use (sorting them
cost 50-90 ms at U=1000). The bracket is also narrowed until few candidates remain, counted before
any is listed, and an infeasible probe reports the next limit at which any greedy stage could grow
(below it nothing changes), so the search skips straight there: binding memory makes the search
start far below the optimum, and these jumps cut the probes it then needs.
"""

from __future__ import annotations

import sys
from bisect import bisect_right
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from .plan import Cut, Solution
from .problem import Problem

MAX_CANDIDATES = 1 << 12


def max_ends(prefix: np.ndarray, scale: float, limit: float) -> np.ndarray:
    """For every start j, the largest k >= j with (prefix[k] - prefix[j]) / scale <= limit."""
    U = len(prefix) - 1
    starts = np.arange(U + 1)
    ends = np.searchsorted(prefix, prefix + limit * scale, side="right") - 1
    ends = np.clip(ends, starts, U)
    # Exact correction with the plan's own arithmetic (the search compared a rounded sum).
    while True:
        over = (ends > starts) & ((prefix[ends] - prefix) / scale > limit)
        if not over.any():
            break
        ends[over] -= 1
    while True:
        nxt = np.minimum(ends + 1, U)
        under = (ends < U) & ((prefix[nxt] - prefix) / scale <= limit)
        if not under.any():
            break
        ends[under] += 1
    return ends


@dataclass(frozen=True)
class DeviceTypes:
    members: tuple[tuple[int, ...], ...]  # device indices of each type

    @classmethod
    def of(cls, problem: Problem) -> "DeviceTypes":
        groups: dict[tuple, list[int]] = {}
        for d in range(problem.N):
            key = (float(problem.speed[d]), float(problem.capacity[d]), problem.time_prefix[d].tobytes())
            groups.setdefault(key, []).append(d)
        return cls(tuple(tuple(g) for g in groups.values()))


class StateSpace:
    """Count vectors of used devices per type, in mixed radix, grouped by how many devices they use."""

    def __init__(self, counts: list[int]):
        self.radices = np.array(counts) + 1
        self.strides = np.concatenate(([1], np.cumprod(self.radices[:-1]))).astype(np.int64)
        self.size = int(np.prod(self.radices))
        index = np.arange(self.size)
        digits = (index[:, None] // self.strides[None, :]) % self.radices[None, :]
        used = digits.sum(axis=1)
        # layers[l] = [(type, states using l devices with one of this type, the states before it)]
        self.layers = []
        for layer in range(1, int(used.max()) + 1):
            groups = []
            for t in range(len(counts)):
                states = np.flatnonzero((used == layer) & (digits[:, t] > 0))
                if states.size:
                    groups.append((t, states, states - self.strides[t]))
            self.layers.append(groups)
        self.used = used
        self.digits = digits
        # tables[l] = (states using l + 1 devices, [state, type] -> the state before it, or `size` if the
        # state has no device of that type): one gather per layer for the vector probe.
        self.tables = []
        for layer in range(1, int(used.max()) + 1):
            states = np.flatnonzero(used == layer)
            before = states[:, None] - self.strides[None, :]
            self.tables.append((states, np.where(digits[states] > 0, before, self.size)))


def lowest_ids_key(masks: np.ndarray, N: int) -> np.ndarray:
    """Sort key (smaller first) for device sets of equal size: the set whose sorted ids come first.

    Between two such sets, the one holding the lowest device of their difference comes first, so
    the bit of device 0 weighs most: reverse the bits and take the larger.
    """
    key = np.zeros(len(masks), dtype=np.int64)
    for d in range(N):
        key |= ((masks >> d) & 1) << (N - 1 - d)
    return -key


def choose_state(done: np.ndarray, used: np.ndarray, masks: np.ndarray, N: int) -> int:
    """The tie-break shared by every algorithm: fewest devices, then the lowest device ids."""
    return int(done[np.lexsort((lowest_ids_key(masks[done], N), used[done]))[0]])


class Probe:
    """Is a bottleneck T feasible, and with which plan?

    Two executions of the same DP: over large state spaces every step is a NumPy gather from
    per-type tables of greedy ends; over small ones (the paper's 4 devices: 16 states) NumPy's call
    overhead would dominate, so the same steps run on Python lists with the bisect module, which
    computes the same IEEE doubles.
    """

    SCALAR_STATES = 64

    def __init__(self, problem: Problem):
        self.problem = problem
        self.types = DeviceTypes.of(problem)
        self.space = StateSpace([len(m) for m in self.types.members])
        self.first = [m[0] for m in self.types.members]
        self.memory_ends = np.stack([max_ends(problem.memory_prefix, 1.0, problem.capacity[d]) for d in self.first])
        # The devices a state uses: the lowest ids of each type (any member would do; the lowest is the rule).
        lowest = [np.concatenate(([0], np.cumsum([1 << d for d in m]))) for m in self.types.members]
        self.masks = sum((lowest[t][self.space.digits[:, t]] for t in range(len(lowest))),
                         np.zeros(self.space.size, dtype=np.int64))
        self.scalar = self.space.size <= self.SCALAR_STATES
        if self.scalar:
            self.prefix_lists = [problem.time_prefix[d].tolist() for d in self.first]
            self.speed_list = [float(problem.speed[d]) for d in self.first]
            self.memory_lists = [ends.tolist() for ends in self.memory_ends]
            self.layer_lists = [[(t, states.tolist(), before.tolist()) for t, states, before in groups]
                                for groups in self.space.layers]
        self.transitions = 0
        self.probes = 0

    def __call__(self, limit: float) -> Optional[tuple[float, list[Cut]]]:
        self.probes += 1
        self.infeasible_below = limit
        reach, choice = self._reach_scalar(limit) if self.scalar else self._reach_vector(limit)
        U = self.problem.U
        done = np.flatnonzero(np.asarray(reach) == U)
        if done.size == 0:
            if not self.scalar:
                self.infeasible_below = self._next_event(np.unique(reach))
            return None
        return self._plan(choose_state(done, self.space.used, self.masks, self.problem.N), reach, choice)

    def _next_event(self, starts: np.ndarray) -> float:
        """The smallest T > limit at which some stage from a reached start j could take one more unit.

        Below it every greedy end the DP used stays the same (memory-bound ones never move), so every
        reach does: all of [limit, T) is infeasible, and the search may skip there at once.
        """
        problem, event = self.problem, np.inf
        starts = starts[(starts >= 0) & (starts < problem.U)]
        for d, memory, time_ends in zip(self.first, self.memory_ends, self.time_ends):
            P, scale = problem.time_prefix[d], problem.speed[d]
            ends = time_ends[starts]
            grows = (ends < memory[starts]) & (ends < problem.U)
            if grows.any():
                event = min(event, float(np.min((P[ends[grows] + 1] - P[starts[grows]]) / scale)))
        return event

    def _reach_vector(self, limit: float):
        problem, space = self.problem, self.space
        self.time_ends = np.stack([max_ends(problem.time_prefix[d], problem.speed[d], limit) for d in self.first])
        ends = np.minimum(self.time_ends, self.memory_ends)
        # Row t ends with -1 at index U + 1, the reach of the placeholder state `size`: never the best.
        ends = np.concatenate((ends, np.full((len(ends), 1), -1)), axis=1)
        reach = np.full(space.size + 1, -1, dtype=np.int64)
        reach[0], reach[space.size] = 0, problem.U + 1
        choice = np.full(space.size, -1, dtype=np.int64)
        types = np.arange(len(ends))[None, :]
        for states, before in space.tables:
            candidate = ends[types, reach[before]]
            best = candidate.argmax(axis=1)  # the first type wins ties, as in the scalar probe
            reach[states] = candidate[np.arange(len(states)), best]
            choice[states] = best
            self.transitions += int((before < space.size).sum())
        return reach[:-1], choice

    def _reach_scalar(self, limit: float):
        U, speeds = self.problem.U, self.speed_list
        reach = [-1] * self.space.size
        reach[0] = 0
        choice = [-1] * self.space.size
        for groups in self.layer_lists:
            for t, states, before in groups:
                P, scale, memory = self.prefix_lists[t], speeds[t], self.memory_lists[t]
                for state, previous in zip(states, before):
                    j = reach[previous]
                    k = min(max(bisect_right(P, P[j] + limit * scale) - 1, j), U)
                    while k > j and (P[k] - P[j]) / scale > limit:
                        k -= 1
                    while k < U and (P[k + 1] - P[j]) / scale <= limit:
                        k += 1
                    k = min(k, memory[j])
                    if k > reach[state]:
                        reach[state], choice[state] = k, t
                self.transitions += len(states)
        return reach, choice

    def _plan(self, state: int, reach: Sequence[int], choice: Sequence[int]) -> tuple[float, list[Cut]]:
        spare = [list(m) for m in self.types.members]
        stages = []
        while state != 0:
            t = int(choice[state])
            before = state - int(self.space.strides[t])
            if reach[state] > reach[before]:
                stages.append((int(reach[before]), int(reach[state]), t))
            state = before
        cuts = [(j, k, spare[t].pop(0)) for j, k, t in reversed(stages)]
        return max(self.problem.stage_time(*c) for c in cuts), cuts


def lower_bound(problem: Problem) -> float:
    """No plan beats the costliest unit on its best device, nor (with one time row) sum(E)/sum(C)."""
    floor = float(np.max(np.min(np.diff(problem.time_prefix, axis=1) / problem.speed[:, None], axis=0)))
    if np.all(problem.time_prefix == problem.time_prefix[0]):
        floor = max(floor, problem.ideal_ms)
    return floor


def stage_times_between(problem: Problem, devices: Sequence[int], memory_ends: Sequence[np.ndarray] | np.ndarray,
                        low: float, high: float, limit: int = MAX_CANDIDATES) -> Optional[np.ndarray]:
    """Every stage time in (low, high] on the given devices of a stage that fits the device's memory (their
    greedy memory ends given), sorted; None if more than `limit` stages qualify (counted before any is listed)."""
    spans = []
    for d, memory in zip(devices, memory_ends):
        P, scale = problem.time_prefix[d], problem.speed[d]
        first = np.minimum(max_ends(P, scale, low), memory)
        last = np.minimum(max_ends(P, scale, high), memory)
        spans.append((P, scale, first, last - first))
    if sum(int(counts.sum()) for *_, counts in spans) > limit:
        return None
    values = [np.empty(0)]
    for P, scale, first, counts in spans:
        starts = np.repeat(np.arange(problem.U + 1), counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        ends = first[starts] + 1 + offsets
        values.append((P[ends] - P[starts]) / scale)
    return np.unique(np.concatenate(values))


Found = tuple[float, list[Cut]]  # a plan's real bottleneck and its stages


class Prober(Protocol):
    """A feasibility probe; after an infeasible probe, `infeasible_below` (>= the limit) says how far up
    every limit is infeasible too."""

    infeasible_below: float

    def __call__(self, limit: float) -> Optional[Found]: ...


def search(probe: Prober, bound: float, top: float,
           candidates: Callable[[float, float, int], Optional[np.ndarray]]) -> Optional[Found]:
    """The smallest feasible bottleneck, exactly, given a probe, a lower bound, a value no plan exceeds
    and the candidate values in a bracket (low, high] (None when more than a limit).

    Returns the probe's plan at the optimum itself: the tie-break rule's plan (see planner.canonical).
    """
    best: Optional[Found] = None
    best_limit = np.nan  # the limit of the probe that found `best`
    floor = -np.inf  # every limit below it is infeasible

    def feasible(limit: float) -> bool:
        nonlocal best, best_limit, floor
        found = probe(limit)
        if found is not None:
            best, best_limit = found, limit
        else:
            floor = max(floor, probe.infeasible_below)
        return found is not None

    # Bracket: the optimum lies in (low, best], found by probing upwards from the lower bound.
    low = bound * (1 - 1e-12) if bound > 0 else -1.0  # strictly below the optimum
    step = 1e-3
    while not feasible(limit := min(max(bound * (1 + step), floor), top) if bound > 0 else top):
        if limit >= top or floor == np.inf:  # no limit up to `top`, or no stage can ever grow
            return None
        low, step = max(limit, float(np.nextafter(floor, -np.inf))), step * 4
    assert best is not None
    # Exact: binary search over the candidates in the bracket (bisect the bracket first if crowded).
    while True:
        values = candidates(low, best[0], MAX_CANDIDATES)
        if values is not None:
            break
        middle = (low + best[0]) / 2
        if not low < middle < best[0]:  # crowded by equal values: list them after all
            values = candidates(low, best[0], sys.maxsize)
            break
        if not feasible(middle):
            low = max(middle, float(np.nextafter(floor, -np.inf)))
    assert values is not None
    lo, hi = 0, int(np.searchsorted(values, best[0], side="right"))  # values[hi - 1] == best
    while lo < hi - 1:
        middle = (lo + hi) // 2
        if feasible(float(values[middle - 1])):
            hi = int(np.searchsorted(values, best[0], side="right"))
        else:
            lo = max(middle, int(np.searchsorted(values, floor, side="left")))
    return best if best_limit == best[0] else probe(best[0])


def solve(problem: Problem) -> Optional[Solution]:
    problem.units_are_blocks()
    probe = Probe(problem)
    top = float(problem.whole_ms.max())  # no stage can take longer: only memory can fail here
    best = search(probe, lower_bound(problem), top,
                  lambda low, high, limit: stage_times_between(problem, probe.first, probe.memory_ends, low, high,
                                                               limit))
    return None if best is None else Solution(tuple(best[1]), probe.transitions, canonical=True)
