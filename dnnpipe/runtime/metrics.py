"""Per-frame timings of one stage, written as CSV like the paper's runtime, and their summary."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


@dataclass
class FrameTiming:
    sequence: int
    receive_ms: float = 0.0  # reading the frame off the socket (or the input file)
    queue_wait_ms: float = 0.0  # waiting for the executor
    inference_ms: float = 0.0
    emulation_ms: float = 0.0  # pacing: sleep until the emulated device's planned time has passed
    send_ms: float = 0.0  # writing the result to the socket (or the output file)
    infer_start: float = 0.0  # epoch seconds: busy interval for timelines across stages
    infer_end: float = 0.0
    latency_ms: float = float("nan")  # end to end, last stage only (clocks must agree across devices)
    planned_ms: float = 0.0  # the emulated device's planned stage time (0: not paced)
    received: float = 0.0  # epoch seconds the frame was read off the link (0: read from the input file)
    send_start: float = 0.0  # epoch seconds its result began to go to the next stage (0: last stage)
    inference_cpu_ms: float = 0.0  # the executor thread's CPU time for the inference (invoke and copies)

    @property
    def overrun(self) -> bool:
        """The host computed slower than the emulated device would have: this frame is not faithful."""
        return 0 < self.planned_ms < self.inference_ms


@dataclass
class StageSummary:
    stage: int
    frames: int
    seconds: float
    throughput: float  # inferences per second
    inference_p50_ms: float
    inference_p95_ms: float
    stage_time_p50_ms: float  # inference plus emulation
    busy_fraction: float
    latency_p50_ms: Optional[float] = None
    latency_p95_ms: Optional[float] = None
    planned_ms: float = 0.0  # the emulated device's planned stage time (0: not paced)
    overruns: int = 0  # frames whose host compute exceeded planned_ms
    cpu_ms_per_frame: Optional[float] = None  # the stage process's CPU time per frame, every thread
    inference_cpu_ms: Optional[float] = None  # of it, the inference's (mean); the rest is the stage's own work

    @property
    def frame_cpu_ms(self) -> Optional[float]:
        """CPU per frame outside the inference: receiving, decoding, TLS, hand-offs, sending."""
        if self.cpu_ms_per_frame is None or self.inference_cpu_ms is None:
            return None
        return self.cpu_ms_per_frame - self.inference_cpu_ms

    def describe(self) -> str:
        text = (f"[stage {self.stage}] {self.frames} frames in {self.seconds:.2f} s: {self.throughput:.1f} "
                f"inferences/s; inference p50 {self.inference_p50_ms:.2f} ms p95 {self.inference_p95_ms:.2f} ms; "
                f"stage time p50 {self.stage_time_p50_ms:.2f} ms; busy {self.busy_fraction:.0%}")
        if self.cpu_ms_per_frame is not None and self.inference_cpu_ms is not None:
            text += (f"; CPU {self.cpu_ms_per_frame:.2f} ms a frame ({self.inference_cpu_ms:.2f} inference, "
                     f"{self.cpu_ms_per_frame - self.inference_cpu_ms:.2f} the rest)")
        if self.planned_ms:
            text += f"; paced to {self.planned_ms:.2f} ms, {self.overruns} frames over it"
        if self.latency_p50_ms is not None:
            text += (f"\n[stage {self.stage}] pipeline: {self.frames} results, {self.throughput:.1f} inferences/s "
                     f"end to end, latency p50 {self.latency_p50_ms:.1f} ms p95 {self.latency_p95_ms:.1f} ms")
        return text


def summarise(stage: int, timings: Sequence[FrameTiming], last: bool,
              cpu_seconds: Optional[float] = None) -> StageSummary:
    """`cpu_seconds`: the stage process's CPU time over the run (all its threads), for CPU per frame."""
    if not timings:
        return StageSummary(stage, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    ends = np.array([t.infer_end for t in timings])
    starts = np.array([t.infer_start for t in timings])
    inference = np.array([t.inference_ms for t in timings])
    stage_time = inference + np.array([t.emulation_ms for t in timings])
    span = float(ends[-1] - starts[0])
    # Steady-state rate: frames completed after the first, over the time between completions.
    throughput = (len(ends) - 1) / float(ends[-1] - ends[0]) if len(ends) > 1 and ends[-1] > ends[0] else (
        1000.0 / stage_time[0] if stage_time[0] > 0 else 0.0)
    latency = np.array([t.latency_ms for t in timings])
    return StageSummary(
        stage=stage, frames=len(timings), seconds=span, throughput=throughput,
        inference_p50_ms=float(np.percentile(inference, 50)), inference_p95_ms=float(np.percentile(inference, 95)),
        stage_time_p50_ms=float(np.percentile(stage_time, 50)),
        busy_fraction=float(stage_time.sum() / 1000 / span) if span > 0 else 1.0,
        latency_p50_ms=float(np.percentile(latency, 50)) if last else None,
        latency_p95_ms=float(np.percentile(latency, 95)) if last else None,
        planned_ms=timings[0].planned_ms, overruns=sum(t.overrun for t in timings),
        cpu_ms_per_frame=None if cpu_seconds is None else cpu_seconds * 1000 / len(timings),
        inference_cpu_ms=float(np.mean([t.inference_cpu_ms for t in timings])),
    )


def write_log(folder: Path, stage: int, timings: Sequence[FrameTiming], summary: StageSummary) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"stage_{stage}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([field.name for field in fields(FrameTiming)])
        for timing in timings:
            writer.writerow(list(asdict(timing).values()))
    (folder / f"stage_{stage}_summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")


def read_summary(folder: Path, stage: int) -> StageSummary:
    return StageSummary(**json.loads((folder / f"stage_{stage}_summary.json").read_text()))


def read_timings(folder: Path, stage: int) -> list[FrameTiming]:
    with open(folder / f"stage_{stage}.csv") as f:
        rows = list(csv.DictReader(f))
    return [FrameTiming(int(row.pop("sequence")), **{k: float(v) for k, v in row.items()}) for row in rows]
