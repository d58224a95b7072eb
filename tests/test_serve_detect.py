"""The rules serve applies to the stage times the agents report: how fast each device is, when to switch."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnnpipe.serve.detect import PAUSE_SECONDS, SpeedModel, listening_since, recent_frames, silence, speed_outliers, \
    stage_median, stage_time, worth_switching

MODEL = SpeedModel(band=0.25)
PROFILED = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}


def test_stage_time_is_the_median_of_the_last_frames():
    model = SpeedModel(window=4, min_frames=3)
    assert stage_median([1.0, 1.0], model) is None
    assert stage_median([100.0, 100.0, 1.0, 2.0, 3.0, 50.0], model) == pytest.approx(2.5)


def test_a_stage_whose_every_recent_frame_slowed_is_seen_before_the_median_moves():
    model = SpeedModel(window=16, min_frames=8, recent_ms=100.0, recent_min=4)
    steady = [10.0] * 12
    assert stage_time(steady + [10.0, 40.0, 9.0, 41.0], model) == 10.0  # noise: some recent frames fast
    assert stage_time(steady + [40.0, 41.0, 42.0, 40.0], model) == 40.0  # all four slowed: the median is still 10
    assert stage_median(steady + [40.0, 41.0, 42.0, 40.0], model) == 10.0
    assert stage_time([1.0] * 7, model) is None


def test_the_recent_frames_are_counted_in_stage_time_not_in_frames():
    """A slow model's slowed frames (110 ms) count after four of them; a fast stage's need to span as long: eight
    slowed frames of 4 ms are too short a run to be told from host noise, however many the rule once counted."""
    model = SpeedModel(window=32, min_frames=16, recent_ms=200.0, recent_min=4)
    assert stage_time([28.0] * 16 + [110.0] * 3, model) == 28.0  # three slowed frames: not yet
    assert stage_time([28.0] * 16 + [110.0] * 4, model) == 110.0
    assert stage_time([1.0] * 16 + [4.0] * 8, model) == 1.0  # 32 ms of slowed frames: noise for all it shows
    assert stage_time([1.0] * 8 + [4.0] * 24, model) == 4.0  # then the median moves: it did slow down
    assert recent_frames([5.0, 300.0, 1.0, 1.0, 1.0], model) == [1.0, 1.0, 1.0, 300.0]


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


def test_a_pause_of_the_controller_is_no_devices_silence():
    """The controller's readers do not run while its process is paused: every agent looks silent by the pause.
    Silence counts from the later of the last heartbeat and the moment the controller listens again."""
    since = listening_since(0.0, last_tick=10.0, now=10.05)  # on time: still listening since 0
    assert since == 0.0 and silence(last_beat=9.4, now=10.05, since=since) == pytest.approx(0.65)
    since = listening_since(since, last_tick=10.05, now=10.05 + PAUSE_SECONDS + 0.6)  # paused 0.8 s
    assert since == pytest.approx(10.85)
    assert silence(last_beat=10.0, now=10.9, since=since) == pytest.approx(0.05)  # not 0.9: the pause is ours
    assert silence(last_beat=10.0, now=11.5, since=since) == pytest.approx(0.65)  # silent since it listened again
