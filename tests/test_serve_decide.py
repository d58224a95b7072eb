"""serve's decisions as a pure function: plain state and events in, actions out (no processes, no sockets)."""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Optional

from hypothesis import given
from hypothesis import strategies as st

from dnnpipe.serve.decide import GiveUp, Joined, Lost, Measured, Prepare, Proposal, State, Switch, Switched, \
    contingencies, crowded, decide, device_names, next_push, staying_links, uncovered, worth_switching

RUNNING = ((1, 10, 1), (11, 20, 2), (21, 30, 3))


def planner_over(devices: tuple[int, ...], calls: Optional[list] = None, running_ms: float = 10.0):
    """A planner that splits 30 units evenly over the devices present and not slower than 0.5 (the rules under
    test do not depend on the split), its bottleneck 30 / (devices used)."""

    def plan(absent: frozenset[int], speeds: Mapping[int, float]) -> Optional[Proposal]:
        if calls is not None:
            calls.append((absent, dict(speeds)))
        present = [d for d in devices if d not in absent and speeds.get(d, 1.0) >= 0.5]
        if not present:
            return None
        size = 30 // len(present)
        stages = tuple((k * size + 1, 30 if k == len(present) - 1 else (k + 1) * size, d)
                       for k, d in enumerate(present))
        bottleneck = 30 / len(present)
        return Proposal(stages, bottleneck, 1000 / bottleneck, running_ms)

    return plan


def state(**changes) -> State:
    base = dict(stages=RUNNING, devices=frozenset({1, 2, 3, 4}), absent=frozenset({4}), threshold=0.1)
    base.update(changes)
    return State(**base)  # type: ignore[arg-type]


def test_a_lost_running_device_aborts_to_the_plan_without_it():
    new, actions = decide(state(), Lost(frozenset({2}), "device 2 lost: killed"), planner_over((1, 2, 3)))
    [switch] = actions
    assert isinstance(switch, Switch) and switch.abort and switch.label == "lost"
    assert all(d != 2 for _, _, d in switch.stages) and new.stages == switch.stages
    assert 2 in new.absent and 2 not in new.devices


def test_a_loss_uses_the_contingency_plan_computed_ahead_without_planning():
    calls: list = []
    planner = planner_over((1, 2, 3), calls)
    ready, prepares = decide(state(), Switched(), planner)
    assert set(ready.contingency) == {1, 2, 3}
    assert {(p.device, p.units) for p in prepares if isinstance(p, Prepare)} == \
        {(d, (s, e)) for plan in ready.contingency.values() for s, e, d in plan.stages}
    calls.clear()
    _, actions = decide(ready, Lost(frozenset({3}), "frozen", "frozen"), planner)
    assert calls == []  # nothing planned on the critical path
    assert isinstance(actions[0], Switch) and actions[0].stages == ready.contingency[3].stages
    assert actions[0].label == "frozen"


def test_two_devices_lost_together_are_both_planned_out():
    _, actions = decide(state(contingency={}), Lost(frozenset({1, 2}), "both"), planner_over((1, 2, 3)))
    [switch] = actions
    assert isinstance(switch, Switch) and {d for _, _, d in switch.stages} == {3}


def test_an_idle_device_lost_changes_no_plan():
    new, actions = decide(state(stages=((1, 30, 1),)), Lost(frozenset({3}), "idle"), planner_over((1, 2, 3)))
    assert actions == [] and 3 in new.absent and new.stages == ((1, 30, 1),)


def test_an_idle_device_lost_is_planned_out_of_the_plans_for_a_loss():
    planner = planner_over((1, 2, 3, 4))
    ready, _ = decide(state(absent=frozenset()), Switched(), planner)
    assert any(d == 4 for plan in ready.contingency.values() for _, _, d in plan.stages)
    new, actions = decide(ready, Lost(frozenset({4}), "device 4 lost"), planner)
    assert new.stages == RUNNING and not any(isinstance(a, Switch) for a in actions)
    assert set(new.contingency) == {1, 2, 3}
    assert all(d != 4 for plan in new.contingency.values() for _, _, d in plan.stages)
    assert {(a.device, a.units) for a in actions if isinstance(a, Prepare)} == \
        {(d, (s, e)) for plan in new.contingency.values() for s, e, d in plan.stages}


def test_no_plan_for_what_is_left_gives_up():
    _, actions = decide(state(stages=((1, 30, 1),), devices=frozenset({1})), Lost(frozenset({1}), "x"),
                        planner_over((1,)))
    assert len(actions) == 1 and isinstance(actions[0], GiveUp)


def test_a_join_switches_at_a_barrier_only_when_it_pays():
    planner = planner_over((1, 2, 3, 4), running_ms=10.0)
    new, actions = decide(state(), Joined(frozenset({4})), planner)
    [switch] = actions
    assert isinstance(switch, Switch) and not switch.abort and switch.label == "joined"
    assert 4 not in new.absent
    _, actions = decide(state(), Joined(frozenset({4})), planner_over((1, 2, 3, 4), running_ms=7.6))
    assert actions == []  # 7.5 ms against 7.6 ms running: below the 10% threshold


def test_measured_speeds_re_plan_slower_and_faster():
    _, actions = decide(state(), Measured({2: 0.25}), planner_over((1, 2, 3), running_ms=40.0))
    assert isinstance(actions[0], Switch) and actions[0].label == "slower" and not actions[0].abort
    slow = ((1, 15, 1), (16, 30, 3))
    _, actions = decide(state(stages=slow, speeds={2: 0.25}), Measured({2: 1.0}),
                        planner_over((1, 2, 3), running_ms=15.0))
    assert isinstance(actions[0], Switch) and actions[0].label == "faster"


def test_the_same_plan_is_no_switch():
    planner = planner_over((1, 2, 3), running_ms=100.0)
    current = planner(frozenset({4}), {})
    assert current is not None
    _, actions = decide(state(stages=current.stages), Measured({1: 1.0}), planner)
    assert actions == []


def test_contingencies_and_threshold():
    plans = contingencies(state(), planner_over((1, 2, 3)))
    assert {d: {x for _, _, x in p.stages} for d, p in plans.items()} == {1: {2, 3}, 2: {1, 3}, 3: {1, 2}}
    assert worth_switching(None, 5.0, 0.1) and worth_switching(10.0, 9.0, 0.1) and not worth_switching(10.0, 9.5, 0.1)


def test_contingency_pushes_go_one_at_a_time_and_stale_ones_are_let_go():
    """A push deferred for a plan a switch replaced, for a device lost meanwhile or for units a loss already pushed
    on its critical path is not pushed again; the wanted ones go out in order, one per call."""
    ahead, pushes = decide(state(), Switched(), planner_over((1, 2, 3)))
    assert pushes and all(isinstance(p, Prepare) for p in pushes)
    stale_plan = Prepare(1, (1, 3))  # from a plan no loss plan has now
    deferred = [stale_plan, *pushes]
    action, rest, stale = next_push(deferred, ahead, {})
    assert action == pushes[0] and rest == pushes[1:] and stale == [stale_plan]
    loaded = {pushes[1].device: {pushes[1].units}}  # a loss pushed these already
    action, rest, stale = next_push(rest, ahead, loaded)
    assert action == pushes[2] and stale == [pushes[1]]
    lost = replace(ahead, devices=ahead.devices - {pushes[3].device}, absent=ahead.absent | {pushes[3].device})
    on_lost = [p for p in pushes if p.device == pushes[3].device]
    assert next_push(on_lost, lost, {}) == (None, [], on_lost)
    absent = replace(ahead, absent=ahead.absent | {pushes[3].device})  # up, but not to be planned on
    assert next_push(on_lost, absent, {}) == (None, [], on_lost)


def test_a_loss_is_covered_once_every_stage_of_every_plan_for_it_is_loaded():
    ready, prepares = decide(state(), Switched(), planner_over((1, 2, 3)))
    wanted = {(p.device, p.units) for p in prepares if isinstance(p, Prepare)}
    assert uncovered(ready, {}) == sorted(wanted) and uncovered(state(), {}) == []  # no plans yet: nothing to load
    loaded: dict[int, set[tuple[int, int]]] = {}
    for device, units in sorted(wanted)[:-1]:
        loaded.setdefault(device, set()).add(units)
    assert uncovered(ready, loaded) == sorted(wanted)[-1:]
    last_device, last_units = sorted(wanted)[-1]
    loaded.setdefault(last_device, set()).update({last_units, (99, 99)})  # more loaded than needed is fine
    assert uncovered(ready, loaded) == []


def test_crowded_devices_want_more_sub_models_than_an_agent_keeps():
    wanted = [(1, (1, 5)), (1, (6, 9)), (1, (1, 5)), (2, (1, 9))]  # a repeat counts once
    assert crowded(wanted, 2) == set() and crowded(wanted, 1) == {1} and crowded(wanted, 0) == {1, 2}


def test_device_names_read_as_a_sentence():
    assert (device_names([4]), device_names({3, 1}), device_names([2, 4, 1])) == ("4", "1 and 3", "1, 2 and 4")


def test_a_dropped_planned_switch_gets_its_plans_for_a_loss_back():
    """Deciding a planned switch drops the running plan's plans for a loss (the new plan will have its own); if the
    switch is dropped, deciding Switched on the running plan asks for them again, as the controller does."""
    planner = planner_over((1, 2, 3, 4))
    ahead, _ = decide(state(absent=frozenset()), Switched(), planner_over((1, 2, 3)))
    proposed, [switch] = decide(ahead, Joined(frozenset({4})), planner)
    assert isinstance(switch, Switch) and proposed.contingency == {}
    back, pushes = decide(replace(proposed, stages=RUNNING), Switched(), planner)
    assert set(back.contingency) == {1, 2, 3} and pushes
    assert next_push(pushes, back, {})[0] == pushes[0]


# --- links that stay across a planned switch


def test_a_link_stays_when_the_chain_up_to_its_receiving_end_is_the_same():
    """Chains are controller -> devices -> controller; a new plan's links, in order (the last is the result link)."""
    assert staying_links([1, 2, 3], [1, 2, 3]) == [True, True, True, True]  # cuts moved, same devices: all stay
    assert staying_links([1, 2], [1, 2, 3]) == [True, True, False, False]  # a device joined at the end
    assert staying_links([1, 2, 3], [1, 3]) == [True, False, False]  # 3 reached another way: its links are new
    assert staying_links([1, 2], [2]) == [False, False]  # the old first device left: nothing stays
    assert staying_links([2], [1, 2]) == [False, False, False]
    assert staying_links([], [1]) == [False, False]


@given(st.lists(st.integers(1, 5), max_size=5, unique=True), st.lists(st.integers(1, 5), min_size=1, max_size=5,
                                                                         unique=True))
def test_only_a_prefix_of_links_stays_and_each_joins_the_same_two_ends(old, new):
    stays = staying_links(old, new)
    assert len(stays) == len(new) + 1
    assert stays == sorted(stays, reverse=True)  # once one is new, every later one is new
    old_links = set(zip([0, *old], [*old, 0]))
    for (sender, receiver), stay in zip(zip([0, *new], [*new, 0]), stays):
        assert not stay or (sender, receiver) in old_links
    assert stays[-1] == (old == new)
