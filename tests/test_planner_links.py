"""The communication model: link bandwidth per device and bytes per cut, exact against brute force."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bruteforce import brute_force_bottleneck
from dnnpipe import ConfigError, NoPlanError, plan
from dnnpipe.planner import Problem
from dnnpipe.planner.plan import check_cuts
from strategies import as_config, instances


@st.composite
def linked_instances(draw):
    C, M, E, R = draw(instances())
    B = draw(st.lists(st.sampled_from([1.0, 2.0, 8.0, 100.0]), min_size=len(C), max_size=len(C)))
    # Cut sizes that go up and down along the model, as real activations do (8e-3 ms per byte at 1 Mbit/s).
    A = draw(st.lists(st.integers(0, 2500).map(float), min_size=len(E) + 1, max_size=len(E) + 1))
    return C, M, E, R, B, A


def linked_config(C, M, E, R, B, A):
    config = as_config(C, M, E, R)
    config["device_config"]["B"], config["model_config"]["A"] = B, A
    return config


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(linked_instances())
def test_links_match_brute_force(instance):
    expected = brute_force_bottleneck(*instance)
    config = linked_config(*instance)
    if expected is None:
        with pytest.raises(NoPlanError):
            plan(config)
        return
    result = plan(config)
    assert result.algorithm == "links"
    assert result.bottleneck == pytest.approx(expected, rel=1e-12, abs=1e-12)
    check_cuts(Problem.from_config(__import__("dnnpipe").load_config(config)),
               [(s - 1, e, d - 1) for s, e, d in result.stages])


def test_a_slow_link_moves_the_cut_to_a_small_tensor():
    # Two equal devices; cutting after unit 1 ships 10 kB, after unit 2 only 100 B. At 1 Mbit/s the
    # 10 kB hop takes 80 ms, so the cut goes where the tensor is small even though compute is uneven.
    C, M, E, R = [1.0, 1.0], [10, 10], [10.0, 10.0, 10.0, 10.0], [1, 1, 1, 1]
    assert plan(as_config(C, M, E, R)).bottleneck == 20.0
    linked = plan(linked_config(C, M, E, R, [1.0, 1.0], [0, 10_000, 100, 10_000, 0]))
    assert [s[:2] for s in linked.stages] == [[1, 2], [3, 4]]
    linked = plan(linked_config(C, M, E, R, [1.0, 1.0], [0, 100, 10_000, 10_000, 0]))
    assert [s[:2] for s in linked.stages] == [[1, 1], [2, 4]] and linked.bottleneck == 30.0
    assert linked.to_json()["output_hop_ms"][0] == pytest.approx(0.8)


def test_link_model_needs_both_fields_and_a_link_aware_algorithm():
    config = linked_config([1.0], [10], [1.0], [1], [10.0], [0, 0])
    with pytest.raises(ConfigError, match="algorithm 'bisect' ignores link bandwidth"):
        plan(config, "bisect")
    del config["model_config"]["A"]
    with pytest.raises(ConfigError, match="needs both device_config.B .* and model_config.A"):
        plan(config)
    config = as_config([1.0], [10], [1.0], [1])
    config["model_config"]["A"] = [4, 4]  # cut sizes alone (as the profiler writes them) change nothing
    assert plan(config).algorithm == "bisect"
