"""An emulated device's CPU and memory limits: Linux cgroups, v1 (`cpu`, `cpuset`, `memory` hierarchies) or v2.

Each device of a fleet gets one group per controller at GROUP/FLEET/dN below the hierarchy's root. A CPU quota
(cfs_quota_us / cfs_period_us, or v2 cpu.max) makes the device really slower; a core set (cpuset.cpus) keeps a
device of at most one core on one core, as a single-core board; a memory limit without swap (memory.limit_in_bytes
and memsw, or v2 memory.max and memory.swap.max) has the kernel kill what exceeds it, as on a board. Processes
join by writing their pid, and their children inherit the groups, so everything an ssh login starts is limited.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import DnnpipeError

ROOT = Path("/sys/fs/cgroup")
GROUP = "dnnpipe-fleet"
# Short quota periods: a device is held back in small steps, so even one frame takes about CPU time / quota, as
# on a slower CPU (with 100 ms periods a lightly loaded device would run each frame at the host's full speed).
# The kernel's smallest quota is 1 ms, so a device of c cores needs a period of at least 1 ms / c. Below 10 ms
# the kernel does not deliver the quota: a busy loop with 0.572 cores got 0.34-0.42 cores at a 2 ms period and
# 0.52 at 5 ms, the full 0.57 at 4, 10 and 20 ms (this 2-core host, kernel 6.18, load 3-4), and a 0.57-core board
# profiled 16% slower than its quota; from 10 ms on every period tried delivered the quota within 1%.
MIN_PERIOD_US, MAX_PERIOD_US, MIN_QUOTA_US = 10_000, 100_000, 1_000
WEIGHT = 1000  # cgroup v2 cpu.weight (default 100), v1 cpu.shares x 10.24 (default 1024)
V1_CONTROLLERS = ("cpu", "cpuset", "memory")


@dataclass(frozen=True)
class Limits:
    cpu_cores: float  # the CPU quota, in cores
    memory_bytes: int
    cpus: Optional[str] = None  # a core set such as "1", or None: any core


def hierarchy(root: Path = ROOT) -> Optional[str]:
    """"v1" when the cpu, cpuset and memory hierarchies are mounted, "v2" when one unified hierarchy offers them."""
    if all((root / c / "cgroup.procs").exists() for c in V1_CONTROLLERS) and \
            (root / "cpu" / "cpu.cfs_quota_us").exists():
        return "v1"
    if _v2_root(root) is not None:
        return "v2"
    return None


def _v2_root(root: Path) -> Optional[Path]:
    for mount in (root, root / "unified"):
        try:
            offered = (mount / "cgroup.controllers").read_text().split()
        except OSError:
            continue
        if {"cpu", "memory"} <= set(offered):
            return mount
    return None


def folders(fleet: str, device: Optional[int] = None, root: Path = ROOT) -> list[Path]:
    """The fleet's (or one device's) group folder in every hierarchy used."""
    tail = [GROUP, fleet] + ([f"d{device}"] if device is not None else [])
    if hierarchy(root) == "v1":
        return [root.joinpath(c, *tail) for c in V1_CONTROLLERS]
    mount = _v2_root(root)
    return [] if mount is None else [mount.joinpath(*tail)]


def create(fleet: str, device: int, limits: Limits, root: Path = ROOT) -> None:
    kind = hierarchy(root)
    if kind is None:
        raise DnnpipeError(f"testbed: no cgroup hierarchy with cpu and memory controllers under {root}")
    for leaf in folders(fleet, device, root):
        for folder in (leaf.parent.parent, leaf.parent, leaf):
            if not folder.is_dir():
                folder.mkdir()
                if kind == "v1" and "cpuset" in folder.parts[len(root.parts)]:  # a new cpuset starts empty
                    for name in ("cpuset.cpus", "cpuset.mems"):
                        _write(folder / name, (folder.parent / name).read_text().strip())
            if kind == "v2" and folder != leaf:
                wanted = {"cpu", "memory", "cpuset"} & set((folder / "cgroup.controllers").read_text().split())
                _write(folder / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(wanted)))
    set_cpu(fleet, device, limits.cpu_cores, root)
    set_memory(fleet, device, limits.memory_bytes, root)
    if limits.cpus is not None:
        set_cpus(fleet, device, limits.cpus, root)


def _leaf(fleet: str, device: int, controller: str, root: Path) -> Path:
    if hierarchy(root) == "v1":
        return root / controller / GROUP / fleet / f"d{device}"
    return folders(fleet, device, root)[0]


def quota_period(cores: float) -> tuple[int, int]:
    """(quota, period) in us for a limit of `cores`: the shortest period the kernel's smallest quota allows."""
    period = min(MAX_PERIOD_US, max(MIN_PERIOD_US, int(-(-MIN_QUOTA_US // cores))))
    return max(MIN_QUOTA_US, int(round(cores * period))), period


def set_cpu(fleet: str, device: int, cores: float, root: Path = ROOT) -> None:
    """The quota caps the board; a high weight lets it have its quota when the host is busy with other work
    (as a board's CPU is its own), and the quotas together stay well under the host's cores."""
    folder, (quota, period) = _leaf(fleet, device, "cpu", root), quota_period(cores)
    if hierarchy(root) == "v1":
        _write(folder / "cpu.cfs_quota_us", "-1")  # the period may shrink below the old quota
        _write(folder / "cpu.cfs_period_us", str(period))
        _write(folder / "cpu.cfs_quota_us", str(quota))
    else:
        _write(folder / "cpu.max", f"{quota} {period}")
    for group in (folder.parent.parent, folder.parent, folder):  # weights count among siblings, at every level
        if hierarchy(root) == "v1":
            _write(group / "cpu.shares", str(WEIGHT * 1024 // 100))
        else:
            _write(group / "cpu.weight", str(WEIGHT))


def set_memory(fleet: str, device: int, limit: int, root: Path = ROOT) -> None:
    folder = _leaf(fleet, device, "memory", root)
    if hierarchy(root) == "v1":
        _write(folder / "memory.limit_in_bytes", str(limit))
        if (folder / "memory.memsw.limit_in_bytes").exists():  # no swap: over the limit is killed, not paged out
            _write(folder / "memory.memsw.limit_in_bytes", str(limit))
    else:
        _write(folder / "memory.max", str(limit))
        if (folder / "memory.swap.max").exists():
            _write(folder / "memory.swap.max", "0")


def set_cpus(fleet: str, device: int, cpus: str, root: Path = ROOT) -> None:
    _write(_leaf(fleet, device, "cpuset", root) / "cpuset.cpus", cpus)


def join(fleet: str, device: int, root: Path = ROOT) -> None:
    """Move this very process into the device's groups (run in the child before it becomes the device's sshd)."""
    for folder in folders(fleet, device, root):
        _write(folder / "cgroup.procs", str(os.getpid()))


def pids(fleet: str, device: Optional[int] = None, root: Path = ROOT) -> set[int]:
    """Every process in the fleet's (or one device's) groups, children's groups included."""
    found: set[int] = set()
    for top in folders(fleet, device, root):
        for folder in [top, *top.rglob("*")] if top.is_dir() else []:
            if folder.is_dir():
                found |= {int(p) for p in _read(folder / "cgroup.procs").split()}
    return found


def kill(fleet: str, device: Optional[int] = None, root: Path = ROOT, seconds: float = 5.0) -> None:
    """SIGKILL everything in the groups, until they are empty (a forking process may add one more)."""
    deadline = time.monotonic() + seconds
    while True:
        running = pids(fleet, device, root)
        if not running:
            return
        if time.monotonic() > deadline:
            raise DnnpipeError(f"testbed: processes {sorted(running)} of fleet {fleet} would not die")
        for pid in running:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def remove(fleet: str, root: Path = ROOT) -> None:
    """Kill what runs in the fleet's groups and delete them, deepest first."""
    kill(fleet, None, root)
    for top in folders(fleet, None, root):
        if top.is_dir():
            for folder in sorted([top, *[p for p in top.rglob("*") if p.is_dir()]], key=lambda p: -len(p.parts)):
                _rmdir(folder)
        if top.parent.is_dir() and not any(p.is_dir() for p in top.parent.iterdir()):
            _rmdir(top.parent)


def _rmdir(folder: Path) -> None:
    for _ in range(50):  # a killed process leaves its group a moment later
        try:
            folder.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)
    raise DnnpipeError(f"testbed: cannot remove cgroup {folder}")


def fleets(root: Path = ROOT) -> list[str]:
    """The fleets that have groups here (also those whose state folder is gone)."""
    names: set[str] = set()
    for top in {f.parent for f in folders("x", None, root)}:
        if top.is_dir():
            names |= {p.name for p in top.iterdir() if p.is_dir()}
    return sorted(names)


def stats(fleet: str, device: int, root: Path = ROOT) -> dict[str, float]:
    """Throttling and memory of one device: how often and how long its quota held it back, its memory peak and
    how many times the kernel killed in it."""
    cpu, memory = _leaf(fleet, device, "cpu", root), _leaf(fleet, device, "memory", root)
    cpu_stat = _pairs(_read(cpu / "cpu.stat"))
    if hierarchy(root) == "v1":
        oom = _pairs(_read(memory / "memory.oom_control"))
        return {"nr_periods": cpu_stat.get("nr_periods", 0), "nr_throttled": cpu_stat.get("nr_throttled", 0),
                "throttled_s": cpu_stat.get("throttled_time", 0) / 1e9,
                "memory_peak_bytes": _number(_read(memory / "memory.max_usage_in_bytes")),
                "oom_kills": oom.get("oom_kill", 0)}
    events = _pairs(_read(memory / "memory.events"))
    return {"nr_periods": cpu_stat.get("nr_periods", 0), "nr_throttled": cpu_stat.get("nr_throttled", 0),
            "throttled_s": cpu_stat.get("throttled_usec", 0) / 1e6,
            "memory_peak_bytes": _number(_read(memory / "memory.peak")), "oom_kills": events.get("oom_kill", 0)}


def limits_now(fleet: str, device: int, root: Path = ROOT) -> Optional[Limits]:
    """The limits as the kernel holds them, or None when the device's groups are gone."""
    cpu, cpuset, memory = (_leaf(fleet, device, c, root) for c in V1_CONTROLLERS)
    if not cpu.is_dir():
        return None
    if hierarchy(root) == "v1":
        cores = _number(_read(cpu / "cpu.cfs_quota_us")) / max(1.0, _number(_read(cpu / "cpu.cfs_period_us")))
        limit = _number(_read(memory / "memory.limit_in_bytes"))
    else:
        quota, _, period = _read(cpu / "cpu.max").partition(" ")
        cores = _number(quota) / max(1.0, _number(period))
        limit = _number(_read(memory / "memory.max"))
    return Limits(cores, int(limit), _read(cpuset / "cpuset.cpus") or None)


def _pairs(text: str) -> dict[str, float]:
    pairs = (line.split() for line in text.splitlines())
    return {p[0]: _number(p[1]) for p in pairs if len(p) == 2}


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise DnnpipeError(f"testbed: cannot write {value!r} to {path}: {e.strerror or e}") from None
