"""The runtime command each device runs, written to launch_plan.json; starting and stopping them."""

from __future__ import annotations

import json
import shlex
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..errors import ConfigError, DnnpipeError
from ..manifest import MANIFEST_FILE, Manifest
from ..pipeline_key import KEY_FILE, read_key, tls_context
from ..runtime.handshake import HandshakeError, manifest_identity, probe_side, tls_wrap
from ..runtime.argv import Value, runtime_argv
from .registry import Device
from .transport import Transport

LOGS = "logs"  # below the model's folder on the device
TAIL_LINES = 10
NOTHING = "nothing accepts connections there"
PROBE_SECONDS = 3.0  # one probe's wait for the answer: a stage answers once it takes its upstream


def model_folder(models_dir: str, model_name: str) -> str:
    """The model's folder on a device, relative to its remote_dir: its sub-models, and by default its inputs,
    results, logs and pid files, so a second model deployed to the same device never touches the first's."""
    return f"{models_dir}/{model_name}"


@dataclass(frozen=True)
class StageLaunch:
    stage: int
    device: Device
    argv: tuple[str, ...]
    listens: bool
    log_dir: str = LOGS  # relative to the device's remote_dir

    @property
    def log_file(self) -> str:
        return f"{self.log_dir}/stage_{self.stage}.out"

    @property
    def pid_file(self) -> str:
        return f"{self.log_dir}/stage_{self.stage}.pid"

    @property
    def probe_host(self) -> str:
        return "127.0.0.1" if self.device.is_local else self.device.host

    def to_json(self) -> dict:
        return {"stage": self.stage, "device": self.device.device_id, "host": self.device.host,
                "workdir": self.device.remote_dir, "argv": list(self.argv), "command": shlex.join(self.argv),
                "listen_port": self.device.runtime_port if self.listens else None, "log": self.log_file}


def launch_plan(manifest: Manifest, devices: Sequence[Device], models_dir: str, data_path: str,
                output_path: Optional[str], extra: Sequence[str] = ()) -> list[StageLaunch]:
    """Stage k listens on its device's runtime_port and sends to stage k+1's device and port; its logs and pid
    file go below the model's folder."""
    _check_ports(devices)
    last = len(devices)
    log_dir = f"{model_folder(models_dir, manifest.model_name)}/{LOGS}"
    launches = []
    for k, device in enumerate(devices, 1):
        following = devices[k] if k < last else None
        flags: list[tuple[str, Value]] = [
            ("--stage", k), ("--model-path", models_dir), ("--model-name", manifest.model_name),
            ("--log-dir", log_dir)]
        argv = runtime_argv([device.interpreter, "runtime_engine.py"], flags) + list(extra)
        argv += runtime_argv([], [
            ("--bind-addr", "0.0.0.0" if k > 1 else None), ("--bind-port", device.runtime_port if k > 1 else None),
            ("--next-host", None if following is None else "127.0.0.1" if following.is_local else following.host),
            ("--next-port", None if following is None else following.runtime_port),
            ("--data-path", data_path if k == 1 else None), ("--output-path", output_path if k == last else None)])
        launches.append(StageLaunch(k, device, tuple(argv), k > 1, log_dir))
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


@dataclass(frozen=True)
class StageProbe:
    """Proves that what answers on a stage's port is that stage of this pipeline: it answers a probe with the
    pipeline key for this manifest and that stage (dnnpipe.runtime.handshake.probe_side), inside TLS with --tls.
    Any other listener (another program, another pipeline, another stage) fails it."""

    key: bytes = field(repr=False)  # the pipeline key: never in a repr or a traceback's locals
    identity: bytes
    tls: Optional[ssl.SSLContext] = None

    @classmethod
    def of(cls, folder: Path, tls: bool) -> "StageProbe":
        """The probe for the partition in `folder` (its pipeline key, manifest and, with --tls, certificate)."""
        return cls(read_key(folder / KEY_FILE), manifest_identity((folder / MANIFEST_FILE).read_bytes()),
                   tls_context(folder, server_side=False) if tls else None)

    def __call__(self, host: str, port: int, stage: int, seconds: float) -> Optional[str]:
        """None once proven, else why not."""
        try:
            sock = socket.create_connection((host, port), timeout=min(1.0, seconds))
        except OSError as e:
            return f"{NOTHING} ({e.strerror or e})"
        ends = time.monotonic() + seconds
        try:
            if self.tls is not None:
                sock = tls_wrap(sock, self.tls, False, seconds)
            probe_side(sock, self.key, self.identity, stage, max(0.01, ends - time.monotonic()))
        except HandshakeError as e:
            return f"what answers there did not prove it is stage {stage} of this pipeline: {e}"
        finally:
            sock.close()
        return None


def wait_for_stage(item: StageLaunch, transport: Transport, seconds: float, probe: StageProbe,
                   echo=print) -> None:
    """Until the stage's port answers the probe as this stage (not merely accepts: another process may hold
    the port); as soon as the stage has exited, its own last words (the log's end through `echo`, its last
    line in the error)."""
    host, port = item.probe_host, item.device.runtime_port
    deadline = time.monotonic() + seconds
    answer = "no answer yet"
    while time.monotonic() < deadline:
        answer = probe(host, port, item.stage, max(0.1, min(PROBE_SECONDS, deadline - time.monotonic()))) or ""
        if not answer:
            return
        if not transport.alive(item.pid_file):
            log = f"{item.device.remote_dir}/{item.log_file}"
            lines = [line for line in transport.tail(item.log_file, TAIL_LINES).splitlines() if line.strip()]
            if lines:
                echo(f"stage {item.stage}: the end of {log}:\n" + "\n".join(f"    {line}" for line in lines))
            foreign = "" if answer.startswith(NOTHING) else f"; on {host}:{port}, {answer}"
            raise DnnpipeError(f"stage {item.stage} on device {item.device.device_id} exited at start: "
                               f"{lines[-1].strip() if lines else 'its log is empty'} (log: {log}{foreign})")
        time.sleep(0.3)
    raise DnnpipeError(f"stage {item.stage} on device {item.device.device_id} did not answer as stage {item.stage} "
                       f"on {host}:{port} within {seconds:g} s ({answer}; see {item.device.remote_dir}/"
                       f"{item.log_file})")


def launch(launches: Sequence[StageLaunch], transports: dict[int, Transport], wait_seconds: float,
           probe: StageProbe, echo=print) -> None:
    """Last stage first, each proven up (`probe`) before the stage before it starts. If a stage fails to come
    up, the ones already started are stopped again: nothing is left running half a pipeline."""
    started: list[StageLaunch] = []
    try:
        for item in reversed(launches):
            transport = transports[item.device.device_id]
            transport.start(item.argv, item.log_file, item.pid_file)
            started.append(item)
            if item.listens:
                wait_for_stage(item, transport, wait_seconds, probe, echo)
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
