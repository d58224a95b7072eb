"""Re-planning keeps the model's legal cuts and the link matrix of the devices that remain."""

from hypothesis import given, settings
from hypothesis import strategies as st

from bruteforce import brute_force_bottleneck
from dnnpipe import NoPlanError, plan
from dnnpipe.planner.replan import ClusterChange, replan
from strategies import as_config, cut_sets, linked_instances


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
