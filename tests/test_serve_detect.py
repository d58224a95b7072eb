"""The rules serve applies to what the control channel says: who is lost, how fast each device is, when to switch."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnnpipe.serve.detect import SpeedModel, StageState, find_lost, speed_outliers, stage_median, worth_switching


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


MODEL = SpeedModel(band=0.25)
PROFILED = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}


def test_stage_time_is_the_median_of_the_last_frames():
    model = SpeedModel(window=4, min_frames=3)
    assert stage_median([1.0, 1.0], model) is None
    assert stage_median([100.0, 100.0, 1.0, 2.0, 3.0, 50.0], model) == pytest.approx(2.5)


def test_a_slowed_bottleneck_device_is_found_with_the_host_s_common_factor_divided_out():
    predicted = {1: 1.0, 2: 1.0, 3: 0.8, 4: 1.0}
    measured = {d: 1.6 * t for d, t in predicted.items()}  # this host runs everything 1.6x slower than profiled
    assert speed_outliers(predicted, measured, PROFILED, PROFILED, MODEL) == {}
    measured[2] = 1.6 * 10  # device 2 now ten times slower
    assert speed_outliers(predicted, measured, PROFILED, PROFILED, MODEL) == {2: pytest.approx(0.1)}


def test_a_small_stage_s_per_frame_overhead_never_makes_it_slow():
    predicted = {1: 1.0, 2: 0.05, 3: 1.0}
    measured = {1: 1.1, 2: 0.3, 3: 1.1}  # six times its profile, still far below the bottleneck
    assert speed_outliers(predicted, measured, PROFILED, PROFILED, MODEL) == {}


def test_a_device_believed_slow_recovers_up_to_its_profiled_speed():
    beliefs = {1: 1.0, 2: 0.1}
    predicted = {1: 1.0, 2: 0.3 / 0.1}
    measured = {1: 1.0, 2: 0.3}  # runs at full speed again
    assert speed_outliers(predicted, measured, beliefs, PROFILED, MODEL) == {2: pytest.approx(1.0)}


@settings(max_examples=200, deadline=None)
@given(times=st.lists(st.floats(0.1, 5.0), min_size=2, max_size=6), noise=st.data())
def test_noise_within_the_band_never_changes_a_belief(times, noise):
    """Hysteresis: every stage measured within the band of its prediction (times any common factor) changes
    nothing, so timing noise never makes plans flap."""
    predicted = dict(enumerate(times, 1))
    common = noise.draw(st.floats(0.5, 3.0))
    measured = {d: t * common * noise.draw(st.floats(0.9, 1.1)) for d, t in predicted.items()}
    beliefs = {d: 1.0 for d in predicted}
    assert speed_outliers(predicted, measured, beliefs, beliefs, MODEL) == {}


def test_switch_only_when_the_new_bottleneck_beats_the_running_one_by_the_threshold():
    assert not worth_switching(1.0, 0.95, 0.10)
    assert worth_switching(1.0, 0.90, 0.10)
    assert worth_switching(None, 5.0, 0.10)  # the running plan cannot run at all
