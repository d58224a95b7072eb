"""How many cores this process may really use: its CPU affinity and its cgroup's CPU quota, not os.cpu_count()."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> float:
    """min(CPUs in the affinity mask, the tightest CPU quota of this process's cgroup and its ancestors)."""
    affinity = float(len(os.sched_getaffinity(0)))
    quota = cgroup_quota(proc_cgroup, root)
    return affinity if quota is None else max(0.01, min(affinity, quota))


def cgroup_quota(proc_cgroup: Path, root: Path) -> Optional[float]:
    """The CPU quota in cores (cgroup v2 cpu.max, or v1 cpu.cfs_quota_us / cpu.cfs_period_us), or None."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy, mounted at root or at root/unified on hybrid systems
            for mount in (root, root / "unified"):
                quotas += [q for q in map(_v2_quota, _ancestors(mount, path)) if q is not None]
        elif "cpu" in controllers.split(","):
            for mount in (root / controllers, root / "cpu"):
                quotas += [q for q in map(_v1_quota, _ancestors(mount, path)) if q is not None]
    return min(quotas) if quotas else None


def _ancestors(mount: Path, path: str) -> list[Path]:
    """The cgroup's folder and every parent up to the mount point (a parent's quota limits its children)."""
    parts = [p for p in path.split("/") if p]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_quota(folder: Path) -> Optional[float]:
    text = _read(folder / "cpu.max")
    if text is None:
        return None
    quota, _, period = text.partition(" ")
    return None if quota == "max" or not period else int(quota) / int(period)


def _v1_quota(folder: Path) -> Optional[float]:
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    if quota is None or period is None or int(quota) <= 0:
        return None
    return int(quota) / int(period)


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None
