"""Re-planning: the new plan is the optimum of the changed cluster, and the diff is right."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bruteforce import brute_force_bottleneck
from dnnpipe import ConfigError, NoPlanError, plan
from dnnpipe.planner.replan import ClusterChange, replan
from strategies import as_config, cut_sets, instances, linked_instances
from typecount import type_count_plan

CONFIG = as_config([1.0, 0.5, 0.5, 0.25], [100, 100, 100, 100], [4.0] * 12, [1.0] * 12)


def test_a_device_leaves():
    running = plan(CONFIG).stages
    gone = running[0][2]
    result = replan(CONFIG, running, ClusterChange(removed=frozenset({gone})))
    assert gone not in [d for _, _, d in result.plan.stages]
    rest = [i for i in range(4) if i + 1 != gone]
    reduced = as_config([CONFIG["device_config"]["C"][i] for i in rest], [100] * 3, [4.0] * 12, [1.0] * 12)
    assert result.plan.bottleneck == plan(reduced).bottleneck
    assert result.previous_bottleneck is None and result.moved and result.units_moved > 0
    assert "the running plan cannot run any more" in result.describe()


def test_nothing_changed_moves_nothing():
    running = plan(CONFIG).stages
    result = replan(CONFIG, running, ClusterChange())
    assert result.plan.stages == running and result.moved == [] and result.units_moved == 0


def test_a_device_slows_down():
    running = plan(CONFIG).stages
    fast = max(running, key=lambda s: s[1] - s[0])[2]
    result = replan(CONFIG, running, ClusterChange(speeds={fast: 0.05}))
    assert result.previous_bottleneck > result.plan.bottleneck
    changed = as_config([0.05 if i + 1 == fast else c for i, c in enumerate(CONFIG["device_config"]["C"])],
                        [100] * 4, [4.0] * 12, [1.0] * 12)
    assert result.plan.bottleneck == plan(changed).bottleneck


@settings(max_examples=100, deadline=None)
@given(instances(max_devices=4, max_units=7))
def test_replan_is_the_optimum_of_the_changed_cluster(instance):
    C, M, E, R = instance
    config = as_config(C, M, E, R)
    try:
        running = plan(config).stages
    except NoPlanError:
        return
    change = ClusterChange(removed=frozenset({1}) if len(C) > 1 else frozenset(), speeds={len(C): 0.5})
    keep = [i for i in range(len(C)) if i + 1 not in change.removed]
    speeds = [0.5 if i + 1 == len(C) else C[i] for i in keep]
    expected = brute_force_bottleneck(speeds, [M[i] for i in keep], E, R)
    if expected is None:
        with pytest.raises(NoPlanError):
            replan(config, running, change)
        return
    result = replan(config, running, change)
    assert result.plan.bottleneck == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert all(d != 1 or len(C) == 1 for _, _, d in result.plan.stages)


def test_unknown_device():
    with pytest.raises(ConfigError, match="device 9 is not in the cluster"):
        replan(CONFIG, plan(CONFIG).stages, ClusterChange(removed=frozenset({9})))


def test_replan_command(tmp_path):
    import json

    from helpers import assert_clean_error, run_script

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(CONFIG))
    assert run_script("model_partitioner.py", "--config", str(tmp_path), "--model-name", "m",
                      "--plan-only").returncode == 0
    result = run_script("dnnpipe", "replan", "--config", str(tmp_path), "--model-name", "m", "--remove", "1",
                        "--speed", "2=0.25", "--write")
    assert result.returncode == 0, result.stderr
    assert "stages change" in result.stdout and "move: units" in result.stdout
    written = json.loads((tmp_path / "m" / "pipeline_plan.json").read_text())
    assert 1 not in [d for _, _, d in written["pipeline_plan"]]
    assert_clean_error(run_script("dnnpipe", "replan", "--config", str(tmp_path), "--model-name", "m",
                                  "--speed", "2:0.5"), "--speed takes DEVICE=VALUE")


def test_a_stale_running_plan_or_a_bad_value_is_a_clear_error():
    config = {"device_config": {"N": 2, "C": [1, 0.5], "M": [100, 100]},
              "model_config": {"U": 4, "E": [1, 1, 1, 1], "R": [1, 1, 1, 1]}}
    with pytest.raises(ConfigError, match="stage 2 covers units 3-9, but the stages must cover units 1-4"):
        replan(config, [[1, 2, 1], [3, 9, 2]], ClusterChange())
    with pytest.raises(ConfigError, match="covers units 1-3, the config has 4 units"):
        replan(config, [[1, 3, 1]], ClusterChange())
    for bad in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ConfigError, match="speed must be a finite number > 0"):
            replan(config, [[1, 4, 1]], ClusterChange(speeds={2: bad}))

@st.composite
def running_and_change(draw):
    C, M, E, R, B, A, B_link = draw(linked_instances(matrix=True))
    cuts = draw(cut_sets(len(E)))
    gone = draw(st.sampled_from(range(1, len(C) + 1)))
    return (C, M, E, R, B, A, B_link), cuts, gone


@settings(max_examples=100, deadline=None)
@given(running_and_change())
def test_replan_respects_cuts_and_link_matrix(case):
    (C, M, E, R, B, A, B_link), cuts, gone = case
    config = as_config(C, M, E, R, B, A, B_link, cuts)
    try:
        running = plan(config).stages
    except NoPlanError:
        return
    keep = [d for d in range(len(C)) if d != gone - 1]
    expected = None
    if keep:
        expected = brute_force_bottleneck([C[d] for d in keep], [M[d] for d in keep], E, R, [B[d] for d in keep], A,
                                          B_link=[[B_link[d][e] for e in keep] for d in keep], cuts=cuts)
    if expected is None:
        return  # nothing left that can run the model (covered by test_replan.py)
    result = replan(config, running, ClusterChange(removed=frozenset({gone})))
    assert abs(result.plan.bottleneck - expected) <= 1e-12 * max(1.0, expected)
    legal = set(cuts if cuts is not None else range(1, len(E))) | {len(E)}
    assert all(end in legal for _, end, _ in result.plan.stages)
    assert gone not in [d for *_, d in result.plan.stages]


@pytest.mark.parametrize("leaving", ["used", "unused"])
def test_a_fleet_of_64_loses_one_device(leaving):
    # 64 devices of 3 kinds (ids interleaved): the new plan is the reduced fleet's optimum with the rule's devices,
    # ids mapped back past the gap; a device the running plan does not use leaves nothing to move.
    kinds = [(1.0, 40.0), (0.5, 40.0), (0.25, 20.0)]
    C, M = [kinds[d % 3][0] for d in range(64)], [kinds[d % 3][1] for d in range(64)]
    rng = np.random.default_rng(7)
    E, R = rng.integers(1, 20, 30).astype(float).tolist(), rng.integers(1, 10, 30).astype(float).tolist()
    config = as_config(C, M, E, R)
    running = plan(config).stages
    used = {d for *_, d in running}
    gone = min(used) if leaving == "used" else min(set(range(1, 65)) - used)
    result = replan(config, running, ClusterChange(removed=frozenset({gone})))
    keep = [d for d in range(64) if d != gone - 1]
    expected = type_count_plan([C[d] for d in keep], [M[d] for d in keep], E, R)
    assert expected is not None and result.plan.bottleneck == expected[0]
    assert sorted(d for *_, d in result.plan.stages) == sorted(keep[i] + 1 for i in expected[1])
    if leaving == "unused":
        assert result.plan.stages == running and result.units_moved == 0 and result.moved == []
    else:
        assert gone not in [d for *_, d in result.plan.stages] and result.units_moved > 0


@settings(max_examples=60, deadline=None)
@given(linked_instances(), st.data())
def test_a_device_with_link_cpu_leaves(instance, data):
    # Each remaining device keeps its own link CPU: the new plan is the brute-force optimum of the reduced cluster.
    from strategies import link_cpus

    C, M, E, R, B, A, _ = instance
    cpu = data.draw(link_cpus(len(C)))
    config = as_config(C, M, E, R, B, A, link_cpu=cpu)
    try:
        running = plan(config).stages
    except NoPlanError:
        return
    gone = data.draw(st.sampled_from(range(1, len(C) + 1)))
    rest = [d for d in range(len(C)) if d + 1 != gone]
    if not rest:
        return
    pick = lambda values: [values[d] for d in rest]  # noqa: E731
    expected = brute_force_bottleneck(pick(C), pick(M), E, R, pick(B), A, link_cpu=[pick(v) for v in cpu])
    if expected is None:
        with pytest.raises(NoPlanError):
            replan(config, running, ClusterChange(removed=frozenset({gone})))
        return
    result = replan(config, running, ClusterChange(removed=frozenset({gone})))
    assert result.plan.bottleneck == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert gone not in [d for *_, d in result.plan.stages]


def test_a_device_that_slows_takes_longer_for_its_link_cpu_too():
    from dnnpipe.planner import Problem
    from dnnpipe.planner.replan import changed_problem

    config = as_config([1.0, 1.0], [10, 10], [4.0] * 4, [1.0] * 4, [1e6, 1e6], [0, 1e6, 1e6, 1e6, 0],
                       link_cpu=([2.0, 2.0], [3.0, 3.0], [0.5, 0.5]))
    problem = Problem.from_config(__import__("dnnpipe").load_config(config))
    slowed, ids = changed_problem(problem, ClusterChange(speeds={2: 0.25}))
    assert ids == [1, 2] and slowed.link_cpu_ms(1, 2, 0) == problem.link_cpu_ms(1, 2, 0) == 5.5
    assert slowed.link_cpu_ms(1, 2, 1) == pytest.approx(4 * 5.5)  # 4x slower: 3 + 2 + 0.5 device ms, 4x over
    assert slowed.stage_cpu_ms(1, 2, 1) == pytest.approx(4 * problem.stage_cpu_ms(1, 2, 1))
