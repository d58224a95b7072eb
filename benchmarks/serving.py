"""The inference service under load: 16 tritonclient threads at 50%, 80% and 100% of the predicted throughput.

    .venv/bin/python benchmarks/serving.py [--models tiny efficientnetv2b0]
        [--backend pipeline fastest-alone single-device] [--seconds 8] [--scale S] [--window 32] [--threshold 100]

Each model is built (dnnpipe.examples, fixed seed), profiled, planned for the paper's testbed (C = 1, 0.33, 0.21,
0.21) and partitioned (tests/serve_setup.py). A backend is a real `python -m dnnpipe` process serving it on a
loopback port, and its predicted throughput:

    pipeline       `serve --http` on four `local` device agents, every role paced at its planned time on its
                   device (--emulate-speed, every speed times one scale so the emulated cluster fits this host:
                   the testbed's emulation_scale, or --scale); predicted = the starting plan's, as serve prints it
    fastest-alone  the same with device 1 (C = 1) alone in the registry: one stage, the whole model
    single-device  `python -m dnnpipe service`: the whole model in one unpaced interpreter on this host
                   (predicted = 1 / its time per input measured in-process; the front door's own cost)

The load is open-loop: request i is sent at t0 + i / rate by whichever of the 16 client threads is free
(binary tensors, batch 1). Backends run one after the other, in one run. Per row: the plan's stages and time per
input (the bottleneck), offered and achieved requests/s (achieved: the steady rate, first answer to last), achieved
against the prediction and the same counted from the first request sent (`w/ fill`: it also holds one pipeline
latency), the client's p50/p99, the p99 target at 80% ((stages + 2) x bottleneck + 5 ms), `compute ms` (the sum
over the stages of dnnpipe_stage_seconds sampled during the row; paced time for the agents), errors (any non-200),
re-plans (serve keeps its plan unless --threshold says otherwise: this host's contention is not the cluster's),
the CPU ms per request of the server process (front door and controller), of its agents, and of this client
process (from /proc and os.times), the client's share of that CPU, how busy the whole host was (/proc/stat, every
process), and the server's own p50/p99 (dnnpipe_request_duration_seconds, interpolated inside its buckets). Below
the table, one client sending one request at a time: each latency minus the stages' compute, i.e. what HTTP, the
codec, the feed and the client add (and for agents the controller and the links between stages), and the
server's part of it (dnnpipe_request_duration_seconds, first byte to answer, minus the compute), split into
reading the request (dnnpipe_request_read_seconds: the client sending it, and the copy) and the rest.
This process freezes its heap (gc.freeze) before the first row: it holds TensorFlow and the models it built, and a
full collection under load stopped every client thread for up to 360 ms.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from dnnpipe.config import load_config  # noqa: E402
from dnnpipe.interpreter import call_seconds  # noqa: E402
from dnnpipe.service.backend import SingleDevice  # noqa: E402
from dnnpipe.testbed.cores import usable_cores  # noqa: E402
from dnnpipe.testbed.pacing import emulation_scale  # noqa: E402
from serve_setup import Served, make_served  # noqa: E402

CLIENTS = 16
LOADS = (0.5, 0.8, 1.0)
SIZES = {"tiny": 48, "efficientnetv2b0": None}


@dataclass(frozen=True)
class Started:
    """A backend's server process, its port, and what it predicts: inputs/s and the stages of its plan."""
    process: subprocess.Popen
    port: int
    predicted: float
    stages: int
    direct: float  # s per input: the backend's own time in-process (single-device) or the plan's bottleneck
    lines: list[str]


@dataclass(frozen=True)
class Backend:
    start: Callable[[Served, Path, "Knobs"], Started]  # (served, a work folder, the run's knobs) -> serving


@dataclass(frozen=True)
class Knobs:
    scale: float  # every emulated speed times this
    window: int  # serve's --window
    threshold: float  # serve's --threshold


def single_device_start(served: Served, work: Path, knobs: Knobs) -> Started:
    """The whole model in one unpaced interpreter on this host (`python -m dnnpipe service`)."""
    predicted, direct = single_device_predict(served)
    process, port, lines = start_server(["service", "--model-path", str(served.parts), "--model-name", served.name,
                                         "--http", "127.0.0.1:0", "--queue-size", "256"])
    return Started(process, port, predicted, 1, direct, lines)


def single_device_predict(served: Served, repeats: int = 50) -> tuple[float, float]:
    backend = SingleDevice(served.parts / served.name)
    row = [np.random.default_rng(0).random(spec.shape[1:]).astype("float32") for spec in backend.manifest.inputs]
    times = call_seconds(lambda: backend.infer(row), repeats, warmup=5)
    return 1 / float(np.mean(times)), float(np.median(times))


def agents_start(devices: list[int]) -> Callable[[Served, Path, Knobs], Started]:
    """`serve --http` on `local` device agents paced like the paper's cluster (--emulate-speed, one scale for
    every speed); its predicted throughput and stages are the ones serve prints for its starting plan."""

    def start(served: Served, work: Path, knobs: Knobs) -> Started:
        registry = served.registry(devices, work / "registry.json")
        process, port, lines = start_server(
            ["serve", "--device-registry", str(registry), "--model-path", str(served.parts), "--model-name",
             served.name, "--config", str(served.config), "--work-dir", str(work / "serve_work"), "--emulate-speed",
             "--emulation-scale", f"{knobs.scale:.6f}", "--http", "127.0.0.1:0", "--queue-size", "256",
             "--window", str(knobs.window), "--threshold", f"{knobs.threshold:g}"])
        wait_ready(process, port, lines)
        plan = next((m for m in map(PLAN.search, list(lines)) if m), None)
        if plan is None:
            process.kill()
            raise SystemExit("serve did not say its starting plan:\n" + "\n".join(lines))
        predicted = float(plan[2])
        return Started(process, port, predicted, plan[1].count("["), 1 / predicted, lines)

    return start


PLAN = re.compile(r"re-plan \(start\): \[(.*)\], ([0-9.]+) inf/s predicted")
SPEEDS = [1.0, 0.33, 0.21, 0.21]  # the paper's testbed (benchmarks/adaptive.py); device 1 is the fastest
BACKENDS = {"pipeline": Backend(agents_start([1, 2, 3, 4])), "fastest-alone": Backend(agents_start([1])),
            "single-device": Backend(single_device_start)}


def start_server(arguments: list[str]) -> tuple[subprocess.Popen, int, list[str]]:
    """A `python -m dnnpipe` server on a free loopback port; its stdout is read to the end on a thread (into
    the list returned) so a chatty server never blocks on a full pipe."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen([sys.executable, "-m", "dnnpipe", *arguments], stdout=subprocess.PIPE, text=True,
                               env=env, cwd=ROOT)
    assert process.stdout is not None
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip())
            if "http://127.0.0.1:" in line:
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    match = re.search(r"http://127\.0\.0\.1:(\d+)", "\n".join(lines)) if found.wait(120) else None
    if match is None:
        process.kill()
        raise SystemExit("the server did not say where it listens within 120 s:\n" + "\n".join(lines))
    return process, int(match[1]), lines


def wait_ready(process: subprocess.Popen, port: int, lines: list[str], seconds: float = 120) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the server ended before it was ready:\n" + "\n".join(lines))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"the server was not ready within {seconds:g} s:\n" + "\n".join(lines))


def offer(port: int, served: Served, rate: float, seconds: float) -> tuple[float, float, list[float], int, float]:
    """Open-loop load at `rate` for `seconds`: (achieved requests/s, the same from the first request sent,
    latencies in s, errors, median compute s). Achieved is the steady rate of answers, from the first answer to
    the last: counted from the first request sent instead, a row also holds one pipeline latency of filling
    (0.4 s of EfficientNetV2B0's four stages: 5% of an 8 s row), which is latency, not throughput."""
    import tritonclient.http as triton

    from dnnpipe.manifest import read_manifest

    spec = read_manifest(served.parts / served.name).inputs[0]
    image = np.random.default_rng(1).random((1, *spec.shape[1:])).astype("float32")
    total = max(CLIENTS, int(rate * seconds))
    lock, slots = threading.Lock(), iter(range(total))
    latencies: list[float] = []
    ends: list[float] = []
    errors = [0]
    start = time.monotonic() + 0.5

    def client() -> None:
        c = triton.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
        tensor = triton.InferInput(spec.name, list(image.shape), "FP32")
        tensor.set_data_from_numpy(image, binary_data=True)
        while True:
            with lock:
                slot = next(slots, None)
            if slot is None:
                break
            time.sleep(max(0.0, start + slot / rate - time.monotonic()))
            sent = time.monotonic()
            try:
                c.infer(served.name, [tensor])
            except Exception:  # noqa: BLE001 (counted: any failure is an error row in the table)
                with lock:
                    errors[0] += 1
                continue
            with lock:
                latencies.append(time.monotonic() - sent)
                ends.append(time.monotonic())
        c.close()

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    done = threading.Event()
    samples: list[float] = []
    sampler = threading.Thread(target=sample_stage_time, args=(port, done, samples))
    sampler.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    sampler.join()
    steady = (len(ends) - 1) / (max(ends) - min(ends)) if len(ends) > 1 else 0.0
    filled = len(ends) / (max(ends) - start) if ends else 0.0
    return steady, filled, latencies, errors[0], float(np.median(samples)) if samples else float("nan")


def front_door_cost(port: int, served: Served, count: int = 100) -> np.ndarray:
    """One client, one request at a time: per request, (its latency, the server's own time for it from the first
    byte to the answer (dnnpipe_request_duration_seconds), the backend's compute per input (the sum of
    dnnpipe_stage_seconds over the stages), the first byte to the last (dnnpipe_request_read_seconds: the
    client sending the body, and its copy)), in s, one row per request. Latency minus compute is what HTTP, the
    codec, the feed and the client add (for the agents also the controller and the links between stages);
    server minus compute is the server's part of it."""
    import tritonclient.http as triton

    from dnnpipe.manifest import read_manifest

    spec = read_manifest(served.parts / served.name).inputs[0]
    image = np.random.default_rng(2).random((1, *spec.shape[1:])).astype("float32")
    c = triton.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
    tensor = triton.InferInput(spec.name, list(image.shape), "FP32")
    tensor.set_data_from_numpy(image, binary_data=True)
    rows = []
    for _ in range(count):
        before = sum(metric(port, "dnnpipe_request_duration_seconds_sum"))
        read_before = sum(metric(port, "dnnpipe_request_read_seconds_sum"))
        sent = time.perf_counter()
        c.infer(served.name, [tensor])
        latency = time.perf_counter() - sent
        server = sum(metric(port, "dnnpipe_request_duration_seconds_sum")) - before
        read = sum(metric(port, "dnnpipe_request_read_seconds_sum")) - read_before
        rows.append((latency, server, sum(metric(port, "dnnpipe_stage_seconds{")), read))
    c.close()
    return np.array(rows)


def cpu_seconds(root: int) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by process `root` itself and by all its descendants (the
    agents and their roles), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry.name)] = int(fields[1])
        used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    below = {root}
    for _ in range(4):  # serve -> agent -> role: a few levels
        below |= {pid for pid, ppid in parent.items() if ppid in below}
    return used.get(root, 0.0), sum(used.get(pid, 0.0) for pid in below - {root})


def host_busy() -> tuple[float, float]:
    """(busy, total) jiffies of every core of this host so far, all processes (ours and anyone's), /proc/stat."""
    fields = [float(f) for f in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def metric(port: int, prefix: str) -> list[float]:
    """Every sample of the service's metric whose line starts with `prefix`."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)]


def histogram(port: int, name: str) -> dict[float, float]:
    """A histogram's cumulative counts by upper bound (le), +Inf included."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.findall(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.MULTILINE)
    return {float(le): float(count) for le, count in found}


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The q-quantile of the requests counted between two readings of a histogram, interpolated linearly
    inside its bucket (as Prometheus's histogram_quantile); NaN when none."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return float("nan")
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def sample_stage_time(port: int, done: threading.Event, samples: list[float]) -> None:
    """The backend's compute time per input as it runs under this load: the sum of dnnpipe_stage_seconds over
    the stages, every 0.2 s."""
    while not done.wait(0.2):
        stages = metric(port, "dnnpipe_stage_seconds{")
        if stages:
            samples.append(sum(stages))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--backend", nargs="+", default=["pipeline", "fastest-alone"], choices=list(BACKENDS))
    parser.add_argument("--seconds", type=float, default=8.0, help="of load per row (default 8)")
    parser.add_argument("--scale", type=float, help="emulation scale (default: the testbed's, to fit this host)")
    parser.add_argument("--window", type=int, default=32,
                        help="serve's --window: inputs in flight (default 32: 8 and 16 held the pipeline below its "
                             "prediction on a busy host)")
    parser.add_argument("--threshold", type=float, default=100.0,
                        help="serve's --threshold (default 100: the plan stays; this host's own contention is "
                             "not the cluster's)")
    args = parser.parse_args()
    print(f"{'model':<17} {'backend':<14} {'load':>5} {'stages':>6} {'ms/input':>8} {'offered/s':>9} "
          f"{'achieved/s':>10} {'of pred.':>8} {'w/ fill':>8} {'p50 ms':>7} {'p99 ms':>7} {'p99 target':>10} "
          f"{'compute ms':>10} "
          f"{'errors':>6} {'re-plans':>8} {'cpu ms/request: serve agents client':>36} {'client%':>7} {'host%':>5} "
          f"{'srv p50':>8} {'srv p99':>8}", flush=True)
    costs: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.models:
            (Path(folder) / kind).mkdir()
            print(f"{kind}: converting and profiling ...", flush=True)
            served = make_served(Path(folder) / kind, SPEEDS, kind=kind, input_size=SIZES[kind], repeats=5)
            scale = args.scale or emulation_scale(load_config(served.config), usable_cores())
            for name in args.backend:
                work = Path(folder) / kind / name
                work.mkdir()
                started = BACKENDS[name].start(served, work, Knobs(scale, args.window, args.threshold))
                try:
                    costs.append(measure(served, kind, name, started, args.seconds))
                finally:
                    started.process.send_signal(signal.SIGTERM)
                    started.process.wait(30)
            print(f"{kind}: emulated paper testbed C = {SPEEDS} x {scale:.3f}", flush=True)
    print("\n".join(costs))
    return 0


def measure(served: Served, kind: str, name: str, started: Started, seconds: float) -> str:
    """The three load rows of one backend (printed as they come) and its front-door line (returned)."""
    port, predicted = started.port, started.predicted
    gc.collect()  # TensorFlow and the model built in this process: a full collection under load stopped
    gc.freeze()  # every client thread for up to 340 ms (a client-side p99 outlier); moved out of its reach
    offer(port, served, predicted * 0.5, 1.0)  # warm-up: connections, interpreter
    added = front_door_cost(port, served)
    target = ((started.stages + 2) / predicted + 0.005) * 1e3  # p99 at 80% load: (stages + 2) x bottleneck + 5 ms
    for load in LOADS:
        server_before, agents_before = cpu_seconds(started.process.pid)
        client_before = sum(os.times()[:2])
        served_before = histogram(port, "dnnpipe_request_duration_seconds")
        host_before = host_busy()
        achieved, filled, latencies, errors, compute = offer(port, served, predicted * load, seconds)
        served_after = histogram(port, "dnnpipe_request_duration_seconds")
        busy, total = (a - b for a, b in zip(host_busy(), host_before))
        server_cpu, agents_cpu = (a - b for a, b in zip(cpu_seconds(started.process.pid),
                                                       (server_before, agents_before)))
        client_cpu = sum(os.times()[:2]) - client_before
        count = max(1, len(latencies))
        p50, p99 = (np.percentile(latencies, [50, 99]) * 1e3) if latencies else (0.0, 0.0)
        server_p50, server_p99 = (quantile(served_before, served_after, q) * 1e3 for q in (0.5, 0.99))
        share = client_cpu / max(server_cpu + agents_cpu + client_cpu, 1e-9)
        replans = sum(metric(port, "dnnpipe_replans_total{"))
        print(f"{kind:<17} {name:<14} {load:>5.0%} {started.stages:>6} {started.direct * 1e3:>8.2f} "
              f"{predicted * load:>9.1f} {achieved:>10.1f} {achieved / predicted:>8.0%} {filled / predicted:>8.0%} "
              f"{p50:>7.2f} {p99:>7.2f} "
              f"{target:>10.1f} {compute * 1e3:>10.2f} {errors:>6} {replans:>8.0f} "
              f"{server_cpu / count * 1e3:>6.2f} {agents_cpu / count * 1e3:>6.2f} {client_cpu / count * 1e3:>6.2f} "
              f"{share:>7.0%} {busy / max(total, 1e-9):>5.0%} {server_p50:>8.2f} {server_p99:>8.2f}", flush=True)
    minus = (added[:, 0] - added[:, 2]) * 1e3
    server = (added[:, 1] - added[:, 2]) * 1e3
    read, rest = added[:, 3] * 1e3, (added[:, 1] - added[:, 2] - added[:, 3]) * 1e3
    return (f"{kind} {name}: latency minus compute p50 {np.median(minus):.2f} ms, p99 {np.percentile(minus, 99):.2f} "
            f"ms; the server's part (first byte to answer, minus compute) p50 {np.median(server):.2f} ms, p99 "
            f"{np.percentile(server, 99):.2f} ms; of it reading the request (first byte to last) p50 "
            f"{np.median(read):.2f} ms, the rest (parse, queue, hand-offs, answer) p50 {np.median(rest):.2f} ms, "
            f"p99 {np.percentile(rest, 99):.2f} ms ({len(added)} sequential requests)")


if __name__ == "__main__":
    sys.exit(main())
