"""Every stage of a manifest as its own process on loopback ports: a whole pipeline on one machine."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..errors import DnnpipeError
from ..manifest import read_manifest
from .metrics import StageSummary, read_summary

GRACE_SECONDS = 2.0  # after a stage failed, how long the others get to stop on their own
POLL_SECONDS = 0.02


@dataclass(frozen=True)
class RunOptions:
    """The options every stage of one run shares; run-local passes them to each stage process."""

    num_inputs: Optional[int] = None
    fps: Optional[float] = None
    num_threads: Optional[int] = None
    delegate: Optional[str] = None
    timeout: float = 60.0
    connect_timeout: float = 60.0
    queue_size: int = 4
    key_file: Optional[Path] = None
    insecure: bool = False

    def argv(self) -> list[str]:
        flags = []
        for f in fields(self):
            value, flag = getattr(self, f.name), f"--{f.name.replace('_', '-')}"
            if isinstance(value, bool):
                flags += [flag] if value else []
            elif value is not None:
                flags.append(f"{flag}={value}")
        return flags


@dataclass
class PipelineRun:
    stages: list[StageSummary]
    speeds: list[Optional[float]]
    devices: list[int]
    log_dir: Path

    @property
    def throughput(self) -> float:
        return self.stages[-1].throughput

    def describe(self) -> str:
        rows = [f"{'stage':>5} {'device':>6} {'speed':>6} {'frames':>6} {'infer p50 ms':>12} {'stage p50 ms':>12} "
                f"{'busy':>5} {'inf/s':>7}"]
        for s, c, d in zip(self.stages, self.speeds, self.devices):
            rows.append(f"{s.stage:>5} {d:>6} {'' if c is None else f'{c:g}':>6} {s.frames:>6} "
                        f"{s.inference_p50_ms:>12.2f} {s.stage_time_p50_ms:>12.2f} {s.busy_fraction:>5.0%} "
                        f"{s.throughput:>7.1f}")
        last = self.stages[-1]
        rows.append(f"pipeline: {last.frames} results, {last.throughput:.1f} inferences/s, end-to-end latency "
                    f"p50 {last.latency_p50_ms:.1f} ms p95 {last.latency_p95_ms:.1f} ms (logs: {self.log_dir})")
        return "\n".join(rows)


def free_ports(count: int) -> list[int]:
    """Ports the kernel reports free on 127.0.0.1 (held open together so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def stage_commands(folder: Path, stages: int, data_path: Path, output_path: Optional[Path], log_dir: Path,
                   speeds: Sequence[Optional[float]], run: RunOptions) -> list[list[str]]:
    ports = free_ports(stages - 1)
    commands = []
    for k in range(1, stages + 1):
        command = [sys.executable, "-m", "dnnpipe", "stage", "--stage", str(k), "--model-path", str(folder.parent),
                   "--model-name", folder.name, "--log-dir", str(log_dir), *run.argv()]
        if k > 1:
            command += ["--bind-addr", "127.0.0.1", "--bind-port", str(ports[k - 2])]
        if k < stages:
            command += ["--next-host", "127.0.0.1", "--next-port", str(ports[k - 1])]
        if k == 1:
            command += ["--data-path", str(data_path)]
        if k == stages and output_path is not None:
            command += ["--output-path", str(output_path)]
        if speeds[k - 1] is not None:
            command += ["--emulate-speed", str(speeds[k - 1])]
        commands.append(command)
    return commands


def run_local(folder: Path, data_path: Path, output_path: Optional[Path], log_dir: Path,
              speeds_by_device: Optional[Sequence[float]] = None, run: RunOptions = RunOptions(),
              echo: Callable[[str], None] = print) -> PipelineRun:
    """Start the stages last first (each listener is up before its upstream connects) and wait for all.

    Whatever happens (a stage fails, this process is interrupted), no stage process outlives the call.
    """
    manifest = read_manifest(folder)
    devices = [s.device for s in manifest.stages]
    if speeds_by_device is not None and max(devices) > len(speeds_by_device):
        raise DnnpipeError(f"{folder}: the manifest places a stage on device {max(devices)} but the config has "
                           f"{len(speeds_by_device)} devices (re-partition after re-planning)")
    speeds = [speeds_by_device[d - 1] if speeds_by_device else None for d in devices]
    if not data_path.is_file():
        raise DnnpipeError(f"{data_path}: input data file not found")
    log_dir.mkdir(parents=True, exist_ok=True)
    commands = stage_commands(folder, len(devices), data_path, output_path, log_dir, speeds, run)
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
    return PipelineRun([read_summary(log_dir, k) for k in range(1, len(devices) + 1)], speeds, devices, log_dir)


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
