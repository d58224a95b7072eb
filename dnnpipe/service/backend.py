"""The single-device backend: the whole model run in-process by the lite interpreter, consuming a Feed.

It is the "fastest device alone" baseline of benchmarks/serving.py, and what `python -m dnnpipe service` serves
until the adaptive controller sits behind the same front door.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from ..errors import DnnpipeError
from ..interpreter import StageRunner
from ..manifest import Manifest, StageSpec, read_manifest
from ..runtime.dataio import to_real, to_wire
from ..feeds import Feed, ServeEvents

POLL = 0.25  # s between looks at whether the feed has ended


class SingleDevice:
    """Callable as run_pipeline(feed, events): model.tflite when the manifest's folder has it (one interpreter),
    else the chain of its sub-models; loaded at construction, so a bad model fails before the service listens."""

    def __init__(self, folder: Path, num_threads: Optional[int] = None, device: int = 1):
        self.manifest: Manifest = read_manifest(folder)
        self.device = device
        whole = self.manifest.whole_model
        if whole is not None and (folder / whole.file).exists():
            stage = StageSpec(1, device, (1, self.manifest.units), whole.file, whole.sha256, whole.cuts[0],
                              whole.cuts[self.manifest.units])
            self.runners = [StageRunner(folder / whole.file, stage, num_threads)]
        else:
            self.runners = [StageRunner(folder / s.file, s, num_threads) for s in self.manifest.stages]
        self.first, self.last = self.runners[0].stage, self.runners[-1].stage

    def infer(self, row: list) -> list:
        """One input (real-valued or of the wire's dtype, no batch dimension) to real-valued outputs."""
        carried = [to_wire(spec, value) for spec, value in zip(self.first.inputs, row)]
        for runner in self.runners:
            carried = runner(carried)
        return [to_real(spec, value)[0] for spec, value in zip(self.last.outputs, carried)]

    def __call__(self, feed: Feed, events: ServeEvents) -> None:
        events.devices_up(1)
        events.ready(True)
        index = 0
        try:
            while True:
                row = feed.wait_input(index, POLL)
                if row is None:
                    if feed.exhausted(index):
                        return
                    continue
                start = time.perf_counter()
                try:
                    outputs = self.infer(row)
                except (ValueError, RuntimeError, DnnpipeError) as e:
                    feed.abandon(index, f"the interpreter failed on it ({e})")
                else:
                    events.stage_time(1, self.device, time.perf_counter() - start)
                    feed.deliver(index, outputs)
                index += 1
        finally:
            events.ready(False)
