"""The bisection planner: both of its executions, identical devices and bigger clusters, all exact."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bruteforce import brute_force_bottleneck
from dnnpipe import NoPlanError
from dnnpipe.planner import Problem, solve_problem
from dnnpipe.planner import bisection as fast
from dnnpipe.planner.plan import check_cuts
from strategies import SPEEDS, cut_sets, instances


@pytest.fixture(params=["scalar", "vector"])
def execution(request, monkeypatch):
    monkeypatch.setattr(fast.Probe, "SCALAR_STATES", 10**9 if request.param == "scalar" else 0)
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
def test_matches_brute_force(execution, instance):
    check(instance, brute_force_bottleneck(*instance))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instance=clusters_with_identical_devices())
def test_identical_devices_match_brute_force(execution, instance):
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
