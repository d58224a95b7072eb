"""Per-frame timings and their summary: the numbers every stage prints and the demo reports."""

import math

import pytest

from dnnpipe.runtime.metrics import FrameTiming, read_summary, read_timings, summarise, write_log


def frames(period_s: float, count: int, inference_ms: float, emulation_ms: float = 0.0) -> list[FrameTiming]:
    """Frames completing every period_s, each busy for inference + emulation."""
    busy = (inference_ms + emulation_ms) / 1000
    return [FrameTiming(i, inference_ms=inference_ms, emulation_ms=emulation_ms, infer_start=i * period_s,
                        infer_end=i * period_s + busy, latency_ms=10.0 + i) for i in range(count)]


def test_steady_state_throughput_and_busy_fraction():
    summary = summarise(2, frames(0.010, 101, 4.0, 1.0), last=False)
    assert summary.frames == 101
    assert summary.throughput == pytest.approx(100.0)  # 100 completions over 1 s
    assert summary.inference_p50_ms == pytest.approx(4.0)
    assert summary.stage_time_p50_ms == pytest.approx(5.0)
    assert summary.busy_fraction == pytest.approx(0.5, abs=0.01)
    assert summary.latency_p50_ms is None


def test_last_stage_reports_latency():
    summary = summarise(3, frames(0.010, 11, 2.0), last=True)
    assert summary.latency_p50_ms == pytest.approx(15.0)
    assert "latency p50 15.0 ms" in summary.describe()


def test_no_frames_is_an_empty_summary_not_an_error():
    summary = summarise(1, [], last=True)
    assert summary.frames == 0 and summary.throughput == 0.0


def test_log_round_trip(tmp_path):
    timings = frames(0.020, 5, 3.0)
    summary = summarise(1, timings, last=True)
    write_log(tmp_path, 1, timings, summary)
    assert read_summary(tmp_path, 1) == summary
    back = read_timings(tmp_path, 1)
    assert [t.sequence for t in back] == [0, 1, 2, 3, 4]
    assert back[2].infer_start == pytest.approx(0.040) and not math.isnan(back[2].latency_ms)
