"""Exact link-aware planning by bisection on the bottleneck (beyond the paper), as fast as `bisect`.

With links a stage's period is max(compute, sending its output cut to the next device), and the
hop depends on where the stage ends (cut sizes rise and fall along the model) and on both devices.
So a longer covered prefix no longer dominates a shorter one, and the feasibility DP of `bisect`
(longest prefix per device set) does not apply. Instead, for a bottleneck T:

    K[S, e] = the set of prefix ends k such that units 1..k can be covered by the devices in S, in
              some order ending on e, every period <= T except e's outgoing hop (it needs the next
              device), the input hop to the first device included.

Appending stage (j, k] on e after a stage on d needs j in K[S, d], hop(j, d, e) <= T, and
compute(j, k, e) <= T within e's memory, i.e. j < k <= f_e(j) with f_e the greedy end (monotone
in j). So K[S + e, e] = { k : some j in J with g_e(k) <= j < k }, J = OR over d of
(K[S, d] AND ok[d, e]), g_e(k) the smallest start whose stage reaches k: one prefix sum of J
and a gather. Sets are bit masks (uint64 words), so the OR over d of ANDs is N word operations
per state, and every step runs for a whole layer of (S, e) pairs at once in NumPy. T is feasible
iff some K[S, e] holds U and e's result hop fits T. A pair whose spare devices cannot hold the memory after
its longest prefix (each at most what a stage of its type holds from its shortest prefix on) never reaches U:
it extends nothing, which changes no K[S, e] that holds U, so neither the optimum nor the plan picked.

Devices that share speed, memory, time row and link B are one type with a count (as in `bisection`):
S is then a count vector and e a type, so a fleet of a few kinds costs prod(count + 1) x types states,
not 2^N x N. A link matrix B_link gives every device its own row, so there every device is its own
type; the table K (states x types x (U + 1) bits) is refused above TABLE_BYTES, in one line: at
U=1000 that is N=16 distinct devices (134 MB), at U=273 N=18.

With each device's link CPU (device_config.link_cpu) a stage's time is Problem.stage_cpu_ms: receiving cut j
and sending cut k add to the compute, so a stage's time is no longer monotone in its end nor its start and the
greedy end f_e and start g_e do not exist. Exact instead: for each type e and end k the bit mask of starts j whose
stage (j, k] fits e's memory and T (valid[e][k], independent of the set S), and K[S + e, e] holds k iff
J AND valid[e][k] is not empty: one word operation per non-zero word of valid[e] per pair (a stage within T starts
a word or two before its end), every grid and mask in chunks of at most GRID_BYTES. Without link CPU the
prefix-sum path above runs, as fast as before.

The search is bisect's: the optimum is a stage time, a hop between two devices, or an input or
result hop, so bracketing and a binary search over those candidate values end exactly on it.
The `links` DP is the reference it is tested against.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..config import hop_ms
from ..errors import ConfigError
from .bisection import DeviceTypes, Found, StateSpace, lower_bound, max_ends, search, stage_times_between
from .plan import Cut, Solution, bottleneck_of
from .problem import Problem

CHUNK = 4096  # (set, device) pairs per vector step, to bound temporary memory at large N
GRID_BYTES = 1 << 25  # temporary memory of one step of the link CPU path (stage grids, start masks): 32 MiB
ROW_SUMS = 256  # from this many (set, device) pairs the prefix sum runs row by row
TABLE_BYTES = 1 << 28  # the largest K table (256 MiB): N=16 distinct devices at U=1000 (134 MB), not 17


def pack(bits: np.ndarray, words: int) -> np.ndarray:
    """Boolean rows (..., U + 1) to uint64 words (..., words)."""
    padded = np.zeros((*bits.shape[:-1], words * 64), dtype=bool)
    padded[..., :bits.shape[-1]] = bits
    return np.packbits(padded, axis=-1, bitorder="little").view(np.uint64)


def unpack(words: np.ndarray, length: int) -> np.ndarray:
    return np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=-1, bitorder="little")[..., :length]


def unpack_columns(words: np.ndarray, length: int) -> np.ndarray:
    """uint64 words (sets, words) to bits (length, sets)."""
    columns = np.ascontiguousarray(words.view(np.uint8).T)
    return np.unpackbits(columns, axis=0, bitorder="little")[:length]


BIT_WEIGHTS = (1 << np.arange(8, dtype=np.uint8))[None, :, None]


def pack_columns(bits: np.ndarray, words: int) -> np.ndarray:
    """Bits (words * 64, sets) to uint64 words (sets, words); eight row operations per byte, not a strided pack."""
    grouped = bits.view(np.uint8).reshape(words * 8, 8, bits.shape[1])
    packed = (grouped * BIT_WEIGHTS).sum(axis=1, dtype=np.uint8)
    return np.ascontiguousarray(packed.T).view(np.uint64)


LOWEST_BIT = np.array([0] + [(b & -b).bit_length() - 1 for b in range(1, 256)])
HIGHEST_BIT = np.array([0] + [b.bit_length() - 1 for b in range(1, 256)])


class LinkProbe:
    """Is a bottleneck T feasible under the link model, and with which plan?"""

    def __init__(self, problem: Problem):
        self.problem = problem
        U = problem.U
        self.words = (U + 1 + 63) // 64
        self.types = DeviceTypes.of(problem)
        counts = self.types.counts
        k = len(counts)
        self.space = StateSpace(counts)
        check_table(problem, self.space.size, k, self.words)
        first = [m[0] for m in self.types.members]
        # A second device of the same type, for hops within a type (none: a device never sends to itself).
        second = [m[1] if len(m) > 1 else -1 for m in self.types.members]
        self.memory_ends = [max_ends(problem.memory_prefix, 1.0, problem.capacity[d]) for d in first]
        # room[t, r]: the most memory a stage of type t from unit r on can hold; need[r]: the memory after unit r.
        RP = problem.memory_prefix
        self.room = np.ascontiguousarray(
            np.maximum.accumulate((RP[np.stack(self.memory_ends)] - RP[None, :])[:, ::-1], axis=1)[:, ::-1])
        self.need = RP[U] - RP
        self.speed_rows = [(problem.time_prefix[d], problem.speed[d]) for d in first]
        A = problem.cut_bytes if problem.has_links and problem.cut_bytes is not None else np.zeros(U + 1)
        B = problem.link_mbps if problem.has_links and problem.link_mbps is not None else np.full(problem.N, np.inf)
        receivers = np.array([[second[d] if d == e else first[e] for e in range(k)] for d in range(k)])
        pair = problem.pair_mbps[np.array(first)[:, None], np.maximum(receivers, 0)]
        with np.errstate(divide="ignore", invalid="ignore"):
            hop = hop_ms(A[None, None, :], pair[:, :, None])  # [d, e, k]
        hop[receivers < 0] = np.inf
        self.hop = hop
        self.input_hop = hop_ms(A[0], B[first])
        self.output_hop = hop_ms(A[U], B[first])
        states = np.arange(self.space.size)
        self.digits = self.space.digits(states)
        self.used = self.digits.sum(axis=1)
        caps = self.space.caps
        # blocks[l][e]: every state S using l + 1 devices with a device of type e to spare; a layer is one step.
        self.blocks = [[states[(self.used == size) & (self.digits[:, e] < caps[e])] for e in range(k)]
                       for size in range(1, int(self.used.max()))]
        self.transitions = 0
        self.infeasible_below = -np.inf  # no jumps: hops make the next event costly to find
        self.link_cpu = problem.link_cpu is not None
        self.sparse: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # per probe: sparse_rows

    def fits(self, e: int, ks: slice) -> np.ndarray:
        """[k in ks, j]: stage (j, k] is a stage (j < k) that fits type e's memory (independent of the limit)."""
        RP, capacity = self.problem.memory_prefix, self.problem.capacity[self.types.members[e][0]]
        ends, starts = np.arange(ks.start, ks.stop)[:, None], np.arange(self.problem.U + 1)[None, :]
        return (starts < ends) & (RP[ks][:, None] - RP[None, :] <= capacity)

    def grid_rows(self) -> int:
        """Rows (ends k) of a stage grid per step, within GRID_BYTES."""
        return max(1, GRID_BYTES // (8 * (self.problem.U + 1)))

    def valid(self, limit: float) -> np.ndarray:
        """valid[e, k]: the starts j (bit words) of stages (j, k] that fit type e's memory and take <= limit
        with their link CPU."""
        U, rows = self.problem.U, self.grid_rows()
        out = np.zeros((len(self.types.members), U + 1, self.words), dtype=np.uint64)
        for e, d in enumerate(m[0] for m in self.types.members):
            for at in range(0, U + 1, rows):
                ks = slice(at, min(at + rows, U + 1))
                out[e, ks] = pack(self.fits(e, ks) & (self.problem.stage_cpu_grid(d, ks) <= limit), self.words)
        return out

    def ends(self, limit: float) -> np.ndarray:
        """f[e, j]: the last unit of a stage from j on e within the limit and e's memory."""
        return np.stack([np.minimum(max_ends(P, scale, limit), memory)
                         for (P, scale), memory in zip(self.speed_rows, self.memory_ends)])

    def reach(self, limit: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """K as words [state, last type, word], the stages within the limit (the greedy ends f, or with link CPU
        the valid starts of each end) and the hop masks ok[d, e]."""
        U, k, strides = self.problem.U, len(self.types.members), self.space.strides
        positions = np.arange(U + 1)
        if self.link_cpu:
            stages = self.valid(limit)
            first = stages
            self.sparse = [sparse_rows(stages[e]) for e in range(k)]
            starts_at_zero = (stages[:, :, 0] & np.uint64(1)) == 1  # [e, k]: stage (0, k] on e is valid
        else:
            stages = self.ends(limit)
            first = np.stack([np.searchsorted(stages[e], positions, side="left") for e in range(k)])  # g_e(k)
            starts_at_zero = (positions[None, :] > 0) & (positions[None, :] <= stages[:, :1])
        ok = pack(self.hop <= limit, self.words)  # [d, e, word]
        to = np.ascontiguousarray(ok.transpose(1, 0, 2))  # [e, d, word]
        K = np.zeros((self.space.size, k, self.words), dtype=np.uint64)
        alive = np.zeros(self.space.size, dtype=bool)  # states with some non-empty K[S, .]: the others extend nothing
        for e in range(k):
            if self.input_hop[e] <= limit:
                K[strides[e], e] = pack(starts_at_zero[e], self.words)
                alive[strides[e]] |= bool(starts_at_zero[e].any())
        for layer in self.blocks:
            parts = [S[alive[S]] for S in layer]
            sizes = [len(part) for part in parts]
            if not any(sizes):
                break  # no state of this size covers anything: larger ones cannot either
            if sum(sizes) <= CHUNK:  # small layers in one step (Python overhead), large ones per type
                steps = [(np.concatenate(parts), np.repeat(np.arange(k), sizes))]
            else:
                steps = [(part[at:at + CHUNK], np.full(len(part[at:at + CHUNK]), e))
                         for e, part in enumerate(parts) for at in range(0, len(part), CHUNK)]
            for sets, lasts in steps:
                if len(sets):
                    self._extend(K, sets, lasts, first, to, alive)
        return K, stages, ok

    def _extend(self, K: np.ndarray, S: np.ndarray, e: np.ndarray, first: np.ndarray, to: np.ndarray,
                alive: np.ndarray) -> None:
        """K[S + e, e] for pairs (S, e) that come in runs of one e."""
        U = self.problem.U
        self.transitions += len(S)
        runs = np.concatenate(([0], np.flatnonzero(np.diff(e)) + 1, [len(S)]))
        hops_ok = to[e[0]] if len(runs) == 2 else to[e]
        starts = np.bitwise_or.reduce(K[S] & hops_ok, axis=1)
        if self.link_cpu:
            self._extend_link_cpu(K, S, e, starts, first, runs, alive)
            return
        # Units along axis 0, states along axis 1: the prefix sum then adds whole rows.
        count = np.zeros((U + 2, len(S)), dtype=np.int16 if U < np.iinfo(np.int16).max else np.int32)
        bits = unpack_columns(starts, U + 1)
        if len(S) < ROW_SUMS:
            np.cumsum(bits, axis=0, out=count[1:])
        else:  # row by row: NumPy's accumulate down axis 0 of wide arrays is ~10x slower
            for unit in range(U + 1):
                np.add(count[unit], bits[unit], out=count[unit + 1])
        # k is covered iff J holds a start in [g_e(k), k - 1]
        covered = np.zeros((self.words * 64, len(S)), dtype=bool)
        for a, b in zip(runs[:-1], runs[1:]):
            np.greater(count[:U + 1, a:b], count[first[e[a]], a:b], out=covered[:U + 1, a:b])
        after = S + self.space.strides[e]
        packed = pack_columns(covered, self.words)
        K[after, e] = packed
        alive[after[self._hopeful(after, packed)]] = True

    def _extend_link_cpu(self, K: np.ndarray, S: np.ndarray, e: np.ndarray, starts: np.ndarray, valid: np.ndarray,
                         runs: np.ndarray, alive: np.ndarray) -> None:
        """K[S + e, e][k] = any(J AND valid[e][k]) over the non-zero words of valid[e] alone (a stage within the
        limit starts in a window before its end: a word or two of U / 64), chunked within GRID_BYTES."""
        U = self.problem.U
        after = S + self.space.strides[e]
        for a, b in zip(runs[:-1], runs[1:]):
            ends, words, values, groups = self.sparse[e[a]]
            step = max(1, GRID_BYTES // (8 * max(1, len(values)) + U + 1))
            for at in range(a, b, step):
                part = slice(at, min(at + step, b))
                covered = np.zeros((part.stop - part.start, U + 1), dtype=bool)  # [pair, k]
                if len(values):
                    hits = (starts[part][:, words] & values[None, :]) != 0
                    covered[:, ends] = np.logical_or.reduceat(hits, groups, axis=1)
                packed = pack(covered, self.words)
                K[after[part], e[a]] = packed
                alive[after[part][self._hopeful(after[part], packed)]] = True

    def _hopeful(self, after: np.ndarray, packed: np.ndarray) -> np.ndarray:
        """Pairs whose prefixes (bit words) some continuation may finish: the devices left to S + e must hold
        the memory after its longest prefix, each at most what a stage of its type holds from the shortest one
        on (room only falls along the model). The others can never reach U, so they extend nothing."""
        data = packed.view(np.uint8)  # little-endian bits: unit 8 * byte + bit
        nonzero = data != 0
        hopeful = nonzero.any(axis=1)
        if not hopeful.any():
            return hopeful
        rows = np.arange(len(data))
        first = nonzero.argmax(axis=1)
        last = data.shape[1] - 1 - nonzero[:, ::-1].argmax(axis=1)
        U = self.problem.U  # empty rows (not hopeful anyway) point past U: clipped
        shortest = np.minimum(first * 8 + LOWEST_BIT[data[rows, first]], U)
        longest = np.minimum(last * 8 + HIGHEST_BIT[data[rows, last]], U)
        spare = self.space.caps[None, :] - self.digits[after]
        holds = (spare * self.room[:, shortest].T).sum(axis=1)
        return hopeful & (self.need[longest] <= holds * (1 + 1e-9) + 1e-9)

    def __call__(self, limit: float) -> Optional[Found]:
        U = self.problem.U
        K, f, ok = self.reach(limit)
        final = (K[:, :, U // 64] >> np.uint64(U % 64)) & np.uint64(1)  # [state, e]: holds U
        S, e = np.nonzero((final == 1) & (self.output_hop <= limit)[None, :])
        if S.size == 0:
            return None
        fewest = self.used[S] == self.used[S].min()
        S, e = S[fewest], e[fewest]  # in order of S, then e: lowest_ids keeps the first of equal rows
        pick = self.types.lowest_ids(self.digits[S])  # fewest devices, lowest ids, lowest last type
        cuts = self._plan(int(S[pick]), int(e[pick]), K, f, ok)
        return bottleneck_of(self.problem, cuts), cuts

    def _starts(self, words: np.ndarray, stages: np.ndarray, e: int, k: int) -> np.ndarray:
        """The starts j in a state whose stage on the next device (type e) can end at k."""
        if self.link_cpu:
            return np.flatnonzero(unpack(words & stages[e, k], self.problem.U + 1))
        starts = np.flatnonzero(unpack(words, self.problem.U + 1))
        return starts[(starts < k) & (stages[e][starts] >= k)]

    def _plan(self, S: int, e: int, K: np.ndarray, f: np.ndarray, ok: np.ndarray) -> list[Cut]:
        """Walk back from (S, e, U): the previous type d (lowest first) and the latest start j that reach k;
        then each type's stages, in pipeline order, go to its lowest ids."""
        U, strides = self.problem.U, self.space.strides
        stages, k = [], U
        while S != strides[e]:
            before = S - int(strides[e])
            held = self.digits[before]
            j, d = next((int(starts[-1]), d) for d in range(len(held)) if held[d] > 0
                        for starts in [self._starts(K[before, d] & ok[d, e], f, e, k)] if starts.size)
            stages.append((j, k, e))
            S, e, k = before, d, j
        stages.append((0, k, e))
        spare = [iter(m) for m in self.types.members]
        return [(j, k, next(spare[t])) for j, k, t in stages[::-1]]


def sparse_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The non-zero words of bit rows [k, word]: the ends k that have some, and for each non-zero word (in order of k)
    its word index and value, and where each end's words begin (for reduceat)."""
    k, word = np.nonzero(rows)
    ends, groups = np.unique(k, return_index=True)
    return ends, word, rows[k, word], groups


def check_table(problem: Problem, states: int, types: int, words: int) -> None:
    """Refuse, in one line, a K table over TABLE_BYTES instead of exhausting memory."""
    size = states * types * words * 8
    if size <= TABLE_BYTES:
        return
    largest = max(n for n in range(1, 64) if (1 << n) * n * words * 8 <= TABLE_BYTES)
    kind = ("with a link matrix (device_config.B_link) every device is its own type" if problem.link_matrix is not None
            else f"its {types} device types")
    raise ConfigError(f"bisect-links: {kind}, so its table needs {size / 1e6:.0f} MB at N={problem.N}, "
                      f"U={problem.U} (limit {TABLE_BYTES / 1e6:.0f} MB: at most N={largest} distinct devices at "
                      f"this U); group the devices into fewer types or drop B_link")


def hop_values(probe: LinkProbe) -> np.ndarray:
    """Every hop time a plan can contain, sorted."""
    hops = probe.hop[np.isfinite(probe.hop)]
    return np.unique(np.concatenate((hops, probe.input_hop, probe.output_hop)))


def candidates(problem: Problem, probe: LinkProbe, hops: np.ndarray, low: float, high: float,
               limit: int) -> Optional[np.ndarray]:
    """Every stage time (of a stage that fits memory) and hop time in (low, high], sorted; None if more
    than `limit`."""
    inside = hops[np.searchsorted(hops, low, side="right"):np.searchsorted(hops, high, side="right")]
    if inside.size > limit:
        return None
    first = [m[0] for m in probe.types.members]
    if probe.link_cpu:
        stages = link_cpu_times_between(probe, low, high, limit - inside.size)
    else:
        stages = stage_times_between(problem, first, probe.memory_ends, low, high, limit - inside.size)
    return None if stages is None else np.unique(np.concatenate((stages, inside)))


def link_cpu_times_between(probe: LinkProbe, low: float, high: float, limit: int) -> Optional[np.ndarray]:
    """Every stage time with link CPU in (low, high] of a stage that fits its type's memory; None if more than
    `limit` (counted over the whole grid before any is kept)."""
    problem, rows = probe.problem, probe.grid_rows()
    values, count = [np.empty(0)], 0
    for e, d in enumerate(m[0] for m in probe.types.members):
        for at in range(0, problem.U + 1, rows):
            ks = slice(at, min(at + rows, problem.U + 1))
            grid = problem.stage_cpu_grid(d, ks)
            inside = grid[probe.fits(e, ks) & (grid > low) & (grid <= high)]
            count += inside.size
            if count > limit:
                return None
            values.append(np.unique(inside))
    return np.unique(np.concatenate(values))


def highest_period(problem: Problem, probe: LinkProbe, hops: np.ndarray) -> float:
    """A value no stage's period exceeds (the whole model on the slowest device, plus its most link CPU)."""
    top = float(problem.whole_ms.max())
    if probe.link_cpu:
        top = (top + problem.most_link_cpu_ms()) * (1 + 1e-9)
    return max(top, float(hops.max()))


def solve(problem: Problem) -> Optional[Solution]:
    problem.units_are_blocks()
    probe = LinkProbe(problem)
    hops = hop_values(probe)
    bound = max(lower_bound(problem), float(probe.input_hop.min()), float(probe.output_hop.min()))
    top = highest_period(problem, probe, hops)  # no period can exceed this
    best = search(probe, bound, top, lambda low, high, limit: candidates(problem, probe, hops, low, high, limit))
    return None if best is None else Solution(tuple(best[1]), probe.transitions, canonical=True)
