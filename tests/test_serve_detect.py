"""The rules serve applies to what the control channel says: who is lost, how fast each device is, when to switch."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnnpipe.serve.detect import (SpeedModel, StageState, find_lost, measured_speed, revised_beliefs, smooth,
                                  worth_switching)


def states(now: float = 10.0) -> list[StageState]:
    return [StageState(k, 10 + k, started=0.0, hello=True, last_beat=now - 0.1) for k in (1, 2, 3)]


def test_healthy_stages_and_a_neighbour_s_error_blame_no_one():
    s = states()
    assert find_lost(s, 10.0, 2.0, 30.0) is None
    s[0].ended, s[0].message = "error", "[stage 1] cannot send to the next stage"
    assert find_lost(s, 10.0, 2.0, 30.0) is None  # a symptom: the cause has not shown itself yet


def test_the_silent_stage_is_the_cause_even_after_its_neighbours_complained():
    s = states()
    s[0].ended = s[2].ended = "error"
    s[1].ended = "silent"
    assert find_lost(s, 10.0, 2.0, 30.0) == (12, "stage 2 stopped without a word (process killed, or its device "
                                                 "unreachable)")


def test_a_stage_without_heartbeat_is_frozen_and_one_that_never_came_up_is_lost():
    s = states()
    s[2].last_beat = 7.5
    device, why = find_lost(s, 10.0, 2.0, 30.0)
    assert device == 13 and "no heartbeat for 2.5 s" in why
    late = StageState(1, 5, started=0.0)
    assert find_lost([late], 29.0, 2.0, 30.0) is None
    assert find_lost([late], 31.0, 2.0, 30.0) == (5, "stage 1 did not come up within 30 s")


def test_measured_speed_is_profiled_time_over_median_stage_time():
    assert measured_speed([4.0, 5.0, 100.0], 1.0) == pytest.approx(0.2)
    assert measured_speed([], 1.0) is None and measured_speed([0.0], 1.0) is None
    assert smooth(None, 0.5, SpeedModel()) == 0.5
    assert smooth(1.0, 0.0, SpeedModel(smoothing=0.25)) == pytest.approx(0.75)


@settings(max_examples=200, deadline=None)
@given(belief=st.floats(0.05, 20), noise=st.floats(-0.24, 0.24))
def test_noise_within_the_band_never_changes_a_belief(belief, noise):
    """Hysteresis: measurements within the band around the belief keep it, so plans do not flap."""
    assert revised_beliefs({1: belief}, {1: belief * (1 + noise)}, SpeedModel(band=0.25)) == {1: belief}


def test_a_real_slowdown_changes_the_belief():
    assert revised_beliefs({1: 1.0, 2: 1.0}, {1: 0.2, 2: 0.9}, SpeedModel(band=0.25)) == {1: 0.2, 2: 1.0}


def test_switch_only_when_the_new_bottleneck_beats_the_running_one_by_the_threshold():
    assert not worth_switching(1.0, 0.95, 0.10)
    assert worth_switching(1.0, 0.90, 0.10)
    assert worth_switching(None, 5.0, 0.10)  # the running plan cannot run at all
