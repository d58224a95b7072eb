"""The device side of per-device profiling: times every signature of the profiling model with the lite interpreter.

Shipped with its import closure (NumPy and a lite interpreter are all it needs; no TensorFlow) and run on the
device as `python -m dnnpipe.profile.timer MODEL.tflite`. It prints a progress line now and then and, last, one
`RESULT {json}` line: the probe's, the whole model's and each unit's time in ms, each unit's as the host's
profiler computes it (the probe's fixed cost removed, the units between two legal cuts given their fused group's
time shared: costs.unit_times), and each fused group's own time.

A device's time is sustained time: invokes back to back for at least `seconds`, wall time over count. A board
limited by a CPU quota (the virtual fleet) runs one short invoke at full speed and is held back only over a
quota period, so the median of single invokes (the host's profiler) would miss the limit a pipeline stage meets
in steady state; on an unlimited CPU both agree.

A device also spends CPU on its links: a stage receives its input cut and sends its output cut (inside TLS by
default), and on a board of one core or less that CPU comes out of the same budget as the stage's compute. With
`--link-folder` (holding a pipeline.crt pair, or none: plain TCP) the timer also measures that: frames pushed
through a loopback link within the device, each end's CPU time counted, scaled by how much slower the device ran
them than that CPU time (its quota), as device ms per MB sent and received. A stage also spends CPU on every
frame whatever its size (the frame's header, the hand-offs between its three threads, waking on its sockets, the
bookkeeping): the timer runs the runtime's own StageLoop between a feeder and a drain on loopback links with a
tensor of a few bytes and measures that too, as device ms per frame (`frame_costs`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..frameio import FrameReader, FrameWriter
from ..interpreter import load_interpreter, prepared_invoke
from ..manifest import StageSpec, TensorSpec
from ..pipeline_key import CERT_FILE, CERT_KEY_FILE, tls_context
from ..protocol import Kind
from ..runtime.priority import run_as_batch_work
from .costs import unit_times

RESULT = "RESULT "


def inputs_for(details: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Values for a signature's inputs (batch 1, random floats, zero integers): timing needs data, not meaning."""
    feed = {}
    for key, detail in details.items():
        shape, dtype = [max(1, int(x)) for x in detail["shape"]], np.dtype(detail["dtype"])
        feed[key] = rng.random(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
    return feed


def sustained_ms(runner, feed: dict[str, np.ndarray], repeats: int, warmup: int, seconds: float,
                 cpu: Optional[list[float]] = None) -> float:
    """Mean ms per invoke over at least `repeats` invokes and `seconds` of wall time, inputs set once (and, into
    `cpu`, the mean CPU ms of this thread per invoke: wall over CPU is how much the device's quota slows it)."""
    invoke = prepared_invoke(runner, feed, warmup)
    count, began, began_cpu = 0, time.perf_counter(), time.thread_time()
    while count < repeats or time.perf_counter() - began < seconds:
        invoke()
        count += 1
    if cpu is not None:
        cpu.append((time.thread_time() - began_cpu) / count * 1000)
    return (time.perf_counter() - began) / count * 1000


def time_units(model: str, repeats: int, warmup: int, num_threads: Optional[int],
               seconds: float = 0.25) -> dict[str, Any]:
    interpreter = load_interpreter(Path(model), num_threads, every_signature_delegated=True)
    names = interpreter.get_signature_list()
    units = sorted((n for n in names if n.startswith("unit_")), key=lambda n: int(n.split("_")[1]))
    groups = [tuple(int(x) for x in n.split("_")[1:]) for n in names if n.startswith("units_")]
    rng = np.random.default_rng(0)

    def timed(name: str, cpu: Optional[list[float]] = None) -> float:
        runner = interpreter.get_signature_runner(name)
        return sustained_ms(runner, inputs_for(runner.get_input_details(), rng), repeats, warmup, seconds, cpu)

    whole_cpu: list[float] = []
    probe, whole = timed("probe"), timed("whole", whole_cpu)
    alone = []
    for k, name in enumerate(units, 1):
        alone.append(timed(name))
        if k % 10 == 0 or k == len(units):
            print(f"timed {k}/{len(units)} units", flush=True)
    together = {(first - 1, last): timed(f"units_{first}_{last}") for first, last in groups}
    return {"probe_ms": probe, "whole_ms": whole, "whole_cpu_ms": whole_cpu[0],
            "units_ms": unit_times(probe, alone, together),
            "groups_ms": {f"{first}_{last}": together[first - 1, last] for first, last in groups}}


LINK_FRAME = 512 * 1024  # bytes per frame: a cut of the size the fleet's models send
LINK_DEADLINE = 60.0  # every socket operation of the link measurement


def link_costs(folder: Optional[Path], seconds: float, slowdown: float) -> dict[str, Any]:
    """Device ms per MB to send and to receive a cut, TLS when `folder` holds the pipeline certificate, with the
    stage's copy of the cut into its interpreter (received) or out of it (sent): each end's thread CPU time per MB
    times `slowdown`, the device's wall over CPU time for the whole model (its
    quota's hold-back; 1 on an unlimited CPU). The frames go through the runtime's own FrameWriter and
    FrameReader on non-blocking sockets, as a stage sends and receives them. Wall time of the loop itself would
    count the ends waiting for each other on loopback, which a stage does not pay."""
    tls = folder is not None and (folder / CERT_FILE).is_file()
    if tls:
        assert folder is not None
        os.chmod(folder / CERT_KEY_FILE, 0o600)  # shipped files may come with the upload's mode
    specs = [TensorSpec("cut", "cut", (LINK_FRAME // 4,), "float32")]
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(LINK_DEADLINE)
    cpu: dict[str, float] = {}
    moved: dict[str, int] = {}
    errors: list[BaseException] = []

    def wrap(sock: socket.socket, server_side: bool) -> socket.socket:
        sock.settimeout(LINK_DEADLINE)
        if tls:
            assert folder is not None
            sock = tls_context(folder, server_side).wrap_socket(sock, server_side=server_side)
        sock.setblocking(False)
        return sock

    def receive() -> None:
        try:
            conn, _ = listener.accept()
            with wrap(conn, True) as link:
                reader, buffers = FrameReader(link, specs, "sender", LINK_DEADLINE), [np.empty(LINK_FRAME // 4,
                                                                                               np.float32)]
                interpreter_input = np.empty(LINK_FRAME // 4, np.float32)
                total, began = 0, time.thread_time()
                while reader.read(buffers).kind == Kind.DATA:
                    np.copyto(interpreter_input, buffers[0])  # a stage then sets the cut as its interpreter's input
                    total += LINK_FRAME
                cpu["receive"], moved["receive"] = time.thread_time() - began, total
        except (OSError, ssl.SSLError, ValueError) as e:
            errors.append(e)

    def send() -> None:
        try:
            with wrap(socket.create_connection(listener.getsockname(), LINK_DEADLINE), False) as link:
                writer, tensors = FrameWriter(link, specs, "receiver", LINK_DEADLINE), [np.ones(LINK_FRAME // 4,
                                                                                                np.float32)]
                interpreter_output = np.ones(LINK_FRAME // 4, np.float32)
                total, began_cpu, began = 0, time.thread_time(), time.perf_counter()
                while time.perf_counter() - began < seconds:
                    np.copyto(tensors[0], interpreter_output)  # a stage copies its output cut out of the interpreter
                    writer.send(total // LINK_FRAME, 0, tensors)
                    total += LINK_FRAME
                cpu["send"], moved["send"] = time.thread_time() - began_cpu, total
                writer.end(total // LINK_FRAME)
        except (OSError, ssl.SSLError, ValueError) as e:
            errors.append(e)

    threads = [threading.Thread(target=receive), threading.Thread(target=send)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    listener.close()
    if errors or moved.get("receive") != moved.get("send"):
        raise OSError(f"the link measurement failed ({errors[0] if errors else 'frames lost'})")
    megabytes = moved["send"] / 1e6
    return {"tls": tls, "megabytes": round(megabytes, 3), "slowdown": round(slowdown, 4),
            "send_ms_per_mb": cpu["send"] * 1000 * slowdown / megabytes,
            "receive_ms_per_mb": cpu["receive"] * 1000 * slowdown / megabytes}


FRAME_RATE = 100.0  # frames a second offered to the measured stage loop: it waits for each, as a pipeline stage does
FRAME_SECONDS = 1.5  # how long the feeder offers frames


def frame_costs(folder: Optional[Path], slowdown: float, seconds: float = FRAME_SECONDS,
                rate: float = FRAME_RATE) -> dict[str, Any]:
    """A stage's own CPU per frame beyond its inference and its cuts' bytes, in device ms: the runtime's StageLoop
    (its receive, execute and send threads, queues and buffer pools; a copy for an inference) fed frames of one
    64-byte tensor at `rate` over a loopback link and sending them on over another (TLS when `folder` holds the
    pipeline certificate), its process CPU time per frame less the feeder's and the drain's own, times `slowdown`
    (the device's wall over CPU time: its quota's hold-back)."""
    from ..runtime.stage import StageLoop
    from ..runtime.transport import Downstream, Upstream

    tls = folder is not None and (folder / CERT_FILE).is_file()
    specs = (TensorSpec("frame", "frame", (1, 16), "float32"),)
    frames = max(10, int(seconds * rate))
    go, cpu, errors = threading.Event(), {"feeder": 0.0, "drain": 0.0}, []
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    for listener in listeners:
        listener.settimeout(LINK_DEADLINE)

    def wrap(sock: socket.socket, server_side: bool) -> socket.socket:
        sock.settimeout(LINK_DEADLINE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            assert folder is not None
            sock = tls_context(folder, server_side).wrap_socket(sock, server_side=server_side)
        return sock

    def feeder() -> None:
        try:
            with wrap(socket.create_connection(listeners[0].getsockname(), LINK_DEADLINE), False) as link:
                writer, tensors = FrameWriter(link, specs, "the stage", LINK_DEADLINE), [np.ones((1, 16), np.float32)]
                if not go.wait(LINK_DEADLINE):
                    return
                began, start = time.thread_time(), time.perf_counter()
                for k in range(frames):
                    time.sleep(max(0.0, start + k / rate - time.perf_counter()))
                    writer.send(k, 0, tensors)
                writer.end(frames)
                cpu["feeder"] = time.thread_time() - began
                time.sleep(0.2)  # the stage reads END before this end closes
        except (OSError, ValueError) as e:
            errors.append(e)

    def drain() -> None:
        try:
            conn, _ = listeners[1].accept()
            with wrap(conn, True) as link:
                reader, buffers = FrameReader(link, specs, "the stage", LINK_DEADLINE), [np.empty((1, 16), np.float32)]
                began = time.thread_time()
                while reader.read(buffers).kind == Kind.DATA:
                    pass
                cpu["drain"] = time.thread_time() - began
        except (OSError, ValueError) as e:
            errors.append(e)

    threads = [threading.Thread(target=feeder, daemon=True), threading.Thread(target=drain, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        conn, _ = listeners[0].accept()
        upstream = Upstream(wrap(conn, True), "the feeder", specs, LINK_DEADLINE)
        downstream = Downstream(wrap(socket.create_connection(listeners[1].getsockname(), LINK_DEADLINE), False),
                                "the drain", specs, LINK_DEADLINE)
        spec = StageSpec(1, 1, (1, 1), "", "", specs, specs)
        loop = StageLoop("[frame cost]", spec, lambda arrays: arrays, 1, say=lambda line: None)
        loop.upstream, loop.downstream = upstream, downstream
        go.set()
        gc.collect()
        gc.freeze()  # as a stage process does before its loop (runtime.stage.Stage.run)
        try:
            loop.run(loop.receive, loop.send)
        finally:
            gc.unfreeze()  # a caller's heap (a test's, in-process) is its own again
        for thread in threads:
            thread.join(LINK_DEADLINE)
        upstream.close()
        downstream.close()
    finally:
        go.set()
        for listener in listeners:
            listener.close()
    if errors or loop.error or len(loop.timings) != frames:
        raise OSError(f"the frame cost measurement failed ({errors[0] if errors else loop.error or 'frames lost'})")
    cpu_ms = (loop.cpu_seconds - cpu["feeder"] - cpu["drain"]) * 1000 / frames
    return {"tls": tls, "frames": frames, "cpu_ms": round(cpu_ms, 4), "frame_ms": cpu_ms * slowdown}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dnnpipe.profile.timer", description=__doc__)
    parser.add_argument("model", help="the profiling model (.tflite with whole, probe and unit_K signatures)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=0.25, help="at least this long per signature")
    parser.add_argument("--link-folder", type=Path,
                        help="also measure the CPU of sending and receiving cuts (TLS with this folder's "
                             "pipeline.crt pair; plain TCP without one)")
    args = parser.parse_args(argv)
    run_as_batch_work()  # timed as a stage will run (runtime.priority)
    try:
        result = time_units(args.model, args.repeats, args.warmup, args.num_threads, args.seconds)
        if args.link_folder is not None:
            slowdown = max(1.0, result["whole_ms"] / max(1e-9, result["whole_cpu_ms"]))
            result["link"] = link_costs(args.link_folder, max(0.2, 4 * args.seconds), slowdown)
            result["link"]["frame_ms"] = frame_costs(args.link_folder, slowdown)["frame_ms"]
    except Exception as e:  # noqa: BLE001 - the host gets one line, whatever the interpreter raised
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", flush=True)
        return 1
    print(RESULT + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
