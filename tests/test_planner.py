"""Planner exactness: every algorithm against a brute-force oracle, with and without binding memory."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bruteforce import brute_force_bottleneck, tie_break
from dnnpipe import ALGORITHMS, NoPlanError, plan
from dnnpipe.planner import LINK_AWARE, Problem
from dnnpipe.planner.bounds import upper_bound
from dnnpipe.planner.plan import check_cuts
from strategies import as_config, cut_sets, instances

ALL = sorted(set(ALGORITHMS) - LINK_AWARE)  # the link-aware ones are tested in test_planner_links.py


def cuts_of(p):
    return [(s - 1, e, d - 1) for s, e, d in p.stages]


@st.composite
def instances_with_cuts(draw):
    C, M, E, R = draw(instances())
    return (C, M, E, R), draw(cut_sets(len(E)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances_with_cuts())
def test_every_algorithm_matches_brute_force(case):
    """Bottleneck, legal cuts, and the tie-break: fewest devices, then the lowest ids, one identical plan."""
    instance, cuts = case
    expected = tie_break(*instance, cuts=cuts)
    config = as_config(*instance, cuts=cuts)
    problem = Problem.from_config(__import__("dnnpipe").load_config(config))
    stages = set()
    for algorithm in ALL:
        if expected is None:
            with pytest.raises(NoPlanError):
                plan(config, algorithm)
            continue
        result = plan(config, algorithm)
        assert result.bottleneck == pytest.approx(expected[0], rel=1e-12, abs=1e-12), algorithm
        check_cuts(problem, cuts_of(result))
        assert max(result.stage_times_ms) == result.bottleneck
        assert tuple(sorted(d for *_, d in cuts_of(result))) == expected[1], algorithm
        stages.add(str(result.stages))
    assert len(stages) <= 1


@pytest.mark.parametrize("algorithm", ALL)
def test_tie_break_fewest_devices_then_lowest_ids(algorithm):
    # Three equal devices, three 1 ms units: one device takes all (3 ms) only if nothing better exists;
    # here two devices cannot beat 2 ms and three make 1 ms. With the middle unit free of time, two
    # devices reach 1 ms as well (1+0 | 1): fewest devices wins, and of the pairs {1, 2} is lowest.
    result = plan(as_config([1.0] * 3, [10] * 3, [1.0, 0.0, 1.0], [1] * 3), algorithm)
    assert result.bottleneck == 1.0 and sorted(s[2] for s in result.stages) == [1, 2]
    # Device 1 is too small for anything: {2, 3} is the lowest pair that can run.
    result = plan(as_config([1.0] * 3, [0, 10, 10], [1.0, 0.0, 1.0], [1] * 3), algorithm)
    assert sorted(s[2] for s in result.stages) == [2, 3]
    # A faster device 3 alone matches two slow ones (1 ms): one device wins.
    result = plan(as_config([1.0, 1.0, 2.0], [10] * 3, [1.0, 0.0, 1.0], [1] * 3), algorithm)
    assert result.stages == [[1, 3, 3]]


@pytest.mark.parametrize("algorithm", ALL)
def test_stages_end_only_at_legal_cuts(algorithm):
    # Equal units on two equal devices split 2 | 2 (2 ms), unless only unit 1 or 3 may end a stage.
    config = as_config([1.0, 1.0], [10, 10], [1.0] * 4, [1] * 4)
    assert plan(config, algorithm).bottleneck == 2.0
    config["model_config"]["cuts"] = [1, 3]
    result = plan(config, algorithm)
    assert result.bottleneck == 3.0 and result.stages[0][1] in (1, 3)
    config["model_config"]["cuts"] = []  # no cut at all: one device takes the whole model
    assert plan(config, algorithm).stages == [[1, 4, 1]]


def test_no_plan_between_two_legal_cuts():
    config = as_config([1.0, 1.0], [2, 2], [1.0] * 4, [1] * 4, cuts=[1])
    with pytest.raises(NoPlanError, match=r"units 2\.\.4 lie between two legal cuts .* need 3\.0 MB together"):
        plan(config)


@settings(max_examples=200, deadline=None)
@given(instances())
def test_upper_bound_is_a_feasible_plan_never_below_optimum(instance):
    expected = brute_force_bottleneck(*instance)
    problem = Problem.from_lists(*instance)
    value, cuts = upper_bound(problem)
    if cuts is None:
        assert value == float("inf")
        return
    check_cuts(problem, cuts)
    assert value == max(problem.stage_time(*c) for c in cuts)
    assert expected is not None and value >= expected - 1e-12


@pytest.mark.parametrize("algorithm", ALL)
def test_hand_checked_two_devices(algorithm):
    # Units 4+4 | 2 on a device twice as fast as the other: {1..2} on fast (4 ms), {3} on slow (4 ms).
    config = as_config([2.0, 1.0], [100, 100], [4.0, 4.0, 4.0], [1, 1, 1])
    result = plan(config, algorithm)
    assert result.bottleneck == 4.0
    assert result.stages in ([[1, 2, 1], [3, 3, 2]], [[1, 1, 2], [2, 3, 1]])


@pytest.mark.parametrize("algorithm", ALL)
def test_memory_forces_the_slow_device(algorithm):
    # The fast device cannot hold unit 2, so the slow one must take it.
    config = as_config([4.0, 1.0], [5, 50], [1.0, 1.0, 1.0], [1, 20, 1])
    # Unit 2 (20 MB) only fits the slow device; the fast one (5 MB) takes unit 1 or unit 3.
    result = plan(config, algorithm)
    assert result.bottleneck == 2.0
    assert result.stages in ([[1, 1, 1], [2, 3, 2]], [[1, 2, 2], [3, 3, 1]])


@pytest.mark.parametrize("algorithm", ALL)
def test_paper_testbed_profile(reference_profile, algorithm):
    result = plan(reference_profile, algorithm)
    assert result.bottleneck == pytest.approx(3.16649, abs=1e-5)
    assert result.ideal_ms == pytest.approx(3.15882, abs=1e-5)
    problem = Problem.from_config(__import__("dnnpipe").load_config(reference_profile))
    check_cuts(problem, cuts_of(result))


def test_pruning_evaluates_far_fewer_transitions(reference_profile):
    pruned = plan(reference_profile, "dnnpipe")
    full = plan(reference_profile, "exhaustive")
    assert pruned.transitions * 10 < full.transitions


def test_plan_accepts_path_dict_and_json_roundtrip(tmp_path):
    config = as_config([1.0, 0.5], [10, 10], [1.0, 2.0, 3.0], [1, 1, 1])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert plan(path).stages == plan(config).stages
    data = plan(config).to_json()
    assert list(data)[:4] == ["pipeline_plan", "bottleneck_ms", "algorithm", "planning_time_ms"]
    assert json.loads(json.dumps(data)) == data  # plain JSON types only: no NumPy scalars or arrays slip through


@pytest.mark.parametrize(
    "M, R, reason",
    [
        ([5, 6], [1, 9, 1], "unit 2 needs 9.0 MB, more than any device has (largest: 6.0 MB on device 2)"),
        ([5, 6], [4, 4, 4], "needs 12.0 MB in total but all 2 devices together have 11.0 MB"),
        ([5, 5], [3, 3, 3], "cannot be split into at most 2 contiguous stages"),
    ],
)
def test_no_plan_says_why(M, R, reason):
    config = as_config([1.0] * len(M), M, [1.0] * len(R), R)
    for algorithm in ALL:
        with pytest.raises(NoPlanError, match=__import__("re").escape(reason)):
            plan(config, algorithm)


def test_a_non_optimal_algorithm_is_caught(monkeypatch):
    # The shared tie-break probe also checks the algorithm: a worse plan than the optimum is an error.
    from dnnpipe import planner

    monkeypatch.setitem(planner.ALGORITHMS, "bisect", lambda problem: planner.Solution(((0, 2, 0),), 0))
    with pytest.raises(RuntimeError, match="returned bottleneck 2.0, the probe found 1.0"):
        plan(as_config([1.0, 1.0], [10, 10], [1.0, 1.0], [1, 1]), "bisect")


def test_default_is_the_fastest_exact_algorithm():
    assert plan(as_config([1.0], [1], [1.0], [1])).algorithm == "bisect"


def test_unknown_algorithm():
    with pytest.raises(ValueError, match="unknown algorithm 'fast'"):
        plan(as_config([1.0], [1], [1.0], [1]), "fast")


@st.composite
def per_device_instances(draw):
    """Devices whose speed-up differs per unit (a GPU speeds convolutions more than the input pipeline)."""
    C, M, E, R = draw(instances())
    rows = [draw(st.lists(st.integers(0, 20).map(float), min_size=len(E), max_size=len(E))) for _ in C]
    return [1.0] * len(C), M, rows, R


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(per_device_instances())
def test_per_device_times_match_brute_force(instance):
    C, M, rows, R = instance
    expected = brute_force_bottleneck(C, M, rows, R)
    config = as_config(C, M, rows[0], R)
    config["model_config"]["E_device"] = rows
    for algorithm in ALL:
        if expected is None:
            with pytest.raises(NoPlanError):
                plan(config, algorithm)
        else:
            assert plan(config, algorithm).bottleneck == pytest.approx(expected, rel=1e-12, abs=1e-12), algorithm


def test_per_device_times_win_where_one_speed_factor_cannot():
    # Device 1 is fast on units 1-2 only, device 2 on units 3-4 only: each takes its own half.
    config = as_config([1.0, 1.0], [10, 10], [1.0, 1.0, 9.0, 9.0], [1, 1, 1, 1])
    config["model_config"]["E_device"] = [[1.0, 1.0, 9.0, 9.0], [9.0, 9.0, 1.0, 1.0]]
    for algorithm in ALL:
        result = plan(config, algorithm)
        assert result.bottleneck == 2.0 and result.stages == [[1, 2, 1], [3, 4, 2]]


def test_algorithms_take_blocks_not_cuts():
    # solve_problem turns legal cuts into blocks; an algorithm handed cuts directly refuses, never ignores them.
    problem = Problem.from_lists([1.0], [10], [1.0, 1.0], [1, 1], cuts=[1])
    for algorithm in ALGORITHMS:
        with pytest.raises(ValueError, match="takes Problem.at_cuts"):
            ALGORITHMS[algorithm](problem)
    assert problem.at_cuts().U == 2 and Problem.from_lists([1.0], [10], [1.0, 1.0], [1, 1], cuts=[]).at_cuts().U == 1
