"""The inference service under load: 16 tritonclient threads at 50%, 80% and 100% of the predicted throughput.

    .venv/bin/python benchmarks/serving.py [--models tiny efficientnetv2b0] [--backend single-device]
                                           [--seconds 8]

Each model is built (dnnpipe.examples, fixed seed), profiled, planned and partitioned (tests/serve_setup.py),
then served by a real `python -m dnnpipe` process on a loopback port. The load is open-loop: request i is sent
at t0 + i / rate by whichever of the 16 client threads is free (binary tensors, batch 1). The table gives the
offered and achieved requests/s, the achieved rate against the prediction, the client's p50/p99 latency, and
the errors (any non-200). `direct p50` is the backend's own time for one input called in-process before the load
(what the prediction is made of); `compute ms` is the median of the service's dnnpipe_stage_seconds sampled
during the row: the p50 minus it is what the front door, the client and the queue add under that load. Below
the table, the front door's own cost: one client, one request at a time, each request's latency minus the
backend's compute time for that same request.

A backend is the command that serves a partitioned model over --http, and its predicted throughput:
single-device runs the whole model in one interpreter (the fastest device alone; predicted = 1 / its measured
time per input). The adaptive pipeline (`serve --http`) joins here as another backend.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
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

from dnnpipe.interpreter import call_seconds  # noqa: E402
from dnnpipe.service.backend import SingleDevice  # noqa: E402
from serve_setup import Served, make_served  # noqa: E402

CLIENTS = 16
LOADS = (0.5, 0.8, 1.0)
SIZES = {"tiny": 48, "efficientnetv2b0": None}


@dataclass(frozen=True)
class Backend:
    command: Callable[[Served], list[str]]  # `python -m dnnpipe` arguments serving the model on --http 127.0.0.1:0
    predict: Callable[[Served], tuple[float, float]]  # (predicted inputs/s, direct p50 s)


def single_device_command(served: Served) -> list[str]:
    return ["service", "--model-path", str(served.parts), "--model-name", served.name, "--http", "127.0.0.1:0",
            "--queue-size", "256"]


def single_device_predict(served: Served, repeats: int = 50) -> tuple[float, float]:
    backend = SingleDevice(served.parts / served.name)
    row = [np.random.default_rng(0).random(spec.shape[1:]).astype("float32") for spec in backend.manifest.inputs]
    times = call_seconds(lambda: backend.infer(row), repeats, warmup=5)
    return 1 / float(np.mean(times)), float(np.median(times))


BACKENDS = {"single-device": Backend(single_device_command, single_device_predict)}


def start_server(arguments: list[str]) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen([sys.executable, "-m", "dnnpipe", *arguments], stdout=subprocess.PIPE, text=True,
                               env=env, cwd=ROOT)
    selector = selectors.DefaultSelector()
    assert process.stdout is not None
    selector.register(process.stdout, selectors.EVENT_READ)
    if not selector.select(120):
        process.kill()
        raise SystemExit("the service did not start within 120 s")
    match = re.search(r"http://127\.0\.0\.1:(\d+)", process.stdout.readline())
    if match is None:
        process.kill()
        raise SystemExit("the service did not say where it listens")
    return process, int(match[1])


def offer(port: int, served: Served, rate: float, seconds: float) -> tuple[float, list[float], int, float]:
    """Open-loop load at `rate` for `seconds`: (achieved requests/s, latencies in s, errors, median compute s)."""
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
    achieved = len(ends) / (max(ends) - start) if ends else 0.0
    return achieved, latencies, errors[0], float(np.median(samples)) if samples else float("nan")


def front_door_cost(port: int, served: Served, count: int = 100) -> np.ndarray:
    """One client, one request at a time: each request's latency minus the backend's compute time for that very
    request (dnnpipe_stage_seconds right after it): what HTTP, the codec, the feed and the client add, in s."""
    import urllib.request

    import tritonclient.http as triton

    from dnnpipe.manifest import read_manifest

    spec = read_manifest(served.parts / served.name).inputs[0]
    image = np.random.default_rng(2).random((1, *spec.shape[1:])).astype("float32")
    c = triton.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
    tensor = triton.InferInput(spec.name, list(image.shape), "FP32")
    tensor.set_data_from_numpy(image, binary_data=True)
    added = []
    for _ in range(count):
        sent = time.perf_counter()
        c.infer(served.name, [tensor])
        latency = time.perf_counter() - sent
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        compute = next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("dnnpipe_stage_seconds{"))
        added.append(latency - compute)
    c.close()
    return np.array(added)


def sample_stage_time(port: int, done: threading.Event, samples: list[float]) -> None:
    """The backend's compute time per input as it runs under this load: dnnpipe_stage_seconds, every 0.2 s."""
    import urllib.request

    while not done.wait(0.2):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        samples += [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("dnnpipe_stage_seconds{")][:1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--backend", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--seconds", type=float, default=8.0, help="of load per row (default 8)")
    args = parser.parse_args()
    print(f"{'model':<17} {'backend':<14} {'load':>5} {'direct p50':>10} {'offered/s':>9} {'achieved/s':>10} "
          f"{'of pred.':>8} {'p50 ms':>7} {'p99 ms':>7} {'compute ms':>10} {'errors':>6}")
    costs: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.models:
            (Path(folder) / kind).mkdir()
            served = make_served(Path(folder) / kind, [1.0], kind=kind, input_size=SIZES[kind], repeats=3)
            for name in args.backend:
                backend = BACKENDS[name]
                predicted, direct = backend.predict(served)
                process, port = start_server(backend.command(served))
                try:
                    offer(port, served, predicted * 0.5, 1.0)  # warm-up: connections, interpreter
                    added = front_door_cost(port, served)
                    costs.append(f"{kind} {name}: the front door adds p50 {np.median(added) * 1e3:.2f} ms, p99 "
                                 f"{np.percentile(added, 99) * 1e3:.2f} ms ({len(added)} sequential requests, "
                                 f"latency minus the backend's compute for the same request)")
                    for load in LOADS:
                        achieved, latencies, errors, compute = offer(port, served, predicted * load, args.seconds)
                        p50, p99 = (np.percentile(latencies, [50, 99]) * 1e3) if latencies else (0.0, 0.0)
                        print(f"{kind:<17} {name:<14} {load:>5.0%} {direct * 1e3:>8.2f}ms {predicted * load:>9.1f} "
                              f"{achieved:>10.1f} {achieved / predicted:>8.0%} {p50:>7.2f} {p99:>7.2f} "
                              f"{compute * 1e3:>10.2f} {errors:>6}", flush=True)
                finally:
                    process.send_signal(signal.SIGTERM)
                    process.wait(30)
    print("\n".join(costs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
