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
iff some K[S, e] holds U and e's result hop fits T.

The search is bisect's: the optimum is a stage time, a hop between two devices, or an input or
result hop, so bracketing and a binary search over those candidate values end exactly on it.
The `links` DP is the reference it is tested against.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .bisect import Found, lower_bound, lowest_ids_key, max_ends, search, stage_times_between
from .plan import Cut, Solution, bottleneck_of
from .problem import Problem

CHUNK = 4096  # (set, device) pairs per vector step, to bound temporary memory at large N


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


class LinkProbe:
    """Is a bottleneck T feasible under the link model, and with which plan?"""

    def __init__(self, problem: Problem):
        self.problem = problem
        N, U = problem.N, problem.U
        self.words = (U + 1 + 63) // 64
        self.memory_ends = [max_ends(problem.memory_prefix, 1.0, problem.capacity[d]) for d in range(N)]
        A = problem.cut_bytes if problem.has_links and problem.cut_bytes is not None else np.zeros(U + 1)
        B = problem.link_mbps if problem.has_links and problem.link_mbps is not None else np.full(N, np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            hop = A[None, None, :] * 8e-3 / problem.pair_mbps[:, :, None]  # hop_ms's arithmetic, [d, e, k]
        hop[np.arange(N), np.arange(N)] = np.inf  # a device never sends to itself
        self.hop = hop
        self.input_hop = A[0] * 8e-3 / B
        self.output_hop = A[U] * 8e-3 / B
        sets = np.arange(1 << N)
        self.used = np.array([bin(S).count("1") for S in sets])
        # blocks[l][e]: every set S with |S| = l + 1 and e not in S; a layer is one vector step.
        self.blocks = [[sets[(self.used == size) & ((sets >> e & 1) == 0)] for e in range(N)] for size in range(1, N)]
        self.transitions = 0
        self.infeasible_below = -np.inf  # no jumps: hops make the next event costly to find

    def ends(self, limit: float) -> np.ndarray:
        """f[e, j]: the last unit of a stage from j on e within the limit and e's memory."""
        problem = self.problem
        return np.stack([np.minimum(max_ends(problem.time_prefix[e], problem.speed[e], limit), self.memory_ends[e])
                         for e in range(problem.N)])

    def reach(self, limit: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """K as words [set, last device, word], the greedy ends f and the hop masks ok[d, e]."""
        N, U = self.problem.N, self.problem.U
        f = self.ends(limit)
        positions = np.arange(U + 1)
        first = np.stack([np.searchsorted(f[e], positions, side="left") for e in range(N)])  # g_e(k)
        ok = pack(self.hop <= limit, self.words)  # [d, e, word]
        to = np.ascontiguousarray(ok.transpose(1, 0, 2))  # [e, d, word]
        K = np.zeros((1 << N, N, self.words), dtype=np.uint64)
        for e in range(N):
            if self.input_hop[e] <= limit:
                K[1 << e, e] = pack((positions > 0) & (positions <= f[e, 0]), self.words)
        alive = np.zeros(1 << N, dtype=bool)  # sets with some non-empty K[S, .]: the others extend nothing
        alive[[1 << e for e in range(N) if self.input_hop[e] <= limit and f[e, 0] > 0]] = True
        for layer in self.blocks:
            parts = [S[alive[S]] for S in layer]
            sizes = [len(part) for part in parts]
            if not any(sizes):
                break  # no set of this size covers anything: larger ones cannot either
            if sum(sizes) <= CHUNK:  # small layers in one step (Python overhead), large ones per device
                steps = [(np.concatenate(parts), np.repeat(np.arange(N), sizes))]
            else:
                steps = [(part[at:at + CHUNK], np.full(len(part[at:at + CHUNK]), e))
                         for e, part in enumerate(parts) for at in range(0, len(part), CHUNK)]
            for sets, lasts in steps:
                if len(sets):
                    self._extend(K, sets, lasts, first, to, alive)
        return K, f, ok

    def _extend(self, K: np.ndarray, S: np.ndarray, e: np.ndarray, first: np.ndarray, to: np.ndarray,
                alive: np.ndarray) -> None:
        """K[S + e, e] for pairs (S, e) that come in runs of one e."""
        U = self.problem.U
        self.transitions += len(S)
        runs = np.concatenate(([0], np.flatnonzero(np.diff(e)) + 1, [len(S)]))
        hops_ok = to[e[0]] if len(runs) == 2 else to[e]
        starts = np.bitwise_or.reduce(K[S] & hops_ok, axis=1)
        # Units along axis 0, sets along axis 1: the prefix sum then adds whole rows.
        count = np.zeros((U + 2, len(S)), dtype=np.int16 if U < np.iinfo(np.int16).max else np.int32)
        np.cumsum(unpack_columns(starts, U + 1), axis=0, out=count[1:])
        # k is covered iff J holds a start in [g_e(k), k - 1]
        covered = np.zeros((self.words * 64, len(S)), dtype=bool)
        for a, b in zip(runs[:-1], runs[1:]):
            np.greater(count[:U + 1, a:b], count[first[e[a]], a:b], out=covered[:U + 1, a:b])
        K[S | (1 << e), e] = pack_columns(covered, self.words)
        alive[(S | (1 << e))[covered.any(axis=0)]] = True

    def __call__(self, limit: float) -> Optional[Found]:
        N, U = self.problem.N, self.problem.U
        K, f, ok = self.reach(limit)
        final = (K[:, :, U // 64] >> np.uint64(U % 64)) & np.uint64(1)  # [set, e]: holds U
        S, e = np.nonzero((final == 1) & (self.output_hop <= limit)[None, :])
        if S.size == 0:
            return None
        pick = np.lexsort((e, lowest_ids_key(S, N), self.used[S]))[0]  # fewest devices, lowest ids, lowest last
        cuts = self._plan(int(S[pick]), int(e[pick]), K, f, ok)
        return bottleneck_of(self.problem, cuts), cuts

    def _starts(self, words: np.ndarray, ends: np.ndarray, k: int) -> np.ndarray:
        """The starts j in a set whose stage on the next device can end at k."""
        starts = np.flatnonzero(unpack(words, self.problem.U + 1))
        return starts[(starts < k) & (ends[starts] >= k)]

    def _plan(self, S: int, e: int, K: np.ndarray, f: np.ndarray, ok: np.ndarray) -> list[Cut]:
        """Walk back from (S, e, U): the previous device d (lowest first) and the latest start j that reach k."""
        U = self.problem.U
        cuts, k = [], U
        while S != 1 << e:
            before = S & ~(1 << e)
            j, d = next((int(starts[-1]), d) for d in range(self.problem.N) if before >> d & 1
                        for starts in [self._starts(K[before, d] & ok[d, e], f[e], k)] if starts.size)
            cuts.append((j, k, e))
            S, e, k = before, d, j
        cuts.append((0, k, e))
        return cuts[::-1]


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
    stages = stage_times_between(problem, range(problem.N), probe.memory_ends, low, high, limit - inside.size)
    return None if stages is None else np.unique(np.concatenate((stages, inside)))


def solve(problem: Problem) -> Optional[Solution]:
    problem.units_are_blocks()
    probe = LinkProbe(problem)
    hops = hop_values(probe)
    bound = max(lower_bound(problem), float(probe.input_hop.min()), float(probe.output_hop.min()))
    top = max(float(problem.whole_ms.max()), float(hops.max()))  # no period can exceed this
    best = search(probe, bound, top, lambda low, high, limit: candidates(problem, probe, hops, low, high, limit))
    return None if best is None else Solution(tuple(best[1]), probe.transitions, canonical=True)
