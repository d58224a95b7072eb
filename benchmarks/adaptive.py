"""serve on device agents under faults and changes: kill, freeze, cut, slowdown, join (and a steady run).

    .venv/bin/python benchmarks/adaptive.py [--models tiny efficientnetv2b0]
                                            [--scenarios kill freeze cut slowdown join]
                                            [--steady SECONDS]   (--scenarios with no name: the steady run alone)

The cluster is the paper's testbed (C = 1, 0.33, 0.21, 0.21) emulated on `local` devices: each role is paced at
its planned time, every speed scaled by one factor so the emulated cluster fits this host (the testbed's
emulation_scale). After a few seconds of results, and once serve says it is ready for a loss (every plan for the
loss of one device loaded ahead on its devices; the table's 'ready'), one thing happens:

    kill      the agent of device 2 is SIGKILLed (its control link closes)
    freeze    the agent of device 2 is SIGSTOPped (its heartbeats stop)
    cut       device 2's link is cut (`testbed fault 2 cut`): the same cluster as a virtual fleet, each device a
              board in its own network namespace with its own sshd, a CPU quota of about four times its paced
              speed, its agent started over ssh; root only (skipped with the reason otherwise)
    slowdown  device 1 runs 4x slower (its pace is changed over the control link; serve must measure it)
    join      device 4 is added to the registry and serve gets SIGHUP (it starts in a 3-device registry;
              --threshold 0.01, so the switch happens even where device 4 gains little)

The table gives, in seconds unless marked: detection (from the event), re-plan (ms), cut and push on the critical
path (s; 0 when pushed ahead of time), switch (ms: roles out, route open), the first new result after detection,
the longest gap between two consecutive results as a client sees it (from 1 s before the event to the end),
throughput before and after against the plans' predictions (scaled like the speeds), and results lost and
duplicated in OUT (both must be 0). --steady runs the cluster unchanged at full load and counts re-plans (must be
0).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from dnnpipe.config import load_config  # noqa: E402
from dnnpipe.testbed.local import free_ports  # noqa: E402
from dnnpipe.serve.controller import Controller, ServeSummary  # noqa: E402
from dnnpipe.serve.options import ServeOptions  # noqa: E402
from dnnpipe.testbed import fleet  # noqa: E402
from dnnpipe.testbed.cores import usable_cores  # noqa: E402
from dnnpipe.testbed.pacing import emulation_scale  # noqa: E402
from serve_setup import Served, make_served  # noqa: E402

SPEEDS = [1.0, 0.33, 0.21, 0.21]
LABELS = {"kill": "lost", "freeze": "frozen", "cut": "frozen", "slowdown": "slower", "join": "joined", "steady": ""}
SCENARIOS = ["kill", "freeze", "cut", "slowdown", "join"]
BOARD_MB = 1000  # each board's memory for its stage: any of EfficientNetV2B0's
BEFORE_SECONDS = 3.0  # of results before the event (at least: a loss or a join waits until serve is ready for a loss)
READY_SECONDS = 8.0  # at most this long for serve to have every plan for a loss loaded ahead (inputs last for it)
WAIT_READY = ("kill", "freeze", "cut", "join")  # (a slowdown is scripted in serve, at BEFORE_SECONDS)
AFTER_SECONDS = 4.0  # of results after it
THRESHOLDS = {"join": 0.01, "slowdown": 0.05, "steady": 0.05}  # --threshold (a join with device 4, the slowest, may
# gain the tiny model only a few per cent: it still switches, so the switch is measured)


@dataclass
class Outcome:
    scenario: str
    summary: ServeSummary
    event_at: float
    detected_s: float
    lost: int
    ready_s: float  # from the first result until serve said it was ready for a loss (nan: not said)
    fill_s: float  # the new plan's stage times end to end, as paced: no first result comes sooner


def rate(times: list[float], start: float, end: float) -> float:
    inside = [t for t in times if start <= t <= end]
    return (len(inside) - 1) / (inside[-1] - inside[0]) if len(inside) > 1 and inside[-1] > inside[0] else 0.0


@contextmanager
def boards(work: Path) -> Iterator[Path]:
    """The cluster as a virtual fleet, its state folder, removed afterwards. The quotas share the usable cores in
    proportion to C, about four times the speed each board's roles are paced at: a board's pace is its plan's, and
    the quota keeps its CPU its own (at twice, EfficientNetV2B0's 0.12-core boards could not keep their pace while
    taking sub-models in)."""
    (work / "cluster.json").write_text(json.dumps({"C": SPEEDS, "M": [BOARD_MB] * len(SPEEDS)}))
    state = work / "fleet"
    fleet.up(work / "cluster.json", state / "registry.json", state, scale=usable_cores() / sum(SPEEDS),
             echo=lambda line: print(f"    {line}"))
    try:
        yield state
    finally:
        fleet.down(state)


def run(served: Served, work: Path, scale: float, scenario: str, seconds: Optional[float] = None,
        fleet_state: Optional[Path] = None) -> Outcome:
    """`fleet_state`: a virtual fleet's state folder, whose registry serve then uses (the cut scenario)."""
    ports = dict(zip((1, 2, 3, 4), free_ports(4)))
    if fleet_state is not None:
        registry = fleet_state / "registry.json"
    else:
        registry = served.registry([1, 2, 3] if scenario == "join" else [1, 2, 3, 4], work / "registry.json", ports)
    out = work / f"out_{scenario}.h5"
    from dnnpipe.planner import plan

    predicted = plan(served.config).throughput * scale
    total = int(predicted * (seconds or (BEFORE_SECONDS + READY_SECONDS + AFTER_SECONDS + 2)))
    event = threading.Event()
    event_at = [0.0]
    ready, finished = threading.Event(), threading.Event()
    first_at, ready_at = [0.0], [float("nan")]
    changes = ((BEFORE_SECONDS, 1, SPEEDS[0] / 4),) if scenario == "slowdown" else ()
    options = ServeOptions(registry=registry, model_path=served.parts, model_name=served.name, config=served.config,
                           data_path=served.data, output_path=out, num_inputs=total, emulate_speed=True,
                           emulation_scale=scale, threshold=THRESHOLDS.get(scenario, 10),
                           emulate_changes=changes, work_dir=work / "serve_work")
    controller: list[Controller] = []

    def act() -> None:
        time.sleep(BEFORE_SECONDS)
        if scenario in WAIT_READY and not ready.wait(READY_SECONDS):
            print(f"    serve was not ready for a loss within {READY_SECONDS:g} s: the event goes ahead", flush=True)
        if finished.is_set():
            print("    the run ended before the event", flush=True)
            return
        event_at[0] = time.monotonic()
        event.set()
        pid = controller[0].fleet.agents[2].pid or 0
        if scenario in ("kill", "freeze") and pid <= 0:  # (0 or less would signal a process group)
            print(f"    device 2's agent has no pid to {scenario}", flush=True)
        elif scenario in ("kill", "freeze"):
            os.kill(pid, signal.SIGKILL if scenario == "kill" else signal.SIGSTOP)
        elif scenario == "cut" and fleet_state is not None:
            fleet.fault(fleet_state, 2, "cut", echo=lambda line: None)
        elif scenario == "join":
            served.registry([1, 2, 3, 4], registry, ports)
            os.kill(os.getpid(), signal.SIGHUP)

    def echo(line: str) -> None:
        print(f"    {time.monotonic():.3f} {line}", flush=True)
        if "generation 1: first result" in line and scenario not in ("steady",):
            first_at[0] = time.monotonic()
            threading.Thread(target=act, daemon=True).start()
        if "switch: generation" in line:
            ready.clear()  # a new plan: its own plans for a loss are loaded next
        elif "serve: ready for a loss" in line and first_at[0] and not ready.is_set() and not event.is_set():
            ready_at[0] = time.monotonic() - first_at[0]
            ready.set()

    c = Controller(options, echo)
    controller.append(c)
    try:
        summary = c.run()
    finally:
        finished.set()
    if scenario == "slowdown":
        event_at[0] = (summary.result_times[0] if summary.result_times else 0.0) + BEFORE_SECONDS
    ours = [x for x in summary.switches if x.label == LABELS[scenario]]
    detected = ours[0].detected_at - event_at[0] if ours and event_at[0] else float("nan")
    fill_s = sum(c.paced_ms(d, (first, last)) or 0.0 for first, last, d in ours[0].stages) / 1000 if ours \
        else float("nan")
    lost = 0
    rows = len(next(iter(served.expected.values())))
    with h5py.File(out) as f:
        for name, expected in served.expected.items():
            got = f[name][:]
            close = np.isclose(got, expected[np.arange(total) % rows], rtol=1e-4, atol=1e-4).reshape(total, -1)
            lost = max(lost, int((~close.all(axis=1)).sum()) + total - int(f.attrs["stored"]))
    return Outcome(scenario, summary, event_at[0], detected, lost, ready_at[0], fill_s)


def row(kind: str, o: Outcome) -> str:
    s = o.summary
    times = s.result_times
    if not s.switches:
        return (f"| {kind} | {o.scenario} | {rate(times, times[0] + 1, times[-1]):.1f} ({s.start_throughput:.1f}) | "
                f"{o.ready_s:.1f} | no switch | | | | | | {max(np.diff(times)) if len(times) > 1 else 0:.3f} | | | | "
                f"{o.lost} | {s.duplicates} |")
    w = next((x for x in s.switches if x.label == LABELS[o.scenario]), s.switches[0])
    first = (w.first_result_s if w.first_result_s is not None else float("nan"))
    window = [t for t in times if t >= o.event_at - 1.0]
    gaps = np.diff(window)
    gap = max(gaps) if len(window) > 1 else float("nan")
    gap_at = window[int(np.argmax(gaps)) + 1] - w.switched_at if len(window) > 1 else float("nan")
    before = rate(times, times[0] + 1.0, o.event_at)
    after = rate(times, w.detected_at + first + 0.5, times[-1])
    scale = s.predicted_throughput / w.predicted_throughput if w.predicted_throughput else 1.0
    periods = gap * max(before, after)  # in periods of the faster plan as measured (a shared host seldom
    # reaches the predicted rate, and the gap a client sees is against the rate it is used to)
    # The switch alone: from the last result before the new roles went out to 1 s after; in periods of the plan
    # as it ran in the second before (a slowed device's, for a slowdown) and of the new plan as measured after.
    at = [t for t in times if w.switched_at - 1.0 <= t <= w.switched_at + 1.0]
    last_before = max((k for k, t in enumerate(at) if t < w.switched_at), default=0)
    switch_gap = max(np.diff(at[last_before:])) if len(at) > last_before + 1 else float("nan")
    running = rate(times, w.switched_at - 1.0, w.switched_at)
    return (f"| {kind} | {o.scenario} | {before:.1f} ({s.start_throughput:.1f}) | {o.ready_s:.1f} | "
            f"{o.detected_s:.3f} | "
            f"{w.replan_s * 1000:.1f} | {w.prepare_s:.3f} | {w.push_s:.3f} | {w.switch_s * 1000:.1f} | "
            f"{first:.3f} ({o.fill_s:.3f}) | "
            f"{gap:.3f} ({periods:.1f}) at {gap_at:+.2f} | "
            f"{switch_gap:.3f} ({switch_gap * running:.1f} / {switch_gap * after:.1f}) | "
            f"{w.links_kept} of {len(w.stages) + 1} | {after:.1f} ({w.predicted_throughput * scale:.1f}) | {o.lost} | "
            f"{s.duplicates} |")


def main() -> None:
    faulthandler.enable()  # serve runs in this process: a crash says where every thread was
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny"], choices=["tiny", "efficientnetv2b0"])
    parser.add_argument("--scenarios", nargs="*", default=SCENARIOS, choices=SCENARIOS)
    parser.add_argument("--steady", type=float, metavar="SECONDS", help="also a steady run this long")
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
            for scenario in args.scenarios:
                print(f"{kind}: {scenario}", flush=True)
                if scenario != "cut":
                    rows.append(row(kind, run(served, work, scale, scenario)))
                elif fleet.why_not_available() is not None:
                    rows.append(f"| {kind} | cut | skipped: {fleet.why_not_available()} |")
                else:
                    with boards(work) as state:
                        rows.append(row(kind, run(served, work, scale, scenario, fleet_state=state)))
            if args.steady:
                print(f"{kind}: steady for {args.steady:g} s", flush=True)
                steady = run(served, work, scale, "steady", args.steady)
                rows.append(f"| {kind} | steady {args.steady:g} s | {len(steady.summary.switches)} re-plans | "
                            f"{steady.summary.stored} results, {steady.lost} lost, {steady.summary.duplicates} "
                            f"duplicated |")
    legend = " ".join([
        f"emulated paper testbed C = {SPEEDS} x {scale:.3f}; seconds after the detection except 'detect' (after the",
        "event); 'ready' is when serve had every plan for a loss loaded ahead, from the first result (a loss or a",
        f"join waits for it, after {BEFORE_SECONDS:g} s of results at least); 'loaded ahead' is a planned switch's",
        "cut, push and load while the old plan served (before its barrier); 'cut+push' is what was cut and pushed on",
        "the critical path; the new plan's fill is its stages' paced times end to end (links not counted): none of",
        "its results can come sooner; the longest gap also in periods of the faster plan as measured, and when it",
        "ended, in seconds from the switch (the new roles going out; a planned switch loads them before); 'at the",
        "switch' is the longest gap from the last result before the new roles went out to 1 s after, in periods of",
        "the plan as it ran in the second before / of the new plan as measured after; 'links kept' are the new",
        "plan's links (input, between stages, results) that went on from the old plan after NEXT instead of being",
        "dialled"])
    print(f"\n{legend}\n")
    print("| model | event | before inf/s (predicted) | ready s | detect s | re-plan ms | loaded ahead s | cut+push s "
          "| switch ms | first new result s (new plan's fill) | longest gap s (periods) at s "
          "| at the switch s (periods before / after) | links kept | after inf/s (predicted) | lost | duplicated |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for line in rows:
        print(line)


if __name__ == "__main__":
    main()
