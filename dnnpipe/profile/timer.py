"""The device side of per-device profiling: times every signature of the profiling model with the lite interpreter.

Shipped with its import closure (NumPy and a lite interpreter are all it needs; no TensorFlow) and run on the
device as `python -m dnnpipe.profile.timer MODEL.tflite`. It prints a progress line now and then and, last, one
`RESULT {json}` line: the probe's, the whole model's and each unit's time in ms.

A device's time is sustained time: invokes back to back for at least `seconds`, wall time over count. A board
limited by a CPU quota (the virtual fleet) runs one short invoke at full speed and is held back only over a
quota period, so the median of single invokes (the host's profiler) would miss the limit a pipeline stage meets
in steady state; on an unlimited CPU both agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..interpreter import load_interpreter

RESULT = "RESULT "


def inputs_for(details: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Values for a signature's inputs (batch 1, random floats, zero integers): timing needs data, not meaning."""
    feed = {}
    for key, detail in details.items():
        shape, dtype = [max(1, int(x)) for x in detail["shape"]], np.dtype(detail["dtype"])
        feed[key] = rng.random(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
    return feed


def sustained_ms(runner, feed: dict[str, np.ndarray], repeats: int, warmup: int, seconds: float) -> float:
    """Mean ms per invoke over at least `repeats` invokes and `seconds` of wall time, inputs set once."""
    runner(**feed)  # allocates and sets the inputs
    wrapper, index = runner._interpreter_wrapper, runner._subgraph_index  # the runner's own invoke, as costs does
    for _ in range(warmup):
        wrapper.Invoke(index)
    count, began = 0, time.perf_counter()
    while count < repeats or time.perf_counter() - began < seconds:
        wrapper.Invoke(index)
        count += 1
    return (time.perf_counter() - began) / count * 1000


def time_units(model: str, repeats: int, warmup: int, num_threads: Optional[int],
               seconds: float = 0.25) -> dict[str, Any]:
    interpreter = load_interpreter(Path(model), num_threads, every_signature_delegated=True)
    names = interpreter.get_signature_list()
    units = sorted((n for n in names if n.startswith("unit_")), key=lambda n: int(n.split("_")[1]))
    rng = np.random.default_rng(0)

    def timed(name: str) -> float:
        runner = interpreter.get_signature_runner(name)
        return sustained_ms(runner, inputs_for(runner.get_input_details(), rng), repeats, warmup, seconds)

    result: dict[str, Any] = {"probe_ms": timed("probe"), "whole_ms": timed("whole"), "units_ms": []}
    for k, name in enumerate(units, 1):
        result["units_ms"].append(timed(name))
        if k % 10 == 0 or k == len(units):
            print(f"timed {k}/{len(units)} units", flush=True)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dnnpipe.profile.timer", description=__doc__)
    parser.add_argument("model", help="the profiling model (.tflite with whole, probe and unit_K signatures)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=0.25, help="at least this long per signature")
    args = parser.parse_args(argv)
    try:
        result = time_units(args.model, args.repeats, args.warmup, args.num_threads, args.seconds)
    except Exception as e:  # noqa: BLE001 - the host gets one line, whatever the interpreter raised
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", flush=True)
        return 1
    print(RESULT + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
