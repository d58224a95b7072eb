"""The runtime command each device runs, written to launch_plan.json; starting and stopping them."""

from __future__ import annotations

import json
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..errors import ConfigError, DnnpipeError
from ..manifest import Manifest
from ..runtime.argv import Value, runtime_argv
from .registry import Device
from .transport import Transport

LOG_DIR = "logs"
TAIL_LINES = 10


@dataclass(frozen=True)
class StageLaunch:
    stage: int
    device: Device
    argv: tuple[str, ...]
    listens: bool

    @property
    def log_file(self) -> str:
        return f"{LOG_DIR}/stage_{self.stage}.out"

    @property
    def pid_file(self) -> str:
        return f"{LOG_DIR}/stage_{self.stage}.pid"

    @property
    def probe_host(self) -> str:
        return "127.0.0.1" if self.device.is_local else self.device.host

    def to_json(self) -> dict:
        return {"stage": self.stage, "device": self.device.device_id, "host": self.device.host,
                "workdir": self.device.remote_dir, "argv": list(self.argv), "command": shlex.join(self.argv),
                "listen_port": self.device.runtime_port if self.listens else None, "log": self.log_file}


def launch_plan(manifest: Manifest, devices: Sequence[Device], models_dir: str, data_path: str,
                output_path: Optional[str], extra: Sequence[str] = ()) -> list[StageLaunch]:
    """Stage k listens on its device's runtime_port and sends to stage k+1's device and port."""
    _check_ports(devices)
    last = len(devices)
    launches = []
    for k, device in enumerate(devices, 1):
        following = devices[k] if k < last else None
        flags: list[tuple[str, Value]] = [
            ("--stage", k), ("--model-path", models_dir), ("--model-name", manifest.model_name),
            ("--log-dir", LOG_DIR)]
        argv = runtime_argv([device.interpreter, "runtime_engine.py"], flags) + list(extra)
        argv += runtime_argv([], [
            ("--bind-addr", "0.0.0.0" if k > 1 else None), ("--bind-port", device.runtime_port if k > 1 else None),
            ("--next-host", None if following is None else "127.0.0.1" if following.is_local else following.host),
            ("--next-port", None if following is None else following.runtime_port),
            ("--data-path", data_path if k == 1 else None), ("--output-path", output_path if k == last else None)])
        launches.append(StageLaunch(k, device, tuple(argv), k > 1))
    return launches


def _check_ports(devices: Sequence[Device]) -> None:
    seen: dict[tuple[str, int], int] = {}
    for device in devices[1:]:  # stage 1 does not listen
        key = ("127.0.0.1" if device.is_local else device.host, device.runtime_port)
        if key in seen:
            raise ConfigError(f"devices {seen[key]} and {device.device_id} would both listen on {key[0]}:{key[1]}; "
                              f"give them different runtime_port values")
        seen[key] = device.device_id


def write_launch_plan(path: Path, launches: Sequence[StageLaunch]) -> None:
    path.write_text(json.dumps({"stages": [launch.to_json() for launch in launches]}, indent=2) + "\n")


def format_launch_plan(launches: Sequence[StageLaunch]) -> str:
    return "\n".join(f"stage {s.stage} on device {s.device.device_id} ({s.device.host}, in {s.device.remote_dir}):\n"
                     f"    {shlex.join(s.argv)}" for s in launches)


def wait_for_stage(item: StageLaunch, transport: Transport, seconds: float, echo=print) -> None:
    """Until the stage's port takes a connection; as soon as the stage has exited, its own last words (the
    log's end through `echo`, its last line in the error)."""
    host, port = item.probe_host, item.device.runtime_port
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return  # the stage takes a connection closed without data for a probe
        except OSError:
            pass
        if not transport.alive(item.pid_file):
            log = f"{item.device.remote_dir}/{item.log_file}"
            lines = [line for line in transport.tail(item.log_file, TAIL_LINES).splitlines() if line.strip()]
            if lines:
                echo(f"stage {item.stage}: the end of {log}:\n" + "\n".join(f"    {line}" for line in lines))
            raise DnnpipeError(f"stage {item.stage} on device {item.device.device_id} exited at start: "
                               f"{lines[-1].strip() if lines else 'its log is empty'} (log: {log})")
        time.sleep(0.3)
    raise DnnpipeError(f"stage {item.stage} on device {item.device.device_id} did not accept connections on "
                       f"{host}:{port} within {seconds:g} s (see {item.device.remote_dir}/{item.log_file})")


def launch(launches: Sequence[StageLaunch], transports: dict[int, Transport], wait_seconds: float,
           echo=print) -> None:
    """Last stage first, so every listener is up before the stage before it connects. If a stage fails to
    come up, the ones already started are stopped again: nothing is left running half a pipeline."""
    started: list[StageLaunch] = []
    try:
        for item in reversed(launches):
            transport = transports[item.device.device_id]
            transport.start(item.argv, item.log_file, item.pid_file)
            started.append(item)
            if item.listens:
                wait_for_stage(item, transport, wait_seconds, echo)
                echo(f"stage {item.stage} listening on {item.probe_host}:{item.device.runtime_port}")
            else:
                echo(f"stage {item.stage} started on device {item.device.device_id}")
    except BaseException:
        try:
            stop(started, transports, echo=lambda line: None)
        except DnnpipeError:
            pass  # the first failure is the one to report
        raise


def stop(launches: Sequence[StageLaunch], transports: dict[int, Transport], echo=print) -> None:
    for item in launches:
        stopped = transports[item.device.device_id].stop(item.pid_file)
        echo(f"stage {item.stage} on device {item.device.device_id}: {'stopped' if stopped else 'not running'}")
