"""serve under a fault: a device's stage is killed while 4 emulated devices serve a model.

    .venv/bin/python benchmarks/adaptive.py [--models tiny efficientnetv2b0]

The cluster is the paper's testbed (C = 1, 0.33, 0.21, 0.21) emulated on `local` devices: each stage is
paced at its planned time (the runtime's --pace-ms), every speed scaled by one factor so the emulated cluster
fits this host (the testbed's emulation_scale). After a few seconds of
results the stage on device 2 is SIGKILLed; the table gives the throughput before the fault, the time to
detect it, to re-plan, to cut the new sub-models, to ship them and to the first new result (each from the
detection), the throughput after the switch, both throughputs against their plan's prediction (scaled like
the speeds), and the results lost and duplicated in OUT (both must be 0).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from dnnpipe.config import load_config  # noqa: E402
from dnnpipe.serve.controller import ServeSummary, serve  # noqa: E402
from dnnpipe.serve.options import ServeOptions  # noqa: E402
from dnnpipe.testbed.cores import usable_cores  # noqa: E402
from dnnpipe.testbed.pacing import emulation_scale  # noqa: E402
from serve_setup import Served, make_served  # noqa: E402

SPEEDS = [1.0, 0.33, 0.21, 0.21]
VICTIM = 2  # the device whose stage is killed
BEFORE_SECONDS = 3.0  # of results before the fault
AFTER_SECONDS = 4.0  # of results after the switch


def rate(times: list[float], start: float, end: float) -> float:
    inside = [t for t in times if start <= t <= end]
    return (len(inside) - 1) / (inside[-1] - inside[0]) if len(inside) > 1 and inside[-1] > inside[0] else 0.0


def run_fault(served: Served, work: Path, scale: float) -> tuple[ServeSummary, float, int, int]:
    """serve with a kill; the summary, when the kill happened, and the results lost and duplicated in OUT."""
    registry = served.registry([1, 2, 3, 4], work / "registry.json")
    out = work / "out.h5"
    from dnnpipe.planner import plan

    predicted = plan(served.config).throughput * scale
    total = int(predicted * (BEFORE_SECONDS + AFTER_SECONDS + 2))
    lines: list[str] = []
    killed = threading.Event()
    kill_time = [0.0]

    def echo(line: str) -> None:
        lines.append(line)
        print(f"    {line}", flush=True)
        if "epoch 1: first result" in line:
            threading.Thread(target=kill, daemon=True).start()

    def kill() -> None:
        time.sleep(BEFORE_SECONDS)
        found = [x for x in lines if x.startswith("serve: stage") and f"on device {VICTIM} " in x]
        kill_time[0] = time.monotonic()
        os.kill(int(found[0].rsplit(" ", 1)[1]), signal.SIGKILL)
        killed.set()

    options = ServeOptions(registry=registry, model_path=served.parts, model_name=served.name, config=served.config,
                           data_path=served.data, output_path=out, num_inputs=total, progress_timeout=2.0,
                           emulate_speed=True, emulation_scale=scale, threshold=10.0)  # the fault alone
    summary = serve(options, echo=echo)
    assert killed.is_set(), "the run ended before the fault"
    lost = 0
    rows = len(next(iter(served.expected.values())))
    with h5py.File(out) as f:
        for name, expected in served.expected.items():
            got = f[name][:]
            close = np.isclose(got, expected[np.arange(total) % rows], rtol=1e-4, atol=1e-4).reshape(total, -1)
            lost = max(lost, int((~close.all(axis=1)).sum()) + total - int(f.attrs["stored"]))
    return summary, kill_time[0], lost, summary.duplicates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny"], choices=["tiny", "efficientnetv2b0"])
    parser.add_argument("--scale", type=float, help="emulation scale (default: the demo's, to fit this host)")
    args = parser.parse_args()
    rows = []
    scale = args.scale or 1.0
    for kind in args.models:
        with tempfile.TemporaryDirectory() as folder:
            work = Path(folder)
            print(f"{kind}: converting and profiling ...", flush=True)
            served = make_served(work, SPEEDS, kind, 48 if kind == "tiny" else None, repeats=5)
            scale = args.scale or emulation_scale(load_config(served.config), usable_cores())
            summary, kill_at, lost, duplicates = run_fault(served, work, scale)
        switch = summary.switches[0]
        first = min(summary.result_times)
        new_first = switch.detected_at + (switch.first_result_s or 0.0)
        before = rate(summary.result_times, first + 1.0, kill_at)
        after = rate(summary.result_times, new_first + 0.5, max(summary.result_times))
        rows.append((kind, before, summary.start_throughput * scale, switch.detected_at - kill_at, switch.replan_s,
                     switch.cut_s, switch.ship_s, switch.first_result_s or float("nan"), after,
                     switch.predicted_throughput * scale, lost, duplicates))
    print(f"\nemulated paper testbed C = {SPEEDS} x {scale:.3f}; the stage on device {VICTIM} SIGKILLed; "
          f"seconds after the detection except 'detect' (after the kill)\n")
    print("| model | before inf/s (predicted) | detect s | re-plan ms | cut s | ship s | first new result s "
          "| after inf/s (predicted) | after/before (predicted) | lost | duplicated |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, before, p_before, detect, replan_s, cut, ship, first_s, after, p_after, lost, dup in rows:
        print(f"| {kind} | {before:.1f} ({p_before:.1f}, {before / p_before:.0%}) | {detect:.2f} | "
              f"{replan_s * 1000:.1f} | {cut:.2f} | {ship:.2f} | {first_s:.2f} | {after:.1f} ({p_after:.1f}, "
              f"{after / p_after:.0%}) | {after / before:.2f} ({p_after / p_before:.2f}) | {lost} | {dup} |")


if __name__ == "__main__":
    main()
