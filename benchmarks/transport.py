"""Transport cost per frame: the protocol against a bare socket moving the same bytes (issue 19).

    .venv/bin/python benchmarks/transport.py                 # frame table, then the 2-stage pipeline
    .venv/bin/python benchmarks/transport.py --no-pipeline   # frame table only (no TensorFlow)

Frame table: a sender process streams frames of one float32 tensor over loopback TCP to this process,
which times every frame after the first; best of --repeats runs, the columns interleaved. "bare" is a
sendall / recv_into loop of the payload alone; "FrameWriter" sends with descriptors encoded once
per connection (the one way to send frames); "HMAC FrameWriter" adds an HMAC-SHA256 per frame (the
sender sends a 32-byte tag over the payload as a second tensor of each frame, the receiver recomputes and
compares it: what integrity
without TLS would cost, emulated here, not a protocol mode); "TLS FrameWriter" is FrameWriter inside
mutual TLS 1.3 (the stage links' default: both ends pin one EC P-256 certificate made for the run).
Every protocol column receives with FrameReader, which checks every field of every frame; "TLS extra us"
and "HMAC extra us" are what each adds to FrameWriter per frame (wall clock), and "CPU ms/MB" what each
adds in CPU time of both ends per MiB.
CPU us/frame is sender plus receiver CPU time per frame (best run): other processes sharing the cores
stretch the wall-clock columns but hardly this one.

Pipeline: a tiny Keras model (a 1x1 convolution that widens the input to a ~100 KB cut, then global
pooling) converted into 2 stages and run with `python -m dnnpipe run-local`, so transport, not
inference, dominates; reported against the bare-socket bound for frames of the cut's size, with TLS (the
default) and with --no-tls.
"""

from __future__ import annotations

import argparse
import hmac
import multiprocessing
import socket
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnnpipe.manifest import TensorSpec  # noqa: E402
from dnnpipe.keygen import create_certificate  # noqa: E402
from dnnpipe.pipeline_key import tls_context  # noqa: E402
from dnnpipe.frameio import FrameReader, FrameWriter  # noqa: E402
from dnnpipe.runtime.handshake import tls_wrap  # noqa: E402

METHODS = ("bare", "FrameWriter", "HMAC FrameWriter", "TLS FrameWriter")
MAC_KEY = b"k" * 32
MAC_SPEC = TensorSpec("mac", "mac", (32,), "uint8")  # the HMAC column's tag, a second tensor of each frame
SIZES = (1 << 20, 100 << 10, 10 << 10, 1 << 10)
RUN_BYTES = 200 << 20  # bytes per timed run, at least MIN_FRAMES and at most MAX_FRAMES frames
MIN_FRAMES, MAX_FRAMES = 200, 20000


def spec_of(nbytes: int) -> TensorSpec:
    return TensorSpec("cut", "cut", (1, nbytes // 4), "float32")


def send(port: int, method: str, nbytes: int, frames: int, cpu: Connection, certs: Path) -> None:
    """The sender process: `frames` frames as fast as the receiver takes them; reports its CPU seconds."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if method.startswith("TLS"):
        sock = tls_wrap(sock, tls_context(certs, server_side=False), False)
    spec = spec_of(nbytes)
    tensor = np.ones(spec.shape, spec.dtype)
    started = time.process_time()
    if method == "bare":
        view = tensor.data.cast("B")
        for _ in range(frames):
            sock.sendall(view)
    elif method.startswith("HMAC"):
        writer, payload = FrameWriter(sock, [spec, MAC_SPEC], "the receiver", 60.0), tensor.data.cast("B")
        tag = np.empty(MAC_SPEC.shape, MAC_SPEC.dtype)
        for sequence in range(frames):
            tag[:] = np.frombuffer(hmac.digest(MAC_KEY, payload, "sha256"), np.uint8)
            writer.send(sequence, 0, [tensor, tag])
    else:
        writer = FrameWriter(sock, [spec], "the receiver", 60.0)
        for sequence in range(frames):
            writer.send(sequence, 0, [tensor])
    cpu.send(time.process_time() - started)
    sock.close()


def bare_receiver(sock: socket.socket, spec: TensorSpec) -> Callable[[], None]:
    view = np.empty(spec.shape, spec.dtype).data.cast("B")

    def receive() -> None:
        got = 0
        while got < len(view):
            n = sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError("sender closed early")
            got += n

    return receive


def seconds_per_frame(method: str, nbytes: int, frames: int, certs: Path) -> tuple[float, float]:
    """One run on a fresh connection: wall seconds per frame (the first frame untimed) and CPU seconds per
    frame of sender and receiver together (not distorted by other processes sharing the cores)."""
    spec = spec_of(nbytes)
    context = multiprocessing.get_context("fork")
    cpu, child_cpu = context.Pipe(duplex=False)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = context.Process(target=send, args=(listener.getsockname()[1], method, nbytes, frames, child_cpu,
                                                    certs))
        sender.start()
        sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if method.startswith("TLS"):
        sock = tls_wrap(sock, tls_context(certs, server_side=True), True)
    receive: Callable[[], None]
    if method == "bare":
        receive = bare_receiver(sock, spec)
    elif method.startswith("HMAC"):
        mac_reader = FrameReader(sock, [spec, MAC_SPEC], "the sender", 60.0)
        pair = [np.empty(spec.shape, spec.dtype), np.empty(MAC_SPEC.shape, MAC_SPEC.dtype)]

        def receive() -> None:
            mac_reader.read(pair)
            if not hmac.compare_digest(pair[1].tobytes(), hmac.digest(MAC_KEY, pair[0].data.cast("B"), "sha256")):
                raise ConnectionError("HMAC mismatch")
    else:
        reader, buffers = FrameReader(sock, [spec], "the sender", 60.0), [np.empty(spec.shape, spec.dtype)]

        def receive() -> None:
            reader.read(buffers)
    started_cpu = time.process_time()
    receive()
    started = time.perf_counter()
    for _ in range(frames - 1):
        receive()
    elapsed = time.perf_counter() - started
    receiver_cpu = time.process_time() - started_cpu
    sender_cpu = cpu.recv()
    sender.join()
    sock.close()
    return elapsed / (frames - 1), (sender_cpu + receiver_cpu) / frames


def frame_table(repeats: int, certs: Path) -> dict[int, float]:
    """Prints the table; returns the bare socket's seconds per frame by size."""
    print(f"{'frame':>8} | " + " | ".join(f"{m:>22}" for m in METHODS) + " | writer/bare | "
          "writer extra us | HMAC extra us | TLS extra us | CPU ms/MB HMAC / TLS | CPU us/frame: "
          + " / ".join(METHODS))
    bare: dict[int, float] = {}
    for nbytes in SIZES:
        frames = max(MIN_FRAMES, min(MAX_FRAMES, RUN_BYTES // nbytes))
        runs: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
        for _ in range(repeats):  # interleaved, so load from other processes falls on every column alike
            for m in METHODS:
                runs[m].append(seconds_per_frame(m, nbytes, frames, certs))
        best = {m: min(wall for wall, _ in times) for m, times in runs.items()}
        cpu = {m: min(cpu for _, cpu in times) for m, times in runs.items()}
        bare[nbytes] = best["bare"]
        cells = [f"{nbytes / t / 1e9:5.2f} GB/s {t * 1e6:7.1f} us" for t in best.values()]
        print(f"{size_name(nbytes):>8} | " + " | ".join(f"{c:>22}" for c in cells)
              + f" | {best['bare'] / best['FrameWriter']:>11.2f} | "
              f"{(best['FrameWriter'] - best['bare']) * 1e6:>15.1f} | "
              f"{(best['HMAC FrameWriter'] - best['FrameWriter']) * 1e6:>13.1f} | "
              f"{(best['TLS FrameWriter'] - best['FrameWriter']) * 1e6:>12.1f} | "
              f"{per_mb(cpu['HMAC FrameWriter'] - cpu['FrameWriter'], nbytes):>9.2f} / "
              f"{per_mb(cpu['TLS FrameWriter'] - cpu['FrameWriter'], nbytes):.2f} | "
              + " / ".join(f"{cpu[m] * 1e6:.1f}" for m in METHODS), flush=True)
    return bare


def per_mb(seconds: float, nbytes: int) -> float:
    """Seconds per frame of nbytes as milliseconds per MiB."""
    return seconds * 1e3 / (nbytes / (1 << 20))


def size_name(nbytes: int) -> str:
    return f"{nbytes >> 20} MB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KB"


def pipeline(bare: dict[int, float], inputs: int, repeats: int) -> None:
    """Two cheap stages joined by a ~100 KB cut, run as processes by run-local."""
    import h5py

    from dnnpipe.partition.partitioner import partition_keras_model
    from dnnpipe.runtime.stage import RunOptions
    from dnnpipe.testbed.local import run_local
    from dnnpipe.runtime.metrics import read_timings
    from dnnpipe.tfenv import import_tensorflow

    _, keras = import_tensorflow()
    keras.utils.set_random_seed(0)
    x = keras.Input((40, 40, 3), name="image")
    wide = keras.layers.Conv2D(16, 1, name="widen")(x)
    model = keras.Model(x, keras.layers.GlobalAveragePooling2D(name="pool")(wide))
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "wide"
        manifest, _ = partition_keras_model(model, [[1, 1, 1], [2, 2, 2]], folder, "wide", "benchmark",
                                            verify_chain=False)
        cut = sum(t.nbytes for t in manifest.stages[0].outputs)  # 40 x 40 x 16 float32: 100 KB
        with h5py.File(Path(root) / "data.h5", "w") as f:
            f["images"] = np.random.default_rng(0).random((64, 40, 40, 3)).astype("float32")
        runs: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
        for i in range(repeats):
            for tls in (True, False):  # interleaved
                run = run_local(folder, Path(root) / "data.h5", None, Path(root) / f"logs{i}{tls}",
                                run=RunOptions(num_inputs=inputs, tls=tls))
                send = np.median([t.send_ms for t in read_timings(run.log_dir, 1)]) * 1000
                receive = np.median([t.receive_ms for t in read_timings(run.log_dir, 2)]) * 1000
                runs[tls].append((run.throughput, send, receive))
    bound = 1 / bare[cut]
    for tls in (True, False):
        throughput, send, receive = max(runs[tls])
        print(f"\n2-stage pipeline {'(TLS, the default)' if tls else '(--no-tls)'} (run-local, {inputs} inputs, "
              f"cut {size_name(cut)}, best of {repeats}): {throughput:,.0f} frames/s; bare-socket bound "
              f"{bound:,.0f} frames/s ({throughput / bound:.2f} of it); p50 per frame: stage 1 sending {send:.0f} us, "
              f"stage 2 receiving {receive:.0f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="runs per cell, best kept (default 7)")
    parser.add_argument("--inputs", type=int, default=5000, help="pipeline inputs per run (default 5000)")
    parser.add_argument("--no-pipeline", action="store_true", help="frame table only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as certs:
        create_certificate(Path(certs))
        bare = frame_table(args.repeats, Path(certs))
    if not args.no_pipeline:
        pipeline(bare, args.inputs, min(args.repeats, 3))


if __name__ == "__main__":
    main()
