"""Which runs the demo measures and how fast each one's source offers inputs: the standard definitions, one place
for both computes (`pace` and `cpu-quota`).

Throughput is what a pipeline sustains fed as fast as it takes inputs (the paper's runtime feeds its first stage
so): a source paced at the predicted rate can never read above it, and a hiccup it causes is never made up. So
the pipeline and the fastest device alone run with the source unpaced. Latency is only meaningful below
saturation: a third run of the pipeline with the source paced at LATENCY_LOAD of its predicted throughput.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

from ..runtime.stage import RunOptions
from ..testbed.local import PipelineRun
from ..testbed.pacing import Emulation
from .work import Work

LATENCY_LOAD = 0.8  # the latency run's source rate, as a fraction of the pipeline's predicted throughput
QUEUE_SIZE = 1  # every stage's queue: a frame waits behind at most one other, so latency is not a backlog's


@dataclass(frozen=True)
class DemoRun:
    """One measured run: its name (its log folder under logs/), the plan it emulates and its stages' options."""

    name: str  # pipeline, single, latency
    title: str
    emulated: Emulation
    run: RunOptions
    single: bool = False  # the whole model on the fastest device (single_device/), not the pipeline's stages
    checked: bool = False  # its results are results.h5, the ones checked against the model
    load: Optional[float] = None  # the source's rate as a fraction of the predicted throughput (None: unpaced)

    def folder(self, work: Work) -> Path:
        return (work.single if self.single else work.parts) / work.name

    def output(self, work: Work) -> Path:
        """Every run writes its results, as a deployed last stage does (on a slow board that costs a share of its
        CPU, so the pipeline and the device alone must both pay it); results.h5 is the checked run's."""
        return work.results if self.checked else work.logs / self.name / "results.h5"

    def source(self) -> str:
        if self.run.fps is None:
            return "source unpaced (fed as fast as it takes inputs): the throughput it sustains"
        return (f"source paced at {self.run.fps:.1f} inferences/s, {self.run.fps / self.emulated.throughput:.0%} of "
                f"the predicted {self.emulated.throughput:.1f}: latency below saturation")


def demo_runs(pipeline: Emulation, single: Emulation, num_inputs: int, tls: bool,
              load: float = LATENCY_LOAD) -> list[DemoRun]:
    """The pipeline and the fastest device alone unpaced (throughput), then the pipeline paced at `load` of its
    prediction (latency); each stage on one thread, as the profile timed it. Pure."""
    unpaced = RunOptions(num_inputs=num_inputs, num_threads=1, queue_size=QUEUE_SIZE, tls=tls)
    return [DemoRun("pipeline", "pipeline", pipeline, unpaced, checked=True),
            DemoRun("single", "the fastest device alone", single, unpaced, single=True),
            DemoRun("latency", "pipeline, for latency", pipeline, replace(unpaced, fps=load * pipeline.throughput),
                    load=load)]


def measure(runs: list[DemoRun], execute: Callable[[DemoRun], PipelineRun],
            say: Callable[[str], None] = print) -> dict[str, PipelineRun]:
    """Each run in turn on whatever emulates the devices (`execute`: the paced host or the fleet)."""
    done = {}
    for r in runs:
        say(f"{r.title}: {r.source()}")
        done[r.name] = execute(r)
        say(done[r.name].describe())
    return done


def how_measured(runs: list[DemoRun], done: dict[str, PipelineRun]) -> dict[str, Any]:
    """measured.json's record of each run's source, from the options the runs got."""
    return {r.name: {"source_fps": r.run.fps, "load": r.load, "queue_size": r.run.queue_size,
                     "inputs": r.run.num_inputs, "throughput": done[r.name].throughput} for r in runs}
