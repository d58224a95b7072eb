"""Every stage of a manifest as its own process: a whole pipeline on one machine.

Where the stages run and how they reach each other is a Network: loopback ports here, or
dnnpipe.testbed's namespaces (one per emulated device, with shaped links).
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence

from ..errors import DnnpipeError
from ..manifest import read_manifest
from ..pipeline_key import tls_context
from ..runtime.argv import runtime_argv
from ..runtime.metrics import StageSummary, read_summary
from ..runtime.stage import RunOptions

GRACE_SECONDS = 2.0  # after a stage failed, how long the others get to stop on their own
POLL_SECONDS = 0.02


class Network(Protocol):
    """Where each device's stage runs and how the previous stage reaches it."""

    kind: str

    def address(self, device: int) -> str: ...
    def port(self, stage: int) -> int: ...
    def command(self, device: int, argv: Sequence[str]) -> list[str]: ...


class Loopback:
    """Every stage on this host's loopback, each listening on its own free port."""

    kind = "loopback"

    def __init__(self, stages: int):
        self.ports = free_ports(stages)

    def address(self, device: int) -> str:
        return "127.0.0.1"

    def port(self, stage: int) -> int:
        return self.ports[stage - 1]

    def command(self, device: int, argv: Sequence[str]) -> list[str]:
        return list(argv)


@dataclass
class PipelineRun:
    stages: list[StageSummary]
    pace_ms: list[Optional[float]]
    devices: list[int]
    log_dir: Path
    network: str = "loopback"

    @property
    def throughput(self) -> float:
        return self.stages[-1].throughput

    def describe(self) -> str:
        rows = [f"{'stage':>5} {'device':>6} {'paced ms':>8} {'frames':>6} {'infer p50 ms':>12} "
                f"{'stage p50 ms':>12} {'over':>5} {'busy':>5} {'inf/s':>7}"]
        for s, p, d in zip(self.stages, self.pace_ms, self.devices):
            rows.append(f"{s.stage:>5} {d:>6} {'' if p is None else f'{p:.2f}':>8} {s.frames:>6} "
                        f"{s.inference_p50_ms:>12.2f} {s.stage_time_p50_ms:>12.2f} {s.overruns:>5} "
                        f"{s.busy_fraction:>5.0%} {s.throughput:>7.1f}")
        last = self.stages[-1]
        rows.append(f"pipeline: {last.frames} results, {last.throughput:.1f} inferences/s, end-to-end latency "
                    f"p50 {last.latency_p50_ms:.1f} ms p95 {last.latency_p95_ms:.1f} ms "
                    f"({self.network}; logs: {self.log_dir})")
        overruns = sum(s.overruns for s in self.stages)
        if overruns:
            rows.append(f"not faithful: in {overruns} stage-frames the host computed slower than the emulated "
                        f"device's planned time (column 'over')")
        return "\n".join(rows)


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
PORTS_BELOW = 8192  # how far below the kernel's range for port 0 the ports are drawn


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (held open together so they are distinct), drawn below the range the kernel
    hands out for port 0: bound seconds later by a stage or an agent, none is taken meanwhile by a listener or
    client on port 0 (serve's own, a TLS client's)."""
    try:
        low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    candidates = list(range(max(1024, low - PORTS_BELOW), low))
    random.SystemRandom().shuffle(candidates)
    sockets: list[socket.socket] = []
    try:
        for port in candidates:
            if len(sockets) == count:
                break
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            sockets.append(s)
        while len(sockets) < count:  # that range is full: the kernel's choice
            sockets.append(socket.socket())
            sockets[-1].bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def stage_commands(folder: Path, devices: Sequence[int], data_path: Path, output_path: Optional[Path],
                   log_dir: Path, pace_ms: Sequence[Optional[float]], run: RunOptions,
                   network: Network) -> list[list[str]]:
    stages = len(devices)
    commands = []
    for k in range(1, stages + 1):
        command = runtime_argv([sys.executable, "-m", "dnnpipe", "stage"], [
            ("--stage", k), ("--model-path", folder.parent), ("--model-name", folder.name), ("--log-dir", log_dir),
            *run.flags(),
            ("--bind-addr", network.address(devices[k - 1]) if k > 1 else None),
            ("--bind-port", network.port(k) if k > 1 else None),
            ("--next-host", network.address(devices[k]) if k < stages else None),
            ("--next-port", network.port(k + 1) if k < stages else None),
            ("--data-path", data_path if k == 1 else None),
            ("--output-path", output_path if k == stages else None), ("--pace-ms", pace_ms[k - 1])])
        commands.append(network.command(devices[k - 1], command))
    return commands


def run_local(folder: Path, data_path: Path, output_path: Optional[Path], log_dir: Path,
              pace_ms: Optional[Sequence[Optional[float]]] = None, run: RunOptions = RunOptions(),
              network: Optional[Network] = None) -> PipelineRun:
    """Start the stages last first (each listener is up before its upstream connects) and wait for all.

    pace_ms: each stage's planned time on its emulated device (dnnpipe.testbed.pacing), or None.
    Whatever happens (a stage fails, this process is interrupted), no stage process outlives the call.
    """
    manifest = read_manifest(folder)
    devices = [s.device for s in manifest.stages]
    paces: list[Optional[float]] = list(pace_ms) if pace_ms is not None else [None] * len(devices)
    if len(paces) != len(devices):
        raise DnnpipeError(f"{folder}: {len(devices)} stages in the manifest but {len(paces)} planned stage "
                           f"times (re-partition after re-planning)")
    if not data_path.is_file():
        raise DnnpipeError(f"{data_path}: input data file not found")
    if run.tls and not run.insecure:
        tls_context(folder, server_side=True)  # a missing certificate is one line here, not one per stage
    log_dir.mkdir(parents=True, exist_ok=True)
    network = network or Loopback(len(devices))
    commands = stage_commands(folder, devices, data_path, output_path, log_dir, paces, run, network)
    processes: dict[int, subprocess.Popen] = {}
    try:
        for k in range(len(commands), 0, -1):
            with open(log_dir / f"stage_{k}.out", "w") as log:
                processes[k] = subprocess.Popen(commands[k - 1], stdout=log, stderr=subprocess.STDOUT)
        failed = _wait(processes)
    finally:
        _stop(processes)
    if failed:
        raise DnnpipeError(f"stage {failed[0]} failed: {_last_error(log_dir / f'stage_{failed[0]}.out')} "
                           f"(exit codes: {', '.join(f'{k}={processes[k].returncode}' for k in sorted(processes))}; "
                           f"logs: {log_dir})")
    return PipelineRun([read_summary(log_dir, k) for k in range(1, len(devices) + 1)], paces, devices, log_dir,
                       network.kind)


def _last_error(log: Path) -> str:
    lines = log.read_text().strip().splitlines()
    errors = [line for line in lines if "error:" in line] or lines[-1:] or ["no output"]
    return errors[-1].split("error: ", 1)[-1]


def _wait(processes: dict[int, subprocess.Popen]) -> list[int]:
    """Wait for every stage. The failed stages, the first to fail first: a broken stage exits at once, its
    neighbours only when they notice the broken link, so exit order names the cause before the symptoms."""
    failed: list[int] = []
    deadline = None
    while any(p.poll() is None for p in processes.values()):
        for k, p in sorted(processes.items()):
            if p.poll() not in (None, 0) and k not in failed:
                failed.append(k)
                deadline = deadline or time.monotonic() + GRACE_SECONDS
        if deadline is not None and time.monotonic() > deadline:
            break
        time.sleep(POLL_SECONDS)
    _stop(processes)
    failed += [k for k, p in sorted(processes.items()) if p.returncode != 0 and k not in failed]
    return failed


def _stop(processes: dict[int, subprocess.Popen]) -> None:
    """Ask every stage still running to stop, then make sure."""
    running = [p for p in processes.values() if p.poll() is None]
    for p in running:
        p.terminate()
    for p in running:
        try:
            p.wait(timeout=3)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
