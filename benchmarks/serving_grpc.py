"""REST against gRPC in front of the same service: what each front door adds to a request.

    .venv/bin/python benchmarks/serving_grpc.py [--models tiny efficientnetv2b0] [--count 300] [--seconds 6]

One `python -m dnnpipe service --http 127.0.0.1:0 --grpc 127.0.0.1:0` process (the whole model in one unpaced
interpreter) serves both front doors over the one Service (one queue, one pipeline). Per model and front door:
one client sending one request at a time (tritonclient.http with binary tensors, tritonclient.grpc with raw
contents; batch 1): its p50/p99 latency, the same minus the interpreter's compute for that request
(dnnpipe_stage_seconds), i.e. what the protocol, the codec, the feed and the client add; then 16 client threads
closed-loop for `--seconds`: requests/s and p50/p99. The two front doors take turns, so each row has the host
to itself (other engineers' runs aside: this host is shared).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from dnnpipe.manifest import read_manifest  # noqa: E402
from serve_setup import Served, make_served  # noqa: E402

SIZES = {"tiny": 48, "efficientnetv2b0": None}
CLIENTS = 16


def start(served: Served) -> tuple[subprocess.Popen, int, int]:
    """The service process and its REST and gRPC ports, as it prints them."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen([sys.executable, "-m", "dnnpipe", "service", "--model-path", str(served.parts),
                                "--model-name", served.name, "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0",
                                "--queue-size", "256"], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert process.stdout is not None
    text = process.stdout.readline() + process.stdout.readline()
    http, grpc = re.search(r"http://127\.0\.0\.1:(\d+)", text), re.search(r"gRPC on 127\.0\.0\.1:(\d+)", text)
    if http is None or grpc is None:
        process.kill()
        raise SystemExit(f"the service did not say where it listens:\n{text}")
    return process, int(http[1]), int(grpc[1])


def stage_seconds(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("dnnpipe_stage_seconds{"))


def senders(served: Served, http_port: int, grpc_port: int) -> dict[str, Callable[[], Callable[[], Any]]]:
    """Per front door: a factory of one client's `send()` (each thread makes its own client)."""
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    spec = read_manifest(served.parts / served.name).inputs[0]
    image = np.random.default_rng(2).random((1, *spec.shape[1:])).astype("float32")

    def rest() -> Callable[[], Any]:
        client = thttp.InferenceServerClient(f"127.0.0.1:{http_port}", network_timeout=60)
        tensor = thttp.InferInput(spec.name, list(image.shape), "FP32")
        tensor.set_data_from_numpy(image, binary_data=True)
        return lambda: client.infer(served.name, [tensor])

    def grpc() -> Callable[[], Any]:
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        tensor = tgrpc.InferInput(spec.name, list(image.shape), "FP32")
        tensor.set_data_from_numpy(image)
        return lambda: client.infer(served.name, [tensor], client_timeout=60)

    return {"REST": rest, "gRPC": grpc}


def one_at_a_time(send: Callable[[], Any], http_port: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Latencies and latency minus that request's compute, s."""
    latencies, overheads = [], []
    for _ in range(10):
        send()
    for _ in range(count):
        sent = time.perf_counter()
        send()
        latency = time.perf_counter() - sent
        latencies.append(latency)
        overheads.append(latency - stage_seconds(http_port))
    return np.array(latencies), np.array(overheads)


def closed_loop(make: Callable[[], Callable[[], Any]], seconds: float) -> tuple[float, np.ndarray]:
    """16 threads, each sending as soon as it has its answer: requests/s and the latencies."""
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    def work() -> None:
        send = make()
        while time.monotonic() < stop:
            sent = time.perf_counter()
            send()
            latencies.append(time.perf_counter() - sent)

    threads = [threading.Thread(target=work) for _ in range(CLIENTS)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    return len(latencies) / (time.perf_counter() - began), np.array(latencies)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(SIZES), default=["tiny"])
    parser.add_argument("--count", type=int, default=300, help="sequential requests per front door")
    parser.add_argument("--seconds", type=float, default=6.0, help="closed-loop time per front door, s")
    args = parser.parse_args()
    print("| model | front door | p50 ms | p99 ms | p50 minus compute ms | 16 threads req/s | p50 ms | p99 ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as work:
        for kind in args.models:
            (Path(work) / kind).mkdir()
            served = make_served(Path(work) / kind, [1.0], kind=kind, input_size=SIZES[kind])
            process, http_port, grpc_port = start(served)
            try:
                for door, make in senders(served, http_port, grpc_port).items():
                    latencies, overheads = one_at_a_time(make(), http_port, args.count)
                    rate, loaded = closed_loop(make, args.seconds)
                    print(f"| {kind} | {door} | {np.median(latencies) * 1e3:.2f} | "
                          f"{np.percentile(latencies, 99) * 1e3:.2f} | {np.median(overheads) * 1e3:.2f} | "
                          f"{rate:.1f} | {np.median(loaded) * 1e3:.1f} | {np.percentile(loaded, 99) * 1e3:.1f} |",
                          flush=True)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
