"""The communication model: links per device or per pair, bytes per cut, exact against brute force."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bruteforce import tie_break
from dnnpipe import ConfigError, NoPlanError, load_config, plan
from dnnpipe.planner import LINK_AWARE, Problem, linkbisect, solve_problem
from dnnpipe.planner.plan import check_cuts
from strategies import as_config, cut_sets, linked_instances

LINKED = sorted(LINK_AWARE)


@st.composite
def linked_with_cuts(draw):
    C, M, E, R, B, A, B_link = draw(linked_instances(matrix=draw(st.booleans())))
    return (C, M, E, R, B, A), {"B_link": B_link, "cuts": draw(cut_sets(len(E)))}


def check_all(instance, options):
    """Both link-aware algorithms: the brute-force bottleneck, the rule's device set, one identical plan."""
    expected = tie_break(*instance, **options)
    config = as_config(*instance, **options)
    if expected is None:
        for algorithm in LINKED:
            with pytest.raises(NoPlanError):
                plan(config, algorithm)
        return
    problem = Problem.from_config(load_config(config))
    stages = []
    for algorithm in LINKED:
        result = plan(config, algorithm)
        assert result.bottleneck == pytest.approx(expected[0], rel=1e-12, abs=1e-12), algorithm
        check_cuts(problem, [(s - 1, e, d - 1) for s, e, d in result.stages])
        assert tuple(sorted(d - 1 for *_, d in result.stages)) == expected[1], algorithm
        stages.append(result.stages)
    assert stages[0] == stages[1]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(linked_with_cuts())
def test_links_match_brute_force(case):
    check_all(*case)


def test_default_with_links_is_the_bisection():
    assert plan(as_config([1.0], [10], [1.0], [1], [10.0], [0, 0])).algorithm == "bisect-links"


def test_a_slow_link_moves_the_cut_to_a_small_tensor():
    # Two equal devices; cutting after unit 1 ships 10 kB, after unit 2 only 100 B. At 1 Mbit/s the
    # 10 kB hop takes 80 ms, so the cut goes where the tensor is small even though compute is uneven.
    C, M, E, R = [1.0, 1.0], [10, 10], [10.0, 10.0, 10.0, 10.0], [1, 1, 1, 1]
    assert plan(as_config(C, M, E, R)).bottleneck == 20.0
    for algorithm in LINKED:
        linked = plan(as_config(C, M, E, R, [1.0, 1.0], [0, 10_000, 100, 10_000, 0]), algorithm)
        assert [s[:2] for s in linked.stages] == [[1, 2], [3, 4]]
        linked = plan(as_config(C, M, E, R, [1.0, 1.0], [0, 100, 10_000, 10_000, 0]), algorithm)
        assert [s[:2] for s in linked.stages] == [[1, 1], [2, 4]] and linked.bottleneck == 30.0
        assert linked.to_json()["output_hop_ms"][0] == pytest.approx(0.8)


def test_a_link_matrix_describes_what_per_device_links_cannot():
    # Devices 1 and 2 share a fast switch; device 3 sends slowly but receives fast. Per device (B) every
    # hop to or from 3 is slow (32 ms), so 3 stays unused; with B_link, 2 -> 3 is fast and 3 runs last.
    C, M, E, R, A = [1.0, 1.0, 1.0], [10] * 3, [10.0] * 3, [1] * 3, [0, 4000, 4000, 0]
    B = [1000.0, 1000.0, 1.0]
    for algorithm in LINKED:
        per_device = plan(as_config(C, M, E, R, B, A), algorithm)
        assert per_device.bottleneck == 20.0 and len(per_device.stages) == 2
        B_link = [[0, 1000, 1000], [1000, 0, 1000], [1, 1, 0]]
        matrix = plan(as_config(C, M, E, R, B, A, B_link), algorithm)
        assert matrix.bottleneck == 10.0 and matrix.stages[-1] == [3, 3, 3]


def test_link_matrix_hop_is_directed():
    problem = Problem.from_lists([1.0, 1.0], [1, 1], [1.0], [0.0], [8.0, 8.0], [0, 1000], [[0, 1], [4, 0]])
    assert problem.hop_ms(1, 0, 1) == 8.0 and problem.hop_ms(1, 1, 0) == 2.0 and problem.hop_ms(1, 0, None) == 1.0


def test_link_model_needs_both_fields_and_a_link_aware_algorithm():
    config = as_config([1.0], [10], [1.0], [1], [10.0], [0, 0])
    with pytest.raises(ConfigError, match="algorithm 'bisect' ignores link bandwidth"):
        plan(config, "bisect")
    del config["model_config"]["A"]
    with pytest.raises(ConfigError, match="needs both device_config.B .* and model_config.A"):
        plan(config)
    config = as_config([1.0], [10], [1.0], [1])
    config["model_config"]["A"] = [4, 4]  # cut sizes alone (as the profiler writes them) change nothing
    assert plan(config).algorithm == "bisect"


@pytest.mark.parametrize("chunk", [4096, 3])  # 3: layers split into per-device steps, as at 12 devices
@pytest.mark.parametrize("seed", range(4))
def test_bigger_linked_clusters_match_the_links_dp(seed, chunk, monkeypatch):
    monkeypatch.setattr(linkbisect, "CHUNK", chunk)
    rng = np.random.default_rng(seed)
    N, U = int(rng.integers(5, 7)), int(rng.integers(20, 40))
    E, R = rng.lognormal(-3, 1, U), rng.lognormal(-1, 1, U)
    C = rng.choice([1.0, 0.33, 0.21, 0.5], N)
    M = rng.uniform(0.5, 2.0, N) * R.sum() / N * 2
    B_link = rng.choice([10.0, 100.0, 1000.0], (N, N)) if seed % 2 else None
    cuts = sorted(rng.choice(np.arange(1, U), U // 2, replace=False).tolist()) if seed >= 2 else None
    problem = Problem.from_lists(C, M, E, R, rng.choice([100.0, 1000.0], N), rng.lognormal(11, 1.0, U + 1),
                                 B_link, cuts)
    try:
        reference = solve_problem(problem, "links")
    except NoPlanError:
        with pytest.raises(NoPlanError):
            solve_problem(problem, "bisect-links")
        return
    fast = solve_problem(problem, "bisect-links")
    assert fast.bottleneck == reference.bottleneck and fast.stages == reference.stages
