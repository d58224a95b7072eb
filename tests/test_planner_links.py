"""The communication model: links per device or per pair, bytes per cut, exact against brute force."""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bruteforce import tie_break
from dnnpipe import ConfigError, NoPlanError, load_config, plan
from dnnpipe.planner import LINK_AWARE, Problem, linkbisect, solve_problem
from dnnpipe.planner.plan import check_cuts
from strategies import MBPS, as_config, cut_sets, fleets, linked_instances, linked_kinds_with_link_cpu

LINKED = sorted(LINK_AWARE)


def fast_matches_links_dp(problem: Problem):
    """bisect-links finds the links DP's very plan, or no plan where it finds none; its plan (or None)."""
    try:
        reference = solve_problem(problem, "links")
    except NoPlanError:
        with pytest.raises(NoPlanError):
            solve_problem(problem, "bisect-links")
        return None
    fast = solve_problem(problem, "bisect-links")
    assert fast.bottleneck == reference.bottleneck and fast.stages == reference.stages
    return fast


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


@pytest.mark.parametrize("row_sums", [linkbisect.ROW_SUMS, 0])  # 0: the prefix sums row by row, as for wide steps
@pytest.mark.parametrize("chunk", [4096, 3])  # 3: layers split into per-device steps, as at 12 devices
@pytest.mark.parametrize("seed", range(4))
def test_bigger_linked_clusters_match_the_links_dp(seed, chunk, row_sums, monkeypatch):
    monkeypatch.setattr(linkbisect, "CHUNK", chunk)
    monkeypatch.setattr(linkbisect, "ROW_SUMS", row_sums)
    rng = np.random.default_rng(seed)
    N, U = int(rng.integers(5, 7)), int(rng.integers(20, 40))
    E, R = rng.lognormal(-3, 1, U), rng.lognormal(-1, 1, U)
    C = rng.choice([1.0, 0.33, 0.21, 0.5], N)
    M = rng.uniform(0.5, 2.0, N) * R.sum() / N * 2
    B_link = rng.choice([10.0, 100.0, 1000.0], (N, N)) if seed % 2 else None
    cuts = sorted(rng.choice(np.arange(1, U), U // 2, replace=False).tolist()) if seed >= 2 else None
    problem = Problem.from_lists(C, M, E, R, rng.choice([100.0, 1000.0], N), rng.lognormal(11, 1.0, U + 1),
                                 B_link, cuts)
    fast_matches_links_dp(problem)


@settings(max_examples=40, deadline=None)
@given(fleets(max_types=3, max_devices=24, max_units=10), st.data())
def test_link_fleets_without_bytes_plan_as_without_links(instance, data):
    # Per-device links group into types with the devices; with nothing to send every hop takes 0 ms, so the
    # link-aware search must find the very plan of the plain one (bottleneck and the rule's devices).
    C, M, E, R = instance
    kinds = sorted(set(zip(C, M)))
    mbps = {kind: data.draw(MBPS) for kind in kinds}
    B = [mbps[(c, m)] for c, m in zip(C, M)]
    try:
        plain = solve_problem(Problem.from_lists(C, M, E, R), "bisect")
    except NoPlanError:
        with pytest.raises(NoPlanError):
            solve_problem(Problem.from_lists(C, M, E, R, B, [0.0] * (len(E) + 1)), "bisect-links")
        return
    linked = solve_problem(Problem.from_lists(C, M, E, R, B, [0.0] * (len(E) + 1)), "bisect-links")
    assert linked.bottleneck == plain.bottleneck
    assert sorted(d for *_, d in linked.stages) == sorted(d for *_, d in plain.stages)


@pytest.mark.parametrize("row_sums", [linkbisect.ROW_SUMS, 0])
@pytest.mark.parametrize("seed", range(8))
def test_grouped_linked_devices_match_the_links_dp(seed, row_sums, monkeypatch):
    monkeypatch.setattr(linkbisect, "ROW_SUMS", row_sums)
    # 7-8 devices of 2-3 kinds (speed, memory and B shared within a kind): the type-count search against the DP
    # over device sets, the plan itself included.
    rng = np.random.default_rng(100 + seed)
    N, U, kinds = int(rng.integers(7, 9)), int(rng.integers(15, 30)), int(rng.integers(2, 4))
    E, R = rng.lognormal(-3, 1, U), rng.lognormal(-1, 1, U)
    of = rng.integers(0, kinds, N)
    C, M = rng.choice([1.0, 0.33, 0.21, 0.5], kinds)[of], (rng.uniform(0.5, 2.0, kinds) * R.sum() / N * 2)[of]
    B = rng.choice([100.0, 1000.0], kinds)[of]
    problem = Problem.from_lists(C, M, E, R, B, rng.lognormal(11, 1.0, U + 1))
    assert len(linkbisect.LinkProbe(problem).types.members) <= kinds
    fast_matches_links_dp(problem)


def test_a_link_matrix_beyond_the_table_limit_is_refused_in_one_line():
    # With B_link every device is its own type: 2^N x N x (U + 1) bits. 16 devices at U=1000 fit (134 MB), 17 not.
    U, N = 1000, 17
    B_link = [[0.0 if d == e else 100.0 for e in range(N)] for d in range(N)]
    problem = Problem.from_lists([1.0] * N, [10.0] * N, [1.0] * U, [0.01] * U, [100.0] * N, [0.0] * (U + 1), B_link)
    with pytest.raises(ConfigError, match=r"^bisect-links: with a link matrix \(device_config.B_link\) every device is "
                                          r"its own type, so its table needs 285 MB at N=17, U=1000 \(limit 268 MB: at "
                                          r"most N=16 distinct devices at this U\)"):
        solve_problem(problem)
    # Without the matrix the 17 identical devices are one type: 18 count vectors.
    assert solve_problem(replace(problem, link_matrix=None)).bottleneck > 0


# Each device's link CPU (device_config.link_cpu): receiving and sending cuts add to a stage's compute.

@st.composite
def linked_with_link_cpu(draw):
    C, M, E, R, B, A, B_link, cpu = draw(linked_kinds_with_link_cpu(matrix=draw(st.booleans())))
    return (C, M, E, R, B, A), {"B_link": B_link, "cuts": draw(cut_sets(len(E))), "link_cpu": cpu}


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(linked_with_link_cpu())
def test_link_cpu_plans_match_brute_force(case):
    check_all(*case)


@pytest.mark.parametrize("algorithm", LINKED)
def test_devices_alike_but_for_their_link_cpu_are_not_one_type(algorithm, tmp_path):
    # Regression: two devices equal in C, M, E and B but not in receive CPU. Grouped as one type, `links` gave
    # 1010 ms and bisect-links never finished, so the plan runs in a process of its own with a deadline.
    import json
    import subprocess
    import sys

    from helpers import ROOT

    config = as_config([1.0, 1.0], [10, 10], [10.0, 10.0], [1, 1], [1e6, 1e6], [0, 1e6, 0],
                       link_cpu=([0.0, 0.0], [0.0, 1000.0], [0.0, 0.0]))
    (tmp_path / "config.json").write_text(json.dumps(config))
    code = ("import json, sys; from dnnpipe import plan; r = plan(sys.argv[1], sys.argv[2]); "
            "print(json.dumps([r.bottleneck, r.stages]))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "config.json"), algorithm], capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [10.0, [[1, 1, 2], [2, 2, 1]]]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(linked_with_link_cpu())
def test_link_cpu_is_counted_in_every_stage_time_shown(case):
    instance, options = case
    try:
        result = plan(as_config(*instance, **options))
    except NoPlanError:
        return
    C, M, E, R, B, A = instance
    send, receive, frame = options["link_cpu"]
    for i, ((start, end, d), compute, cpu) in enumerate(zip(result.stages, result.extra["compute_ms"],
                                                            result.extra["link_cpu_ms"])):
        # the first stage takes in the model's input (cut 0), the last passes on its result (cut U), as cuts
        expected = receive[d - 1] * A[start - 1] / 1e6 + send[d - 1] * A[end] / 1e6 + frame[d - 1]
        assert cpu == pytest.approx(expected)
        assert result.stage_times_ms[i] >= compute + cpu - 1e-9
    assert result.bottleneck == max([*result.stage_times_ms, result.extra["input_hop_ms"]])


def test_link_cpu_moves_the_cut_where_the_paper_model_sees_no_cost():
    # Two equal devices, four 10 ms units; cut 2 is 1 MB, cut 1 and 3 are 1 kB. Without link CPU the even split
    # (cut 2) is best: 20 ms. Sending costs 30 ms per MB and receiving 20: cut 2 now costs the sender 30 ms and
    # the receiver 20, so cutting after unit 1 wins: the 30 ms stage only receives the tiny cut (0.02 ms).
    C, M, E, R, B = [1.0, 1.0], [10, 10], [10.0] * 4, [1] * 4, [1e6, 1e6]
    A = [0, 1000, 1_000_000, 1000, 0]
    assert plan(as_config(C, M, E, R, B, A)).stages == [[1, 2, 1], [3, 4, 2]]
    cpu = ([30.0, 30.0], [20.0, 20.0], [0.0, 0.0])
    for algorithm in LINKED:
        result = plan(as_config(C, M, E, R, B, A, link_cpu=cpu), algorithm)
        assert result.bottleneck == pytest.approx(30.02) and result.stages == [[1, 1, 1], [2, 4, 2]]
    for algorithm in ("bisect", "dnnpipe", "exhaustive", "pipeedge"):
        with pytest.raises(ConfigError, match=rf"algorithm '{algorithm}' ignores link bandwidth \(device_config.B\) "
                                              r"and each device's link CPU \(device_config.link_cpu\)"):
            plan(as_config(C, M, E, R, B, A, link_cpu=cpu), algorithm)


def test_the_receive_cost_makes_the_largest_start_not_the_best():
    # Device 1 holds 2 units, device 2 holds 3 and pays 20 ms per MB it sends or receives. Device 2 last after units
    # 1..2 on device 1 (the latest start) receives the 1 MB cut: 26 ms; after unit 1 only 100 bytes: 11.002 ms.
    C, M, E, R, B = [1.0, 1.0], [2, 3], [5.0, 5.0, 5.0, 1.0], [1] * 4, [1e6, 1e6]
    A = [0, 100, 1_000_000, 100, 0]
    cpu = ([0.0, 20.0], [0.0, 20.0], [0.0, 0.0])
    expected = tie_break(C, M, E, R, B, A, link_cpu=cpu)
    assert expected is not None and expected[0] == pytest.approx(11.002)
    for algorithm in LINKED:
        result = plan(as_config(C, M, E, R, B, A, link_cpu=cpu), algorithm)
        assert result.bottleneck == pytest.approx(expected[0])
        assert result.stages == [[1, 1, 1], [2, 4, 2]]


@pytest.mark.parametrize("grid_bytes", [linkbisect.GRID_BYTES, 8])  # 8: one row and one pair per step
@pytest.mark.parametrize("seed, devices, units", [*((seed, (5, 8), (15, 30)) for seed in range(6)),
                                                  # U + 1 > 64: the bit rows of starts take several words
                                                  *((seed, (3, 6), (70, 141)) for seed in range(6, 10))])
def test_bigger_clusters_with_link_cpu_match_the_links_dp(seed, devices, units, grid_bytes, monkeypatch):
    monkeypatch.setattr(linkbisect, "GRID_BYTES", grid_bytes)
    rng = np.random.default_rng(200 + seed)
    N, U, kinds = int(rng.integers(*devices)), int(rng.integers(*units)), int(rng.integers(2, 4))
    E, R = rng.lognormal(-3, 1, U), rng.lognormal(-1, 1, U)
    of = rng.integers(0, kinds, N)
    C, M = rng.choice([1.0, 0.33, 0.21, 0.5], kinds)[of], (rng.uniform(0.5, 2.0, kinds) * R.sum() / N * 2)[of]
    B = rng.choice([1000.0, 10000.0], kinds)[of]
    cpu = [rng.uniform(0, 5, kinds)[of], rng.uniform(0, 5, kinds)[of], rng.uniform(0, 0.2, kinds)[of]]
    legal = U // 2 if U < 64 else max(U // 2, 64)  # more than 64 blocks stay with U + 1 > 64
    cuts = sorted(rng.choice(np.arange(1, U), legal, replace=False).tolist()) if seed % 2 else None
    problem = Problem.from_lists(C, M, E, R, B, rng.lognormal(11, 1.0, U + 1), None, cuts, cpu)
    assert problem.at_cuts().U + 1 > 64 or U < 64
    fast = fast_matches_links_dp(problem)
    if fast is not None:
        assert fast.bottleneck >= solve_problem(replace(problem, link_cpu=None)).bottleneck


@settings(max_examples=40, deadline=None)
@given(fleets(max_types=3, max_devices=24, max_units=10), st.data())
def test_zero_link_cpu_plans_as_without_it(instance, data):
    # All-zero link CPU takes the exact (valid starts) path and must find the prefix-sum path's very plan.
    C, M, E, R = instance
    A = data.draw(st.lists(st.integers(0, 10_000).map(float), min_size=len(E) + 1, max_size=len(E) + 1))
    B = [100.0] * len(C)
    zero = ([0.0] * len(C),) * 3
    try:
        without = solve_problem(Problem.from_lists(C, M, E, R, B, A), "bisect-links")
    except NoPlanError:
        with pytest.raises(NoPlanError):
            solve_problem(Problem.from_lists(C, M, E, R, B, A, None, None, zero), "bisect-links")
        return
    counted = solve_problem(Problem.from_lists(C, M, E, R, B, A, None, None, zero), "bisect-links")
    assert counted.bottleneck == without.bottleneck and counted.stages == without.stages


def test_plan_only_shows_and_writes_the_link_cpu(tmp_path):
    import json

    from helpers import run_script

    C, M, E, R, B = [1.0, 1.0], [10, 10], [10.0] * 4, [1] * 4, [1e6, 1e6]
    config = as_config(C, M, E, R, B, [0, 1000, 1_000_000, 1000, 0], link_cpu=([30.0] * 2, [20.0] * 2, [0.5] * 2))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    result = run_script("model_partitioner.py", "--config", str(tmp_path), "--model-name", "model", "--plan-only")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "model" / "pipeline_plan.json").read_text())
    assert written["pipeline_plan"] == [[1, 1, 1], [2, 4, 2]]
    assert written["link_cpu_ms"] == pytest.approx([0.53, 0.52]) and written["bottleneck_ms"] == pytest.approx(30.52)
    assert "link CPU ms" in result.stdout and "30.5200" in result.stdout and "0.5300" in result.stdout
