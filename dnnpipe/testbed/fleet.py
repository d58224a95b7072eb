"""A virtual fleet on one host: one emulated board per device of a cluster, reached over SSH like a real one.

Each device is a network namespace on a bridge with a tbf-shaped link (B x scale), a CPU quota (C x scale cores,
on one core when it is at most one), a memory limit (M plus the runtime's own footprint, no swap) and its own
sshd. The description (`describe`, `registry`) is pure; `up`, `down`, `status` and `fault` run the commands.
Everything is named after the fleet's id, a hash of its state folder, so `down` also finds what a killed `up`
left (namespaces, the host's veth, sshd processes, cgroups) without reading any state.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..config import load_devices
from ..errors import ConfigError, DnnpipeError
from ..jsonio import write_atomic
from . import cgroups, sshd
from .cores import usable_cores
from .netns import MTU, namespaces, remove_namespace, run_ip, tbf_arguments

DEFAULT_STATE = Path(".dnnpipe-fleet")
STATE_FILE = "fleet.json"
IDENTITY = "id_ed25519"
KNOWN_HOSTS = "known_hosts"
AUTHORIZED_KEYS = "authorized_keys"
REGISTRY = "device_registry.json"
HOST_SHARE = 0.5  # by default the fleet's quotas add up to at most half the usable cores
RUNTIME_MB = 256.0  # a device's python, lite interpreter and sshd, on top of M (the model's share)
RUNTIME_PORT = 50000
MAX_DEVICES = 200  # one /24: .11 to .210
NET = "198.19"  # set aside for network testing (RFC 2544); the fleet takes one /24 of it
Echo = Callable[[str], None]

# A board's sockets start with room for a whole cut (1 MiB, frames of the fleet's models are 0.1-0.6 MB). A quota
# runs a board at full speed and then pauses it for the rest of its period (8.8 ms of every 10 at 0.12 cores):
# with the kernel's 16 KB starting send buffer the stage's send thread had to come back for more while paused,
# so a 410 KB cut took 10.5 ms to leave a 0.12-core board against 5.7 ms on its link and 1.6 ms of its CPU. A
# real slow board is never paused; with the cut in the kernel in one go, the link drains it while the board waits.
SOCKET_BUFFERS = {"tcp_wmem": f"4096 {1 << 20} {4 << 20}", "tcp_rmem": f"4096 {1 << 20} {6 << 20}"}


@dataclass(frozen=True)
class FleetDevice:
    device_id: int
    namespace: str
    interface: str  # inside the namespace: `ip -n NAMESPACE link set dev INTERFACE down` cuts the device off
    address: str
    C: float
    M: float  # MiB
    cpu_cores: float  # the quota: C x scale
    cpus: Optional[str]  # the core set, or None
    memory_mb: float  # the limit: M + runtime_mb
    link_mbps: Optional[float]  # B x scale, or None: not shaped
    remote_dir: str


@dataclass(frozen=True)
class Fleet:
    fleet_id: str
    state: str  # the state folder, absolute
    subnet: str  # x.y.z: the host is .1, device d is .(10 + d)
    scale: float
    user: str
    python: str
    devices: tuple[FleetDevice, ...]

    @property
    def hub(self) -> str:
        return f"dnf{self.fleet_id}-hub"

    @property
    def host_interface(self) -> str:
        return host_interface(self.fleet_id)

    def device(self, device_id: int) -> FleetDevice:
        for d in self.devices:
            if d.device_id == device_id:
                return d
        raise DnnpipeError(f"testbed: the fleet has no device {device_id} (it has "
                           f"{', '.join(str(d.device_id) for d in self.devices)})")


def fleet_id(state: Path) -> str:
    return hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:6]


def host_interface(fid: str) -> str:
    return f"dnf{fid}"


def read_cluster(path: Path) -> dict[str, list[float]]:
    """C, M and optionally B of a cluster file, read and checked as every command reads one (config.load_devices);
    the fleet's own limits on top: at most MAX_DEVICES, and one link per device (no B_link)."""
    given = load_devices(path)
    if given.N > MAX_DEVICES:
        raise ConfigError(f"{path}: at most {MAX_DEVICES} devices, got {given.N}")
    if given.B_link is not None:
        raise ConfigError(f"{path}: 'B_link' cannot be emulated: a fleet device has one shaped link (its B)")
    return {"C": list(given.C), "M": list(given.M), **({} if given.B is None else {"B": list(given.B)})}


def default_scale(C: Sequence[float], cores: float) -> float:
    """Every speed and bandwidth x this, so the quotas add up to at most HOST_SHARE of the usable cores."""
    return min(1.0, cores * HOST_SHARE / sum(C))


def core_sets(quotas: Sequence[float], cores: Sequence[int]) -> list[Optional[str]]:
    """A device of at most one core on one core (as a single-core board), the least loaded so far; larger
    devices on every core."""
    load = {c: 0.0 for c in cores}
    sets: list[Optional[str]] = []
    for quota in quotas:
        if quota > 1.0 or len(cores) < 2:
            sets.append(None)
            continue
        core = min(load, key=lambda c: (load[c], c))
        load[core] += quota
        sets.append(str(core))
    return sets


def core_set_after(fleet: Fleet, device_id: int, quota: float, cores: Sequence[int]) -> Optional[str]:
    """A device's core set for its new quota (pure): every core above one core (its old single core would cap
    it silently), else its single core, or the least loaded one when it had none while the fleet pins."""
    d = fleet.device(device_id)
    if quota > 1.0 or len(cores) < 2:
        return None
    if d.cpus is not None:
        return d.cpus
    others = [x for x in fleet.devices if x.device_id != device_id]
    if not any(x.cpus is not None for x in others) and any(x.cpu_cores <= 1.0 for x in others):
        return None  # built without pinning (--no-pin)
    load = {c: sum(x.cpu_cores for x in others if x.cpus == str(c)) for c in cores}
    return str(min(load, key=lambda c: (load[c], c)))


def describe(cluster: dict[str, list[float]], state: Path, subnet: str, scale: float, user: str, python: str,
             pin: bool = True, cores: Sequence[int] = (0,), runtime_mb: float = RUNTIME_MB) -> Fleet:
    """The fleet for a cluster (pure): names, addresses, limits."""
    fid, state = fleet_id(state), state.resolve()
    quotas = [c * scale for c in cluster["C"]]
    sets = core_sets(quotas, cores) if pin else [None] * len(quotas)
    devices = []
    for d, (c, m, quota, cpus) in enumerate(zip(cluster["C"], cluster["M"], quotas, sets), 1):
        link = cluster["B"][d - 1] * scale if "B" in cluster else None
        devices.append(FleetDevice(d, f"dnf{fid}-d{d}", "eth0", f"{subnet}.{10 + d}", c, m, quota, cpus,
                                   m + runtime_mb, link, str(state / f"d{d}" / "home")))
    return Fleet(fid, str(state), subnet, scale, user, python, tuple(devices))


def registry(fleet: Fleet) -> dict[str, Any]:
    """The device registry that reaches the fleet over ssh exactly as boards are reached."""
    state = Path(fleet.state)
    return {"devices": [{"device_id": d.device_id, "host": d.address, "user": fleet.user, "port": 22,
                         "identity_file": str(state / IDENTITY), "known_hosts": str(state / KNOWN_HOSTS),
                         "remote_dir": d.remote_dir, "runtime_port": RUNTIME_PORT, "python": fleet.python,
                         "comment": f"emulated board: C {d.C:g} ({d.cpu_cores:.3g} cores), M {d.M:g} MiB"}
                        for d in fleet.devices]}


def why_not_available() -> Optional[str]:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root (namespaces, cgroups and an sshd per device need root)"
    for tool in ("ip", "tc", "ssh-keygen", "ssh"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found (install iproute2 and openssh-client)"
    if sshd.sshd_path() is None:
        return "sshd not found (install openssh-server)"
    if cgroups.hierarchy() is None:
        return f"no cgroup hierarchy with the cpu and memory controllers under {cgroups.ROOT}"
    return None


def require_root() -> None:
    reason = why_not_available()
    if reason is not None:
        raise DnnpipeError(f"testbed: cannot emulate a fleet here: {reason}")


# --- the commands that build it ------------------------------------------------------------------------------

def free_subnet(fid: str) -> str:
    """A /24 of NET no interface of this host uses yet, starting from one the fleet's id picks."""
    used = run_ip("ip", "-4", "-o", "addr", "show")
    first = int(fid[:2], 16)
    for k in range(256):
        subnet = f"{NET}.{(first + k) % 256}"
        if f" {subnet}." not in used:
            return subnet
    raise DnnpipeError(f"testbed: every /24 of {NET}.0.0/16 is in use on this host")


def up(cluster_file: Path, registry_file: Path, state: Path = DEFAULT_STATE, scale: Optional[float] = None,
       pin: bool = True, runtime_mb: float = RUNTIME_MB, echo: Echo = print) -> Fleet:
    """Build the fleet and write its registry; on any failure (or Ctrl-C) nothing is left behind."""
    require_root()
    cluster = read_cluster(cluster_file)
    fid = fleet_id(state)
    if remove(fid, state):
        echo(f"testbed: removed what a previous fleet {fid} left")
    state.mkdir(parents=True, exist_ok=True)
    cores = sorted(os.sched_getaffinity(0))
    fleet = describe(cluster, state, free_subnet(fid), scale or default_scale(cluster["C"], usable_cores()),
                     getpass.getuser(), sys.executable, pin, cores, runtime_mb)
    try:
        _keys(fleet)
        _network(fleet)
        for d in fleet.devices:
            cgroups.create(fid, d.device_id, cgroups.Limits(d.cpu_cores, int(d.memory_mb * 2 ** 20), d.cpus))
            power_on(fleet, d)
        write_atomic(state / STATE_FILE, json.dumps(asdict(fleet), indent=2) + "\n")
        write_atomic(registry_file, json.dumps(registry(fleet), indent=2) + "\n")
    except BaseException as failure:
        try:
            remove(fid, state)
        except DnnpipeError as e:  # the original failure is the one to report; the leftovers go with it
            failure.add_note(f"and cleaning up failed too: {e}")
        raise
    return fleet


def _keys(fleet: Fleet) -> None:
    state = Path(fleet.state)
    identity = sshd.keygen(state / IDENTITY)
    (state / AUTHORIZED_KEYS).write_text(Path(f"{identity}.pub").read_text())
    lines = []
    for d in fleet.devices:
        folder = state / f"d{d.device_id}"
        Path(d.remote_dir).mkdir(parents=True, exist_ok=True)
        key = sshd.keygen(folder / "host_key")
        (folder / "sshd_config").write_text(sshd.config_text(d.address, key, state / AUTHORIZED_KEYS,
                                                             folder / "sshd.pid"))
        lines.append(sshd.known_hosts_line(d.address, key))
    (state / KNOWN_HOSTS).write_text("".join(lines))


def _network(fleet: Fleet) -> None:
    """A bridge in the hub namespace, the host on it through one veth (.1), each device on it through its own."""
    hub, host = fleet.hub, fleet.host_interface
    run_ip("ip", "netns", "add", hub)
    run_ip("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
    run_ip("ip", "-n", hub, "link", "set", "br0", "up")
    run_ip("ip", "link", "add", host, "type", "veth", "peer", "name", "up0", "netns", hub)
    run_ip("ip", "-n", hub, "link", "set", "up0", "mtu", str(MTU), "master", "br0", "up")
    run_ip("ip", "addr", "add", f"{fleet.subnet}.1/24", "dev", host)
    run_ip("ip", "link", "set", host, "mtu", str(MTU), "up")
    for d in fleet.devices:
        port = f"h{d.device_id}"
        run_ip("ip", "netns", "add", d.namespace)
        run_ip("ip", "-n", hub, "link", "add", port, "type", "veth", "peer", "name", d.interface,
               "netns", d.namespace)
        run_ip("ip", "-n", hub, "link", "set", port, "mtu", str(MTU), "master", "br0", "up")
        run_ip("ip", "-n", d.namespace, "addr", "add", f"{d.address}/24", "dev", d.interface)
        run_ip("ip", "-n", d.namespace, "link", "set", d.interface, "mtu", str(MTU), "up")
        run_ip("ip", "-n", d.namespace, "link", "set", "lo", "up")
        for name, value in SOCKET_BUFFERS.items():  # per namespace since Linux 4.15
            run_ip("ip", "netns", "exec", d.namespace, "tee", f"/proc/sys/net/ipv4/{name}", input=value)
        if d.link_mbps is not None:  # both directions, as the per-stage testbed does
            run_ip("tc", "-n", d.namespace, "qdisc", "add", "dev", d.interface, "root", *tbf_arguments(d.link_mbps))
            run_ip("tc", "-n", hub, "qdisc", "add", "dev", port, "root", *tbf_arguments(d.link_mbps))


def power_on(fleet: Fleet, d: FleetDevice) -> None:
    folder = Path(fleet.state) / f"d{d.device_id}"
    sshd.start(d.namespace, folder / "sshd_config", folder / "sshd.log",
               lambda: cgroups.join(fleet.fleet_id, d.device_id))
    sshd.wait_until_listening(d.address, folder / "sshd.log")


def remove(fid: str, state: Optional[Path] = None) -> bool:
    """Everything of fleet `fid`: processes in its groups and namespaces, the namespaces (their veths and the
    bridge go with them), the host's veth, the groups. True when anything was there. Every step runs even when
    one before it failed; the failures are raised together at the end."""
    found, errors = False, []

    def attempt(step: Callable[[], bool]) -> None:
        nonlocal found
        try:
            found = step() or found
        except (DnnpipeError, OSError) as e:
            errors.append(str(e))

    def kill() -> bool:
        if cgroups.hierarchy() is None or not cgroups.pids(fid):
            return False
        cgroups.kill(fid)
        return True

    def namespace(name: str) -> bool:
        remove_namespace(name)  # kills what runs inside first
        return True

    def veth() -> bool:
        if host_interface(fid) not in run_ip("ip", "-o", "link", "show"):
            return False
        try:
            run_ip("ip", "link", "del", host_interface(fid))
        except DnnpipeError as e:  # gone with its peer in the hub namespace, a moment after the check
            if "Cannot find device" not in str(e):
                raise
        return True

    def groups() -> bool:
        if cgroups.hierarchy() is None or not any(f.exists() for f in cgroups.folders(fid)):
            return False
        cgroups.remove(fid)
        return True

    def files() -> bool:
        assert state is not None
        for pid_file in state.glob("d*/sshd.pid"):
            sshd.stop(pid_file, _members(fid, pid_file.parent.name))
        (state / STATE_FILE).unlink(missing_ok=True)
        return False

    attempt(kill)
    for name in namespaces():
        if name.startswith(f"dnf{fid}-"):
            attempt(partial(namespace, name))
    attempt(veth)
    attempt(groups)
    if state is not None:
        attempt(files)
    if errors:
        raise DnnpipeError(f"testbed: fleet {fid} not fully removed: {'; '.join(errors)}")
    return found


def _members(fid: str, folder: str) -> set[int]:
    """The processes in the groups of the device whose state folder is `folder` (dN); none if not one."""
    if not folder[1:].isdigit() or cgroups.hierarchy() is None:
        return set()
    return cgroups.pids(fid, int(folder[1:]))


def sshd_pid(fleet: Fleet, device_id: int) -> Optional[int]:
    """The device's running sshd: its pid file's pid, when that is in the device's groups."""
    return sshd.running_pid(Path(fleet.state) / f"d{device_id}" / "sshd.pid",
                            cgroups.pids(fleet.fleet_id, device_id))


def down(state: Path = DEFAULT_STATE, every: bool = False) -> list[str]:
    """Remove the fleet of this state folder (or every fleet on the host); the ids removed."""
    require_root()
    fids = {fleet_id(state)}
    if every:
        fids |= set(cgroups.fleets())
        fids |= {n[3:9] for n in namespaces() if n.startswith("dnf") and n[9:10] == "-"}
    return [fid for fid in sorted(fids) if remove(fid, state if fid == fleet_id(state) else None)]


def load(state: Path = DEFAULT_STATE) -> Fleet:
    path = state / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DnnpipeError(f"testbed: no fleet in {state} (run `python -m dnnpipe testbed up` first, or give "
                           f"--state)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DnnpipeError(f"{path}: unreadable fleet state ({e})") from None
    data["devices"] = tuple(FleetDevice(**d) for d in data["devices"])
    return Fleet(**data)


def device_status(fleet: Fleet, d: FleetDevice) -> dict[str, Any]:
    """One device as it is now: its limits as the kernel holds them and its state (up, cut, off, gone)."""
    limits = cgroups.limits_now(fleet.fleet_id, d.device_id)
    if d.namespace not in namespaces() or limits is None:
        state = "gone"
    elif sshd_pid(fleet, d.device_id) is None:
        state = "off"
    else:
        link = run_ip("ip", "-n", d.namespace, "-o", "link", "show", "dev", d.interface)
        state = "up" if ",UP" in link or "<UP" in link else "cut"
    return {"device_id": d.device_id, "namespace": d.namespace, "interface": d.interface, "address": d.address,
            "C": d.C, "M": d.M, "cpu_cores": limits.cpu_cores if limits else d.cpu_cores,
            "cpus": limits.cpus if limits else d.cpus,
            "memory_mb": round(limits.memory_bytes / 2 ** 20, 3) if limits else d.memory_mb,
            "link_mbps": d.link_mbps, "state": state,
            **(cgroups.stats(fleet.fleet_id, d.device_id) if limits else {})}


def status(state: Path = DEFAULT_STATE) -> tuple[Fleet, list[dict[str, Any]]]:
    require_root()
    fleet = load(state)
    return fleet, [device_status(fleet, d) for d in fleet.devices]


def fault(state: Path, device_id: int, action: str, speed: Optional[float] = None, echo: Echo = print) -> str:
    """Change one device while things run: cut or heal its link, power it off (everything on it killed) or on
    again (heal), or set its speed C (slow)."""
    require_root()
    fleet = load(state)
    d = fleet.device(device_id)
    if action == "cut":
        run_ip("ip", "-n", d.namespace, "link", "set", "dev", d.interface, "down")
        return f"device {device_id}: link {d.interface} in {d.namespace} down"
    if action == "heal":
        run_ip("ip", "-n", d.namespace, "link", "set", "dev", d.interface, "up")
        powered = ""
        if sshd_pid(fleet, device_id) is None:
            power_on(fleet, d)
            powered = ", powered on (sshd started)"
        return f"device {device_id}: link up{powered}"
    if action == "poweroff":
        cgroups.kill(fleet.fleet_id, device_id)
        sshd.stop(Path(fleet.state) / f"d{device_id}" / "sshd.pid", set())  # its processes are gone: the file
        return f"device {device_id}: powered off (every process on it killed)"
    if action == "slow":
        if speed is None or not speed > 0:
            raise DnnpipeError("testbed fault DEVICE slow C: C must be a speed > 0")
        cores, available = speed * fleet.scale, sorted(os.sched_getaffinity(0))
        cpus = core_set_after(fleet, device_id, cores, available)
        cgroups.set_cpus(fleet.fleet_id, device_id, cpus or ",".join(map(str, available)))
        cgroups.set_cpu(fleet.fleet_id, device_id, cores)
        devices = tuple(replace(x, C=speed, cpu_cores=cores, cpus=cpus) if x.device_id == device_id else x
                        for x in fleet.devices)
        write_atomic(Path(fleet.state) / STATE_FILE, json.dumps(asdict(replace(fleet, devices=devices)),
                                                                indent=2) + "\n")
        return f"device {device_id}: C {speed:g} ({cores:.3g} cores)"
    raise DnnpipeError(f"testbed fault: unknown action {action!r} (cut, heal, poweroff, slow)")


def format_status(fleet: Fleet, rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"fleet {fleet.fleet_id} in {fleet.state}: {len(rows)} devices on {fleet.subnet}.0/24, every speed "
             f"and bandwidth x {fleet.scale:.3g}",
             f"{'device':>6}  {'namespace':<16} {'if':<5} {'address':<15} {'C':>5} {'cores':>6} {'cpus':>4} "
             f"{'memory MiB':>10} {'link Mbit/s':>11} {'throttled':>9}  state"]
    for r in rows:
        link = "-" if r["link_mbps"] is None else f"{r['link_mbps']:.4g}"
        lines.append(f"{r['device_id']:>6}  {r['namespace']:<16} {r['interface']:<5} {r['address']:<15} "
                     f"{r['C']:>5.3g} {r['cpu_cores']:>6.3g} {r['cpus'] or 'any':>4} {r['memory_mb']:>10.1f} "
                     f"{link:>11} {r.get('nr_throttled', 0):>9.0f}  {r['state']}")
    return "\n".join(lines)


def stop_programs(fleet: Fleet) -> int:
    """Kill what runs on the devices except their sshd (a stage whose ssh client went away lingers otherwise);
    how many processes."""
    killed = 0
    for d in fleet.devices:
        keep = sshd_pid(fleet, d.device_id)
        for pid in cgroups.pids(fleet.fleet_id, d.device_id) - {keep}:
            try:
                os.kill(pid, 9)
                killed += 1
            except ProcessLookupError:
                pass
    return killed
