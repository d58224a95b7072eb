"""Per-device profiling: every unit timed on every device of a registry (boards, the virtual fleet, local folders).

One speed factor C per device cannot say that a GPU speeds convolutions more than the input pipeline; a row of
unit times per device can (E_device, docs/config.md). The host converts the profiling model once (a signature
per unit and per fused group, as the host's profiler times them), each device gets it and the timer
(dnnpipe.profile.timer, NumPy and a lite interpreter only) through the deployer's transports, all devices at
once, and each device's row comes back as the timer's last line. A device that fails is named; the others are
still measured.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..deploy.closure import device_files
from ..deploy.registry import Device
from ..deploy.ship import RUNTIME_ROOT, DeviceReport, ship
from ..deploy.transport import RUN, SshOptions, SshTransport, Transport, TransportError, Upload, transport_for
from ..config import LINK_CPU_KEYS
from ..errors import ConfigError, DnnpipeError
from ..keygen import create_certificate
from ..manifest import sha256_file
from ..pipeline_key import CERT_FILE, CERT_KEY_FILE
from .timer import RESULT

FOLDER = "profile"  # below each device's remote_dir
MODEL = f"{FOLDER}/model.tflite"
LOG = f"{FOLDER}/timer.out"
PID = f"{FOLDER}/timer.pid"
LINK_FOLDER = f"{FOLDER}/link"  # a throwaway pipeline.crt pair: the link CPU is measured inside TLS, as stages run
TIMER = "dnnpipe.profile.timer"
POLL_SECONDS, POLL_MAX_SECONDS = 1.0, 30.0  # a local device's log, read while its timer runs
Progress = Callable[[str], None]


@dataclass(frozen=True)
class DeviceTimes:
    device_id: int
    probe_ms: float
    whole_ms: float
    units_ms: tuple[float, ...]  # without the probe's fixed cost, fused groups shared (costs.unit_times)
    send_ms_per_mb: Optional[float] = None  # the device's CPU on its links, device ms per MB (timer --link-folder)
    receive_ms_per_mb: Optional[float] = None
    link_tls: Optional[bool] = None
    whole_cpu_ms: Optional[float] = None  # the timer's own CPU per whole-model invoke (whole_ms / it: the hold-back)
    frame_ms: Optional[float] = None  # a stage's own CPU per frame beyond inference and bytes, device ms (timer)

    @property
    def cpu_share(self) -> Optional[float]:
        """The cores the device gave the timer while it ran the whole model: CPU over wall time (1 on a free
        core; on an emulated board its quota unless the host or something else on the board took some)."""
        return None if not self.whole_cpu_ms else min(1.0, self.whole_cpu_ms / self.whole_ms)

    @property
    def E(self) -> list[float]:
        """Each unit's share of the whole model's time on this device: the units' times (without the fixed cost
        of an invoke, as the host's E) scaled to add up to the whole model's. A stage is one invoke over its
        units, so the whole model (one invoke) is the truer total; timed one by one, U invokes' overheads would
        count U times (and under a CPU quota that overhead is throttled too)."""
        units = [max(0.0, ms) for ms in self.units_ms]
        total = sum(units)
        if total <= 0:
            return [round(self.whole_ms / len(units), 6)] * len(units)
        return [round(ms * self.whole_ms / total, 6) for ms in units]


@dataclass(frozen=True)
class Outcome:
    device: Device
    times: Optional[DeviceTimes] = None
    error: Optional[str] = None
    seconds: float = 0.0


@dataclass(frozen=True)
class DeviceProfileOptions:
    repeats: int = 30
    warmup: int = 5
    num_threads: int = 1
    ssh: SshOptions = SshOptions()
    seconds: float = 900.0  # per device, shipping included
    sustain: float = 0.25  # each signature runs back to back at least this long on the device (timer.py)
    link: bool = True  # also measure the CPU of the device's links (inside TLS unless tls is off)
    tls: bool = True


def uploads(model_file: Path, link_folder: Optional[Path] = None) -> list[Upload]:
    """The profiling model, the timer's import closure and (when given) the link measurement's certificate."""
    code = [(RUNTIME_ROOT / rel, rel.as_posix()) for rel in device_files(RUNTIME_ROOT, TIMER)]
    if link_folder is not None:
        code += [(link_folder / name, f"{LINK_FOLDER}/{name}") for name in (CERT_FILE, CERT_KEY_FILE)]
    return [Upload(model_file, MODEL, sha256_file(model_file))] + [Upload(local, rel, sha256_file(local))
                                                                 for local, rel in code]


def timer_argv(device: Device, options: DeviceProfileOptions) -> list[str]:
    return [device.interpreter, "-m", TIMER, MODEL, "--repeats", str(options.repeats), "--warmup",
            str(options.warmup), "--num-threads", str(options.num_threads), "--seconds", str(options.sustain)] + \
        (["--link-folder", LINK_FOLDER] if options.link else [])


def parse_result(device_id: int, log: str, units: int) -> DeviceTimes:
    """The timer's RESULT line, checked: one time per unit, all finite and >= 0."""
    lines = [line for line in log.splitlines() if line.startswith(RESULT)]
    if not lines:
        last = [line for line in log.splitlines() if line.strip()]
        raise DnnpipeError(f"the timer ended without a result: {last[-1] if last else 'its log is empty'}")
    try:
        data = json.loads(lines[-1][len(RESULT):])
        link = data.get("link")
        times = DeviceTimes(device_id, float(data["probe_ms"]), float(data["whole_ms"]),
                            tuple(float(x) for x in data["units_ms"]),
                            None if link is None else float(link["send_ms_per_mb"]),
                            None if link is None else float(link["receive_ms_per_mb"]),
                            None if link is None else bool(link["tls"]),
                            float(data["whole_cpu_ms"]) if "whole_cpu_ms" in data else None,
                            None if link is None or "frame_ms" not in link else float(link["frame_ms"]))
    except (ValueError, KeyError, TypeError) as e:
        raise DnnpipeError(f"the timer's result is malformed ({e})") from None
    values = [times.probe_ms, times.whole_ms, *times.units_ms, times.send_ms_per_mb or 0.0,
              times.receive_ms_per_mb or 0.0, times.frame_ms or 0.0]
    if len(times.units_ms) != units or not all(0 <= v < float("inf") for v in values):
        raise DnnpipeError(f"the timer returned {len(times.units_ms)} unit times (expected {units}), or one "
                           f"that is negative or not finite")
    return times


def run_over_ssh(transport: SshTransport, argv: Sequence[str], deadline: float, say: Callable[[str], None]) -> str:
    """The timer in the foreground of one ssh session, its lines as they come: no login (key exchange, a shell,
    tail) runs on the device while it times, where on a board of 0.12 cores each would take CPU from the timer.
    At the deadline the session is cut: the timer ends at its next line (a broken pipe)."""
    process = subprocess.Popen(transport.argv(RUN, *argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    assert process.stdout is not None
    output, told = b"", 0
    try:
        poll = select.poll()
        poll.register(process.stdout, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DnnpipeError("did not finish within the profile's deadline")
            if not poll.poll(int(min(left, POLL_SECONDS) * 1000) + 1):
                continue
            chunk = os.read(process.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            output += chunk
            lines = output.decode(errors="replace").splitlines()
            complete = lines if output.endswith(b"\n") else lines[:-1]
            for line in complete[told:]:
                if line.strip() and not line.startswith(RESULT):
                    say(line.strip())
            told = len(complete)
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    return output.decode(errors="replace")


def follow(transport: Transport, device: Device, deadline: float, seconds: float, progress: Progress) -> None:
    """A started timer's progress lines until it ends (a result, an error or its exit) or the deadline."""
    seen, wait = "", POLL_SECONDS
    while True:
        time.sleep(max(0.0, min(wait, deadline - time.monotonic())))
        wait = min(POLL_MAX_SECONDS, 2 * wait)
        line = transport.tail(LOG, 1).strip()
        if line.startswith((RESULT, "error:")) or not transport.alive(PID):
            return
        if time.monotonic() > deadline:
            raise DnnpipeError(f"did not finish within {seconds:g} s")
        if line and line != seen:
            progress(f"device {device.device_id}: {line}")
            seen = line


def profile_device(device: Device, files: Sequence[Upload], units: int, options: DeviceProfileOptions,
                   progress: Progress) -> Outcome:
    """Ship, start the timer, follow its progress, read its result; every step bounded by options.seconds."""
    began = time.monotonic()
    deadline = began + options.seconds
    transport: Transport = transport_for(device, options.ssh)
    try:
        report = ship(transport, DeviceReport(device, []), files)
        if not report.ok:
            raise DnnpipeError(report.error or "; ".join(f"{rel}: {why}" for rel, why in report.failed.items()))
        progress(f"device {device.device_id}: shipped {len(report.sent)} files ({len(report.skipped)} already "
                 f"there), timing {units} units")
        if isinstance(transport, SshTransport):
            times = parse_result(device.device_id, run_over_ssh(transport, timer_argv(device, options), deadline,
                                                                lambda line: progress(f"device {device.device_id}: "
                                                                                      f"{line}")), units)
            progress(f"device {device.device_id}: whole model {times.whole_ms:.3f} ms")
            return Outcome(device, times, seconds=time.monotonic() - began)
        transport.start(timer_argv(device, options), LOG, PID)
        try:
            follow(transport, device, deadline, options.seconds, progress)
        finally:  # a transport error or Ctrl-C too: never leave the timer running on the device
            if transport.alive(PID):
                transport.stop(PID)
        times = parse_result(device.device_id, transport.tail(LOG, 5), units)
    except (DnnpipeError, TransportError, OSError) as e:
        progress(f"device {device.device_id}: FAILED: {e}")
        return Outcome(device, error=str(e), seconds=time.monotonic() - began)
    progress(f"device {device.device_id}: whole model {times.whole_ms:.3f} ms")
    return Outcome(device, times, seconds=time.monotonic() - began)


def profile_devices(flatbuffer: bytes, devices: Sequence[Device], units: int,
                    options: DeviceProfileOptions = DeviceProfileOptions(),
                    progress: Progress = print) -> list[Outcome]:
    """Every device at once; the outcomes in the order of `devices`."""
    with tempfile.TemporaryDirectory(prefix="dnnpipe-devprofile-") as folder:
        model_file = Path(folder) / "model.tflite"
        model_file.write_bytes(flatbuffer)
        link_folder = None
        if options.link and options.tls:
            try:
                link_folder = create_certificate(Path(folder) / "link").parent
            except ConfigError as e:  # no openssl here: the link CPU is measured without TLS, and says so
                progress(f"link CPU measured without TLS: {e}")
                link_folder = None
        files = uploads(model_file, link_folder)
        with ThreadPoolExecutor(max_workers=max(1, len(devices))) as pool:
            return list(pool.map(lambda d: profile_device(d, files, units, options, progress), devices))


def with_device_rows(config: dict, outcomes: Sequence[Outcome]) -> dict:
    """The config with E_device (row d: device d's unit times), E its first row and C each device's speed
    relative to device 1 (sum of row 1 over sum of row d), so the paper's format still reads right; and each
    device's measured link CPU as device_config.link_cpu when every device has it and the config has links (B and
    A), so the planner plans with it (pure)."""
    rows = [list(o.times.E) for o in sorted(outcomes, key=lambda o: o.device.device_id) if o.times is not None]
    if len(rows) != len(outcomes):
        raise DnnpipeError("every device needs its row")
    totals = [max(sum(row), 1e-9) for row in rows]
    model = {**config["model_config"], "E": rows[0], "E_device": rows}
    cluster = {**config["device_config"], "N": len(rows), "C": [round(totals[0] / t, 6) for t in totals]}
    costs = link_costs(outcomes)
    if costs is not None and "B" in cluster and "A" in model:
        cluster["link_cpu"] = {key: [round(float(c[key] or 0.0), 6) for c in costs] for key in LINK_CPU_KEYS}
    return {**config, "device_config": cluster, "model_config": model}


def link_costs(outcomes: Sequence[Outcome]) -> Optional[list[dict]]:
    """Each device's measured link CPU (device ms per MB sent and received) and a stage's own CPU per frame
    (device ms), in device order, or None when a device has none (profiled without the link measurement)."""
    ordered = sorted(outcomes, key=lambda o: o.device.device_id)
    if not all(o.times is not None and o.times.send_ms_per_mb is not None for o in ordered):
        return None
    return [{"device": o.device.device_id, "send_ms_per_mb": o.times.send_ms_per_mb,  # type: ignore[union-attr]
             "receive_ms_per_mb": o.times.receive_ms_per_mb, "tls": o.times.link_tls,  # type: ignore[union-attr]
             "frame_ms": o.times.frame_ms, "cpu_share": o.times.cpu_share}  # type: ignore[union-attr]
            for o in ordered]


def check_registry(registry: dict[int, Device], source: str) -> list[Device]:
    """Devices 1..N, as the config numbers them."""
    ids = sorted(registry)
    if ids != list(range(1, len(ids) + 1)):
        raise DnnpipeError(f"{source}: per-device profiling needs devices numbered 1..N as in the config, got "
                           f"{', '.join(map(str, ids))}")
    return [registry[d] for d in ids]


def format_outcomes(outcomes: Sequence[Outcome]) -> str:
    rows = [f"{'device':>6}  {'whole ms':>9} {'sum(E) ms':>9} {'CPU share':>9} {'send ms/MB':>10} "
            f"{'recv ms/MB':>10} {'frame ms':>8} {'seconds':>7}  result"]
    nan = float("nan")
    for o in outcomes:
        t = o.times
        result = "ok" if t else f"FAILED: {o.error}"
        send = t.send_ms_per_mb if t and t.send_ms_per_mb is not None else nan
        receive = t.receive_ms_per_mb if t and t.receive_ms_per_mb is not None else nan
        share = t.cpu_share if t and t.cpu_share is not None else nan
        frame = t.frame_ms if t and t.frame_ms is not None else nan
        rows.append(f"{o.device.device_id:>6}  {t.whole_ms if t else nan:>9.3f} "
                    f"{sum(t.E) if t else nan:>9.3f} {share:>9.3f} {send:>10.3f} {receive:>10.3f} "
                    f"{frame:>8.3f} {o.seconds:>7.1f}  {result}")
    return "\n".join(rows)


def on_devices(config: dict, flatbuffer: bytes, registry_file: Path, options: DeviceProfileOptions,
               progress: Progress = print) -> tuple[dict, list[Outcome]]:
    """The host's config with every registry device's measured row; an error naming the devices that failed
    (after all were tried)."""
    from ..deploy.registry import load_registry

    devices = check_registry(load_registry(registry_file), str(registry_file))
    cluster = dict(config["device_config"])
    for key in ("M", "B"):
        if key in cluster and len(cluster[key]) != len(devices):
            if len(cluster[key]) != 1:
                raise DnnpipeError(f"{registry_file}: {len(devices)} devices, but the cluster gives "
                                   f"{len(cluster[key])} values of {key}")
            cluster[key] = cluster[key] * len(devices)
    outcomes = profile_devices(flatbuffer, devices, config["model_config"]["U"], options, progress)
    failed = [o for o in outcomes if o.times is None]
    if failed:
        raise DnnpipeError(f"{len(failed)} of {len(outcomes)} devices could not be profiled: "
                           + "; ".join(f"device {o.device.device_id}: {o.error}" for o in failed))
    if link_costs(outcomes) is not None and not ("B" in cluster and "A" in config["model_config"]):
        progress("link CPU measured but not written: device_config.link_cpu needs each device's link bandwidth "
                 "(--bandwidth) and the cut sizes (model_config.A)")
    return with_device_rows({**config, "device_config": cluster}, outcomes), outcomes
