"""The bisection planner: its three executions, identical devices, fleets and bigger clusters, all exact."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bruteforce import brute_force_bottleneck, tie_break
from dnnpipe import ConfigError, NoPlanError
from dnnpipe.planner import Problem, solve_problem
from dnnpipe.planner import bisection as fast
from dnnpipe.planner.plan import check_cuts
from strategies import SPEEDS, cut_sets, fleets, instances
from typecount import type_count_plan


@pytest.fixture(params=["scalar", "dense", "dense-checked", "sparse"])
def probe_kind(request, monkeypatch):
    """Each of the probe's three executions on any size of state space; "dense-checked" drops the states that
    cannot finish after every layer (as the dense probe does every CHECK_EVERY layers over large spaces)."""
    monkeypatch.setattr(fast.Probe, "SCALAR_STATES", 10**9 if request.param == "scalar" else 0)
    monkeypatch.setattr(fast, "DENSE_BYTES", 10**12 if request.param.startswith("dense") else 0)
    if request.param == "dense-checked":
        monkeypatch.setattr(fast, "CHECKED_STATES", 0)
        monkeypatch.setattr(fast, "CHECK_EVERY", 1)
    return request.param


@st.composite
def clusters_with_identical_devices(draw):
    """2-3 device types, up to 5 devices, memory often binding."""
    U = draw(st.integers(1, 8))
    E = draw(st.lists(st.integers(0, 20).map(float), min_size=U, max_size=U))
    R = draw(st.lists(st.integers(0, 10).map(float), min_size=U, max_size=U))
    types = draw(st.lists(st.tuples(SPEEDS, st.integers(0, max(1, int(sum(R)))).map(float), st.integers(1, 3)),
                          min_size=1, max_size=3))
    C = [c for c, _, n in types for _ in range(n)][:5]
    M = [m for _, m, n in types for _ in range(n)][:5]
    return C, M, E, R, None, None, None, draw(cut_sets(U))


def check(instance, expected):
    problem = Problem.from_lists(*instance)
    if expected is None:
        with pytest.raises(NoPlanError):
            solve_problem(problem, "bisect")
        return
    plan = solve_problem(problem, "bisect")
    assert plan.bottleneck == pytest.approx(expected, rel=1e-12, abs=1e-12)
    check_cuts(problem, [(s - 1, e, d - 1) for s, e, d in plan.stages])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instance=instances())
def test_matches_brute_force(probe_kind, instance):
    check(instance, brute_force_bottleneck(*instance))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instance=clusters_with_identical_devices())
def test_identical_devices_match_brute_force(probe_kind, instance):
    check(instance, brute_force_bottleneck(*instance))


def test_identical_devices_collapse_into_types():
    problem = Problem.from_lists([1.0] * 10 + [0.5] * 2, [100] * 10 + [50] * 2, [1.0] * 40, [1.0] * 40)
    probe = fast.Probe(problem)
    assert [len(m) for m in probe.types.members] == [10, 2]
    assert probe.space.size == 11 * 3


@pytest.mark.parametrize("seed", range(6))
def test_bigger_clusters_match_the_exhaustive_dp(seed):
    rng = np.random.default_rng(seed)
    N, U = int(rng.integers(7, 10)), int(rng.integers(10, 40))
    E = rng.lognormal(-3, 1, U)
    R = rng.lognormal(-1, 1, U)
    C = rng.choice([1.0, 0.33, 0.21, 0.5], N)
    M = rng.uniform(0.5, 2.0, N) * R.sum() / N * 2
    problem = Problem.from_lists(C, M, E, R)
    try:
        expected = solve_problem(problem, "exhaustive").bottleneck
    except NoPlanError:
        with pytest.raises(NoPlanError):
            solve_problem(problem, "bisect")
        return
    assert solve_problem(problem, "bisect").bottleneck == expected  # same arithmetic: equal, not close


def check_fleet(instance):
    """Bisect equals the type-count reference: the bottleneck and the rule's devices (fewest, lowest ids)."""
    expected = type_count_plan(*instance)
    problem = Problem.from_lists(*instance)
    if expected is None:
        with pytest.raises(NoPlanError):
            solve_problem(problem, "bisect")
        return None
    plan = solve_problem(problem, "bisect")
    check_cuts(problem, [(s - 1, e, d - 1) for s, e, d in plan.stages])
    assert plan.bottleneck == expected[0]  # integer sums: the very same floats
    assert tuple(sorted(d - 1 for *_, d in plan.stages)) == expected[1]
    return plan


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instance=fleets())
def test_fleets_match_the_type_count_reference(probe_kind, instance):
    check_fleet(instance)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instance=fleets(max_devices=6, max_units=7))
def test_small_fleets_match_brute_force(probe_kind, instance):
    expected = tie_break(*instance)
    plan = check_fleet(instance)
    assert (plan is None) == (expected is None)
    if plan is not None:
        assert plan.bottleneck == expected[0]


@pytest.mark.parametrize("N, kinds", [(64, 1), (96, 2), (256, 2), (1000, 1)])
def test_more_than_63_devices(N, kinds):
    # The tie-break's device bit masks overflowed int64 beyond 63 devices (TypeError at N=64, 96, 256).
    rng = np.random.default_rng(N)
    U = 24
    E = rng.integers(1, 20, U).astype(float).tolist()
    R = rng.integers(1, 10, U).astype(float).tolist()
    C = [[1.0, 0.5][d % kinds] for d in range(N)]
    M = [[30.0, 12.0][d % kinds] for d in range(N)]
    plan = check_fleet((C, M, E, R))
    assert plan is not None and plan.bottleneck >= max(E)


def test_lowest_ids_within_a_type():
    # Devices 1, 3, 5, ... are fast, 2, 4, ... slow; 70 devices, two stages of the fast kind are optimal: 1 and 3.
    C = [1.0 if d % 2 == 0 else 0.25 for d in range(70)]
    plan = solve_problem(Problem.from_lists(C, [10.0] * 70, [4.0, 4.0], [1.0, 1.0]), "bisect")
    assert plan.bottleneck == 4.0 and sorted(d for *_, d in plan.stages) == [1, 3]


def test_exponential_algorithms_refuse_what_does_not_fit():
    problem = Problem.from_lists([1.0] * 64, [10.0] * 64, [1.0] * 10, [1.0] * 10)
    for algorithm in ("dnnpipe", "exhaustive", "pipeedge"):
        with pytest.raises(ConfigError, match=rf"algorithm '{algorithm}' keeps tables over all 2\^N device sets: "
                                              r".* N=64, U=10, over its limit of 1024 MiB \(at most N=\d+ here\)"):
            solve_problem(problem, algorithm)
    assert solve_problem(problem, "bisect").bottleneck == 1.0


def test_too_many_kinds_are_refused_in_one_line():
    # 40 devices that all differ: no grouping helps, and the count vectors of a layer would need GBs.
    C = [1.0 + d / 64 for d in range(40)]
    problem = Problem.from_lists(C, [30.0] * 40, [float(u % 7 + 1) for u in range(200)], [0.1] * 200)
    with pytest.raises(ConfigError, match=r"limit of 16777216 numbers: its 40 devices form 40 types"):
        solve_problem(problem, "bisect")
