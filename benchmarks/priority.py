"""Why background work is lowered only as a process of its own, never as a thread beside the stream (issue 25).

    .venv/bin/python benchmarks/priority.py [--busy 4] [--seconds 3] [--rounds 3]

A ticker thread (a 3 ms sleep and a little Python, like a stage's threads between frames) runs while background
work beside it calls a step that releases Python's lock (hashing 8 MiB, as an interpreter's invoke releases it)
and takes it back to return; --busy processes of plain Python keep the host's cores busy at the normal priority,
as the other stages and serve do. The background work runs as a thread of the ticker's process at nice 0, as
such a thread at nice 19, or as a process of its own at nice 19 (serve's cutting process). The table gives the
ticker's longest gap and its 99th percentile per arrangement (the worst round, and every round's longest), and
how many steps the background work finished. The rounds interleave the arrangements. Linux only (per-thread nice
values).
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dnnpipe.runtime.priority import LOWEST_PRIORITY, lower_this_process  # noqa: E402

TICK_SECONDS = 0.003
DATA = 8 << 20
ARRANGEMENTS = ("thread, nice 0", "thread, nice 19", "process, nice 19")


@dataclass
class Round:
    longest_ms: float
    p99_ms: float
    steps: int


def hash_for(seconds: float, data: bytes) -> int:
    steps, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        hashlib.sha256(data)  # releases Python's lock while it hashes; takes it back to return
        steps += 1
    return steps


def background_process(seconds: float, steps: "multiprocessing.Queue[int]") -> None:
    lower_this_process()
    steps.put(hash_for(seconds, os.urandom(DATA)))


def one_round(arrangement: str, seconds: float) -> Round:
    gaps: list[float] = []
    stop = threading.Event()

    def ticker() -> None:
        last = time.monotonic()
        while not stop.is_set():
            sum(range(2000))
            time.sleep(TICK_SECONDS)
            now = time.monotonic()
            gaps.append((now - last) * 1000)
            last = now

    steps: list[int] = []

    def background_thread() -> None:
        if arrangement.endswith("19"):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST_PRIORITY)
        steps.append(hash_for(seconds, os.urandom(DATA)))

    ticking = threading.Thread(target=ticker)
    ticking.start()
    try:
        if arrangement.startswith("thread"):
            worker = threading.Thread(target=background_thread)
            worker.start()
            worker.join()
        else:
            counted: multiprocessing.Queue[int] = multiprocessing.Queue()
            process = multiprocessing.Process(target=background_process, args=(seconds, counted))
            process.start()
            try:
                steps.append(counted.get(timeout=seconds + 30))
            finally:
                process.join(30)
                if process.is_alive():
                    process.kill()
                    process.join()
    finally:
        stop.set()
        ticking.join()
    gaps.sort()
    return Round(gaps[-1], gaps[int(len(gaps) * 0.99)], steps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=4, help="busy processes beside it (default 4)")
    parser.add_argument("--seconds", type=float, default=3.0, help="of each round (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="of each arrangement, interleaved (default 3)")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        sys.exit("benchmarks/priority.py: per-thread nice values are Linux's")
    if os.getpriority(os.PRIO_PROCESS, 0) >= LOWEST_PRIORITY:
        sys.exit(f"benchmarks/priority.py: this process runs at nice {LOWEST_PRIORITY} already: nothing to compare")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    rounds: dict[str, list[Round]] = {a: [] for a in ARRANGEMENTS}
    try:
        time.sleep(0.3)
        for _ in range(args.rounds):
            for arrangement in ARRANGEMENTS:
                rounds[arrangement].append(one_round(arrangement, args.seconds))
    finally:
        for process in busy:
            process.kill()
            process.wait()
    load = os.getloadavg()
    print(f"{os.cpu_count()} cores, {args.busy} busy processes beside the ticker, {args.rounds} rounds of "
          f"{args.seconds:g} s, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print("| background work | ticker's longest gap, worst round (each round) ms | its p99, worst round ms | "
          "background steps per round |")
    print("|---|---:|---:|---:|")
    for arrangement, done in rounds.items():
        each = ", ".join(f"{r.longest_ms:.0f}" for r in done)
        print(f"| {arrangement} | {max(r.longest_ms for r in done):.1f} ({each}) | "
              f"{max(r.p99_ms for r in done):.1f} | {', '.join(str(r.steps) for r in done)} |")


if __name__ == "__main__":
    main()
