"""Every stage of a manifest as its own process on loopback ports: a whole pipeline on one machine."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..errors import DnnpipeError
from ..manifest import read_manifest
from .metrics import StageSummary, read_summary

GRACE_SECONDS = 10.0


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
                   speeds: Sequence[Optional[float]], extra: Sequence[str]) -> list[list[str]]:
    ports = free_ports(stages - 1)
    commands = []
    for k in range(1, stages + 1):
        command = [sys.executable, "-m", "dnnpipe", "stage", "--stage", str(k), "--model-path", str(folder.parent),
                   "--model-name", folder.name, "--log-dir", str(log_dir), *extra]
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
              speeds_by_device: Optional[Sequence[float]] = None, extra: Sequence[str] = (),
              echo=print) -> PipelineRun:
    """Start the stages last first (each listener is up before its upstream connects) and wait for all."""
    manifest = read_manifest(folder)
    devices = [s.device for s in manifest.stages]
    speeds = [speeds_by_device[d - 1] if speeds_by_device else None for d in devices]
    log_dir.mkdir(parents=True, exist_ok=True)
    commands = stage_commands(folder, len(devices), data_path, output_path, log_dir, speeds, extra)
    processes: dict[int, subprocess.Popen] = {}
    for k in range(len(commands), 0, -1):
        processes[k] = subprocess.Popen(commands[k - 1], stdout=open(log_dir / f"stage_{k}.out", "w"),
                                        stderr=subprocess.STDOUT)
    failed = _wait(processes)
    if failed:
        text = (log_dir / f"stage_{failed[0]}.out").read_text().strip().splitlines()
        errors = [line for line in text if "error:" in line] or text[-1:] or ["no output"]
        raise DnnpipeError(f"stage {failed[0]} failed: {errors[-1].split('error: ', 1)[-1]} "
                           f"(exit codes: {', '.join(f'{k}={processes[k].returncode}' for k in sorted(processes))}; "
                           f"logs: {log_dir})")
    return PipelineRun([read_summary(log_dir, k) for k in range(1, len(devices) + 1)], speeds, devices, log_dir)


def _wait(processes: dict[int, subprocess.Popen]) -> list[int]:
    """Wait for every stage; once one fails, give the rest a grace period, then stop them."""
    failed: list[int] = []
    deadline = None
    while any(p.poll() is None for p in processes.values()):
        for k, p in processes.items():
            if p.poll() not in (None, 0) and k not in failed:
                failed.append(k)
                deadline = deadline or time.monotonic() + GRACE_SECONDS
        if deadline is not None and time.monotonic() > deadline:
            for p in processes.values():
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
    failed += [k for k, p in sorted(processes.items()) if p.returncode != 0 and k not in failed]
    # The stage that failed first in pipeline terms is the most upstream one whose error others echo.
    return sorted(failed, key=lambda k: (processes[k].returncode < 0, k))
