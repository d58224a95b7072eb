"""Exact planning by bisection on the bottleneck (beyond the paper): much faster than the DP.

Feasibility of a bottleneck T is decided exactly by a DP over the devices used: reach[S] is the
longest unit prefix that the devices in S can cover, each with one stage of time <= T within its
memory. A longer prefix never hurts (a stage starting later can end at least as late), so each
device in turn extends greedily: reach[S] = max over d in S of end(reach[S - d], d, T). The end of
a greedy stage from every start j is one vectorised search per device type.

Identical devices (same times, speed and memory) are one type with a count, as in PipeEdge: the DP
runs over count vectors (how many devices of each type are used), so a fleet of 1,000 boards of 3
kinds costs count vectors of 3 numbers, never sets of 1,000 bits. It runs layer by layer over the
number of devices used and stops at the first layer that covers the model: that is the fewest
devices. States that cannot matter are dropped (all of them in the sparse frontier used for the
largest spaces; the last two in the dense probe, which marks them as reaching nothing):
- a state whose reach equals that of a state with one device fewer (its predecessor) is dominated:
  anything it leads to, the predecessor reaches with one device fewer;
- a state whose remaining devices lack the memory for the remaining units can never finish (each
  counted with the most a stage of its type can hold from there on: units do not pack memory fully);
- a type is never used more often than it takes to cover the whole model alone at the lower bound
  (the cap): a plan using it more often has more devices than that plan.
All three keep every feasible T feasible and every plan with the fewest devices.

The search: probing upwards from a lower bound brackets the optimum between an infeasible T and
the real bottleneck of a feasible plan; the optimum is one of the stage times inside the bracket,
so a binary search over those values (each probe with the plan's own arithmetic) ends exactly on
it: the true optimum, not an approximation. Only stages that fit their device's memory are
candidates, the bracket is narrowed until few candidates remain (counted before any is listed),
and an infeasible probe reports the next limit at which any greedy stage it used could grow (below
it nothing changes), so the search skips straight there.
"""

from __future__ import annotations

import sys
from bisect import bisect_right
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from ..errors import ConfigError
from .plan import Cut, Solution
from .problem import Problem

MAX_CANDIDATES = 1 << 12
MAX_INDEX = 1 << 62  # count vectors are numbered in mixed radix in int64
CHECK_EVERY = 16  # the dense probe drops states that cannot finish every this many layers (4: 20% slower)
CHECKED_STATES = 1 << 12  # ... over more count vectors than this (below, the checks cost more than they save)
DENSE_BYTES = 1 << 28  # up to tables this large (8 + 6 x types bytes a count vector) the probe runs over all of them
MAX_FRONTIER = 1 << 24  # states x types^2 in one layer (a count vector per (state, type) pair): beyond, GBs and minutes


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
    """Devices that no plan can tell apart, grouped; types are ordered by their lowest device id."""

    members: tuple[tuple[int, ...], ...]  # device indices of each type, ascending

    @classmethod
    def of(cls, problem: Problem) -> "DeviceTypes":
        """Same speed, memory and time row; with links also the same B and link CPU, and with a B_link matrix
        never grouped (a matrix row is a device's own)."""
        groups: dict[tuple, list[int]] = {}
        for d in range(problem.N):
            key: tuple = (float(problem.speed[d]), float(problem.capacity[d]), problem.time_prefix[d].tobytes())
            if problem.link_mbps is not None:
                key += (float(problem.link_mbps[d]),)
            if problem.link_matrix is not None:
                key += (d,)
            if problem.link_cpu is not None:
                key += tuple(float(x) for x in problem.link_cpu[:, d])
            groups.setdefault(key, []).append(d)
        return cls(tuple(tuple(g) for g in groups.values()))

    @property
    def counts(self) -> list[int]:
        return [len(m) for m in self.members]

    def lowest_ids(self, digits: np.ndarray) -> int:
        """Among count vectors (rows) of equal total, the row whose devices (the lowest ids of each type)
        have the lowest sorted ids: scanning ids upwards, the first device some rows hold and others do
        not decides. Only the ids where rows differ are scanned (no bit masks: any N)."""
        rows = np.arange(len(digits))
        low, high = digits.min(axis=0), digits.max(axis=0)
        differing = sorted(d for t, m in enumerate(self.members) for d in m[low[t]:high[t]])
        rank = {d: (t, r) for t, m in enumerate(self.members) for r, d in enumerate(m[low[t]:high[t]], low[t])}
        for d in differing:
            if len(rows) == 1:
                break
            t, r = rank[d]
            holds = digits[rows, t] > r
            if holds.any() and not holds.all():
                rows = rows[holds]
        return int(rows[0])


class StateSpace:
    """Count vectors c (0 <= c[t] <= caps[t]) numbered in mixed radix."""

    def __init__(self, caps: Sequence[int], factor: int = 1):
        """`factor`: a bound on what the caller multiplies state ids by (packed sort keys), kept below 2^62."""
        self.caps = np.asarray(caps, dtype=np.int64)
        radices = self.caps + 1
        size = 1
        for radix in radices.tolist():
            size *= radix
        if size * factor >= MAX_INDEX:
            raise ConfigError(f"the planner handles clusters whose device types give prod(count + 1) x (U + 1) x "
                              f"types < 2^62 (count vectors numbered in 64 bits); this one has {len(radices)} types of "
                              f"{'/'.join(str(int(c)) for c in self.caps)} usable devices")
        self.radices = radices
        self.strides = np.concatenate(([1], np.cumprod(radices[:-1]))).astype(np.int64)
        self.size = size

    def digits(self, states: np.ndarray) -> np.ndarray:
        return (states[:, None] // self.strides[None, :]) % self.radices[None, :]

    def tables(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Every state but 0 by how many devices it uses: tables[l - 1] = (the states using l devices,
        [type, state] -> the state with one device of that type fewer, or `size` if it has none (a row
        per type: contiguous gathers), [type, state] -> the devices of that type it leaves spare (rows too))."""
        # Each type's digit of every id as a tiled column (no divisions), the ids by layer with a radix sort.
        small = np.int16 if int(self.caps.sum()) < np.iinfo(np.int16).max else np.int32
        columns = [np.tile(np.repeat(np.arange(radix, dtype=small), stride), self.size // (radix * stride))
                   for radix, stride in zip(self.radices.tolist(), self.strides.tolist())]
        used = columns[0].copy()
        for column in columns[1:]:
            used += column
        ordered = np.argsort(used, kind="stable").astype(np.int64)  # by layer, then by id
        bounds = np.cumsum(np.bincount(used))[:-1]
        digits = np.stack([column[ordered] for column in columns], axis=1)
        caps = self.caps.astype(small)
        tables = []
        for layer, held in zip(np.split(ordered, bounds)[1:], np.split(digits, bounds)[1:]):
            before = np.where(held.T > 0, (layer[None, :] - self.strides[:, None]).astype(np.int32),
                              np.int32(self.size))
            tables.append((layer, before, np.ascontiguousarray(caps[:, None] - held.T)))
        return tables

    def layers(self) -> list[list[tuple[int, list[int], list[int]]]]:
        """Every state grouped by how many devices it uses: layers[l - 1] = [(type, states using l devices
        with one of this type, the states before it)]. Dense: for the small spaces of the scalar probe."""
        states = np.arange(self.size)
        digits = self.digits(states)
        used = digits.sum(axis=1)
        layers = []
        for layer in range(1, int(used.max()) + 1):
            groups = []
            for t in range(len(self.caps)):
                chosen = np.flatnonzero((used == layer) & (digits[:, t] > 0))
                if chosen.size:
                    groups.append((t, chosen.tolist(), (chosen - self.strides[t]).tolist()))
            layers.append(groups)
        return layers


@dataclass
class Layer:
    """The kept states using one number of devices: sorted ids, their reach and the type added last."""

    states: np.ndarray
    reach: np.ndarray
    choice: np.ndarray
    digits: np.ndarray  # the count vector of each state


def stages_to_finish(ends: np.ndarray) -> np.ndarray:
    """h[r]: the fewest stages that cover units r+1..U with unlimited devices of every type (inf if none
    can): always the furthest end, optimal because ends are monotone in the start. With counts limited
    no plan needs fewer, so a state using l devices with l + h[reach] above a known plan's count is cut."""
    furthest = ends.max(axis=0).tolist()
    U = len(furthest) - 1
    h = [0.0] * (U + 1)
    for r in range(U - 1, -1, -1):
        h[r] = np.inf if furthest[r] == r else 1 + h[furthest[r]]
    return np.array(h)


def greedy_count(ends: np.ndarray) -> float:
    """How many stages cover the model following greedy ends from unit 0; inf if they get stuck."""
    U, j, count = len(ends) - 1, 0, 0
    while j < U:
        k = int(ends[j])
        if k == j:
            return np.inf
        j, count = k, count + 1
    return count


class Probe:
    """Is a bottleneck T feasible, and with which plan?

    Three executions of the same DP. Over small state spaces (the paper's 4 devices: 16 states) NumPy's
    call overhead would dominate, so it runs on Python lists with the bisect module, which computes the
    same IEEE doubles. Up to DENSE_BYTES of tables it runs over all of them, one gather per layer
    from tables built once. Beyond, over a sparse frontier of the states that can still matter.
    """

    SCALAR_STATES = 64

    def __init__(self, problem: Problem):
        self.problem = problem
        self.types = DeviceTypes.of(problem)
        self.first = [m[0] for m in self.types.members]
        self.memory_ends = np.stack([max_ends(problem.memory_prefix, 1.0, problem.capacity[d]) for d in self.first])
        # room[t, r]: the most memory one stage of type t starting at unit r or later can hold (never more
        # than M[t]; less where units do not pack it): the remaining devices must hold what is left.
        RP = problem.memory_prefix
        unit_ms = np.diff(problem.time_prefix[self.first], axis=1) / problem.speed[self.first][:, None]
        self.best_prefix = np.concatenate(([0.0], np.cumsum(unit_ms.min(axis=0))))
        self.room = np.ascontiguousarray(
            np.maximum.accumulate((RP[self.memory_ends] - RP[None, :])[:, ::-1], axis=1)[:, ::-1])
        self.space = StateSpace(self._caps(lower_bound(problem)), (problem.U + 1) * len(self.first))
        self.scalar = self.space.size <= self.SCALAR_STATES
        dense = self.space.size * (8 + 6 * len(self.first)) <= DENSE_BYTES
        self.tables = self.space.tables() if not self.scalar and dense else None
        if self.scalar:
            self.prefix_lists = [problem.time_prefix[d].tolist() for d in self.first]
            self.speed_list = [float(problem.speed[d]) for d in self.first]
            self.memory_lists = [ends.tolist() for ends in self.memory_ends]
            self.layer_lists = self.space.layers()
        self.transitions = 0
        self.probes = 0
        self.infeasible_below = -np.inf
        self.cut_by_count = False
        self.found_counts: list[tuple[float, int]] = []  # (feasible limit, fewest devices there)

    def _caps(self, bound: float) -> list[int]:
        """Per type, the most devices a plan with the fewest devices can use at any T >= the lower bound:
        its count, U, and the stages it takes alone to cover the model (greedy at just below the bound;
        that count only falls as T grows)."""
        problem, low = self.problem, bound * (1 - 1e-9) if bound > 0 else 0.0
        caps = []
        for d, count, memory in zip(self.first, self.types.counts, self.memory_ends):
            alone = greedy_count(np.minimum(max_ends(problem.time_prefix[d], problem.speed[d], low), memory))
            caps.append(int(min(count, problem.U, alone)))
        return caps

    def __call__(self, limit: float) -> Optional[tuple[float, list[Cut]]]:
        self.probes += 1
        self.infeasible_below = limit
        problem = self.problem
        if self.scalar:
            return self._scalar(limit)
        self.time_ends = np.stack([max_ends(problem.time_prefix[d], problem.speed[d], limit) for d in self.first])
        ends = np.minimum(self.time_ends, self.memory_ends)
        if self.tables is not None:
            return self._dense(ends, self.tables)
        layers = self._deepening(limit, ends)
        if layers[-1].reach.size == 0 or layers[-1].reach.max() < problem.U:
            # States cut off by the stage count depend on ends from starts no kept state reached.
            starts = np.arange(problem.U + 1) if self.cut_by_count else np.concatenate([x.reach for x in layers])
            self.infeasible_below = self._next_event(np.unique(starts))
            return None
        last = layers[-1]
        done = np.flatnonzero(last.reach == problem.U)
        state = int(last.states[done[self.types.lowest_ids(self.space.digits(last.states[done]))]])
        return self._walk_back(state, layers)

    def _dense(self, ends: np.ndarray, tables: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
               ) -> Optional[tuple[float, list[Cut]]]:
        """The DP over every count vector, layer by layer, one gather per layer; stops at the first layer
        that covers the model (the fewest devices). The type each state added last is found on the way
        back, not stored."""
        space, U = self.space, self.problem.U
        # Row t ends with -1 at index U + 1, the reach of the placeholder state `size`: never the best.
        small = np.int16 if U + 2 < np.iinfo(np.int16).max else np.int32
        ends = np.concatenate((ends, np.full((len(ends), 1), -1)), axis=1).astype(small)
        reach = np.full(space.size + 1, -1, dtype=small)
        reach[0], reach[space.size] = 0, U + 1
        hopeless = self._hopeless(ends[:, :-1]) if space.size > CHECKED_STATES else None
        flat, rows = ends.ravel(), (np.arange(len(ends)) * (U + 2))[:, None]
        self.cut_by_count = False
        for layer, (states, before, spare) in enumerate(tables):
            if len(states) < 1024:  # one gather for all types (fewer calls); large layers: contiguous rows
                reached = flat[reach[before] + rows].max(axis=0)
            else:
                # .take: several times faster than [] with these small integer indices (no intp copy).
                reached = ends[0].take(reach.take(before[0]))
                for t in range(1, len(before)):
                    np.maximum(reached, ends[t].take(reach.take(before[t])), out=reached)
            self.transitions += before.size
            done = states[reached == U]
            if done.size:
                reach[states] = reached
                state = int(done[self.types.lowest_ids(space.digits(done))])
                return self._walk(state, reach, self._choices(state, reach, ends))
            if hopeless is not None and layer % CHECK_EVERY == CHECK_EVERY - 1:  # those that cannot finish: -1
                alive = reached >= 0
                dead = alive & hopeless(reached, spare)
                self.cut_by_count |= bool(dead.any())  # the work test depends on the limit: no reach-based jump
                reached[dead] = -1
                if not (alive & ~dead).any():
                    reach[states] = reached
                    break
            reach[states] = reached
        starts: np.ndarray = np.arange(U + 1) if self.cut_by_count else reach[:-1].astype(np.int64)
        self.infeasible_below = self._next_event(np.unique(starts[starts >= 0]))
        return None

    def _hopeless(self, ends: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """A test for states (reach, spare devices per type) that cannot finish at this limit: the spare
        devices lack the memory (room) or the time (work, in units' times on their fastest type) for
        the units left. Valid for any limit; the work test depends on it."""
        U, RP, best = self.problem.U, self.problem.memory_prefix, self.best_prefix
        work = np.ascontiguousarray(np.maximum.accumulate((best[ends] - best[None, :])[:, ::-1], axis=1)[:, ::-1])
        memory_left, work_left = RP[U] - RP, best[U] - best

        def held(rows: np.ndarray, at: np.ndarray, spare: np.ndarray) -> np.ndarray:
            """What the spare devices ([type, state]) can hold from `at` on: a sum over types, one row each."""
            total = spare[0] * rows[0].take(at)
            for t in range(1, len(rows)):
                total += spare[t] * rows[t].take(at)
            return total

        def test(reach: np.ndarray, spare: np.ndarray) -> np.ndarray:
            at = np.maximum(reach, 0)
            short_of_memory = memory_left.take(at) > held(self.room, at, spare) * (1 + 1e-9) + 1e-9
            return short_of_memory | (work_left.take(at) > held(work, at, spare) * (1 + 1e-9) + 1e-12)

        return test

    def _choices(self, state: int, reach: np.ndarray, ends: np.ndarray) -> dict[int, int]:
        """Along the way back from a state: the first type whose stage from the state before reaches it."""
        strides, choice = self.space.strides, {}
        while state != 0:
            digits = self.space.digits(np.array([state]))[0]
            t = next(t for t in range(len(strides))
                     if digits[t] > 0 and ends[t][reach[state - strides[t]]] == reach[state])
            choice[state] = t
            state -= int(strides[t])
        return choice

    def _walk(self, state: int, reach: Sequence[int] | np.ndarray, choice: Sequence[int] | dict[int, int]
              ) -> tuple[float, list[Cut]]:
        """Back from a state that covers the model, through the type each state added last."""
        stages = []
        while state != 0:
            t = int(choice[state])
            before = state - int(self.space.strides[t])
            if reach[state] > reach[before]:
                stages.append((int(reach[before]), int(reach[state]), t))
            state = before
        return self._assign(stages[::-1])

    def _deepening(self, limit: float, ends: np.ndarray) -> list[Layer]:
        """The frontier with at most `most` devices, `most` raised until it covers the model or is the caps' total.

        `most` starts at the fewest stages any plan needs (unlimited devices, stages_to_finish) or at the
        devices of a feasible plan at a larger limit, whichever is more (fewer devices never do below it);
        a plan found within `most` devices is one with the fewest devices, as every state on the way to it
        has l + h[reach] <= its own count. The last round (all caps) decides infeasibility.
        """
        to_finish = stages_to_finish(ends)
        total = int(self.space.caps.sum())
        floor = max([to_finish[0], *(count for above, count in self.found_counts if above >= limit)])
        self.cut_by_count = False
        if floor > total:
            self.cut_by_count = True
            none = np.zeros(0, dtype=np.int64)
            return [Layer(none, none, none, np.zeros((0, len(self.first)), dtype=np.int64))]
        slack = 0
        while True:
            most = min(int(floor) + slack, total)
            layers = self._frontier(ends, to_finish, most)
            if layers[-1].reach.size and layers[-1].reach.max() == self.problem.U:
                self.found_counts.append((limit, len(layers) - 1))
                return layers
            if most >= total:
                return layers
            slack = max(1, slack * 4)

    def _frontier(self, ends: np.ndarray, to_finish: np.ndarray, most: int) -> list[Layer]:
        """Layers of kept states up to the first that covers the model (or none is left)."""
        space, U, k = self.space, self.problem.U, len(self.space.caps)
        RP, best = self.problem.memory_prefix, self.best_prefix
        # The same for time: best[u] is unit u's time on its fastest type, so a stage of type t from r on
        # holds at most work[t, r] of it, and the remaining devices must hold what is left (depends on T).
        work = np.maximum.accumulate((best[ends] - best[None, :])[:, ::-1], axis=1)[:, ::-1]
        types = np.broadcast_to(np.arange(k), (1, k))
        zero = np.zeros(1, dtype=np.int64)
        layers = [Layer(zero, zero, zero - 1, np.zeros((1, k), dtype=np.int64))]
        while True:
            current = layers[-1]
            if current.states.size * k * k > MAX_FRONTIER:
                raise ConfigError(f"planning this cluster would keep {current.states.size * k} count vectors of {k} "
                                  f"numbers in one layer, over the planner's limit of {MAX_FRONTIER} numbers: its "
                                  f"{self.problem.N} devices form {k} types (identical speed, memory and unit "
                                  f"times); group them into fewer")
            grows = current.digits < space.caps[None, :]
            if not grows.any():
                return layers + [Layer(zero[:0], zero[:0], zero[:0], current.digits[:0])]
            # Every successor (state + one device of type t) with its reach; sorted by state, highest reach
            # first, then the lowest type: one sort of packed keys.
            after = (current.states[:, None] + space.strides[None, :])[grows]
            reach = ends[types, current.reach[:, None]][grows]
            keys = np.sort((after * (U + 1) + (U - reach)) * k + np.broadcast_to(types, grows.shape)[grows])
            self.transitions += int(keys.size)
            after = keys // ((U + 1) * k)
            first = np.concatenate(([True], after[1:] != after[:-1]))
            states, keys = after[first], keys[first]
            reach, choice = U - (keys // k) % (U + 1), keys % k
            if (reach == U).any():
                done = reach == U
                return layers + [Layer(states[done], reach[done], choice[done], space.digits(states[done]))]
            digits = space.digits(states)
            spare = space.caps[None, :] - digits
            keep = ~self._dominated(states, reach, digits, current)
            need = RP[U] - RP[reach]
            keep &= need <= (spare * self.room[:, reach].T).sum(axis=1) * (1 + 1e-9) + 1e-9
            hopeless = len(layers) + to_finish[reach] > most
            hopeless |= best[U] - best[reach] > (spare * work[:, reach].T).sum(axis=1) * (1 + 1e-9) + 1e-12
            self.cut_by_count |= bool((keep & hopeless).any())
            keep &= ~hopeless
            layers.append(Layer(states[keep], reach[keep], choice[keep], digits[keep]))
            if not keep.any():
                return layers

    def _dominated(self, states: np.ndarray, reach: np.ndarray, digits: np.ndarray, previous: Layer) -> np.ndarray:
        """States whose reach a kept state with one device fewer already has."""
        before = states[:, None] - self.space.strides[None, :]
        at = np.minimum(np.searchsorted(previous.states, before), len(previous.states) - 1)
        return ((digits > 0) & (previous.states[at] == before) & (previous.reach[at] == reach[:, None])).any(axis=1)

    def _walk_back(self, state: int, layers: list[Layer]) -> tuple[float, list[Cut]]:
        stages = []
        for at in range(len(layers) - 1, 0, -1):
            layer = layers[at]
            i = int(np.searchsorted(layer.states, state))
            t = int(layer.choice[i])
            before = state - int(self.space.strides[t])
            previous = layers[at - 1]
            j = int(previous.reach[int(np.searchsorted(previous.states, before))])
            if layer.reach[i] > j:
                stages.append((j, int(layer.reach[i]), t))
            state = before
        return self._assign(stages[::-1])

    def _assign(self, stages: list[tuple[int, int, int]]) -> tuple[float, list[Cut]]:
        """Stages by type, in pipeline order, onto the lowest ids of each type."""
        spare = [iter(m) for m in self.types.members]
        cuts = [(j, k, next(spare[t])) for j, k, t in stages]
        return max(self.problem.stage_time(*c) for c in cuts), cuts

    def _next_event(self, starts: np.ndarray) -> float:
        """The smallest T > limit at which some stage from a reached start j could take one more unit.

        Below it every greedy end the DP used stays the same (memory-bound ones never move), so every
        reach and every kept state does: all of [limit, T) is infeasible, and the search may skip there.
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

    def _scalar(self, limit: float) -> Optional[tuple[float, list[Cut]]]:
        U, speeds, space = self.problem.U, self.speed_list, self.space
        reach = [-1] * space.size
        reach[0] = 0
        choice = [-1] * space.size
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
        done = np.flatnonzero(np.asarray(reach) == U)
        if done.size == 0:
            return None
        digits = space.digits(done)
        used = digits.sum(axis=1)
        fewest = used == used.min()
        return self._walk(int(done[fewest][self.types.lowest_ids(digits[fewest])]), reach, choice)


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
