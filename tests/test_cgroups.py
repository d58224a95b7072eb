"""testbed/cgroups.py's parts that need no kernel: the quota arithmetic, which hierarchy a tree is, where a
device's groups are, what is written there and how the kernel's files are read back. The module takes the
hierarchy's root as an argument, so these run on a folder laid out as /sys/fs/cgroup is (plain files: no limit
is enforced here); real groups on the host are tests/test_fleet.py's."""

from pathlib import Path

import pytest

from dnnpipe.errors import DnnpipeError
from dnnpipe.testbed import cgroups
from dnnpipe.testbed.cgroups import GROUP, Limits


def v2_tree(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    return root


def v1_tree(root: Path) -> Path:
    for controller in cgroups.V1_CONTROLLERS:
        (root / controller).mkdir(parents=True)
        (root / controller / "cgroup.procs").write_text("")
    (root / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cpuset" / "cpuset.cpus").write_text("0-1\n")
    (root / "cpuset" / "cpuset.mems").write_text("0\n")
    return root


def test_a_quota_is_the_shortest_period_the_smallest_quota_allows():
    assert cgroups.quota_period(1.0) == (cgroups.MIN_PERIOD_US, cgroups.MIN_PERIOD_US)
    assert cgroups.quota_period(0.25) == (2500, 10_000)  # 2.5 ms of every 10 ms (MIN_PERIOD_US)
    assert cgroups.quota_period(0.001) == (cgroups.MIN_QUOTA_US, cgroups.MAX_PERIOD_US)  # as slow as it gets
    for cores in (0.01, 0.21, 0.33, 0.5, 2.0, 3.7):
        quota, period = cgroups.quota_period(cores)
        assert quota >= cgroups.MIN_QUOTA_US and cgroups.MIN_PERIOD_US <= period <= cgroups.MAX_PERIOD_US
        assert quota / period == pytest.approx(cores, rel=0.01)


def test_which_hierarchy_a_tree_is(tmp_path):
    assert cgroups.hierarchy(tmp_path / "none") is None
    assert cgroups.hierarchy(v2_tree(tmp_path / "v2")) == "v2"
    assert cgroups.hierarchy(v1_tree(tmp_path / "v1")) == "v1"
    hybrid = tmp_path / "hybrid"
    v2_tree(hybrid / "unified")
    assert cgroups.hierarchy(hybrid) == "v2" and cgroups.folders("f", 1, hybrid) == [hybrid / "unified" / GROUP /
                                                                                       "f" / "d1"]
    no_memory = tmp_path / "no_memory"
    no_memory.mkdir()
    (no_memory / "cgroup.controllers").write_text("cpu pids\n")
    assert cgroups.hierarchy(no_memory) is None


def test_a_devices_groups_are_below_the_fleet_in_every_hierarchy(tmp_path):
    v1, v2 = v1_tree(tmp_path / "v1"), v2_tree(tmp_path / "v2")
    assert cgroups.folders("f7", 2, v1) == [v1 / c / GROUP / "f7" / "d2" for c in ("cpu", "cpuset", "memory")]
    assert cgroups.folders("f7", None, v2) == [v2 / GROUP / "f7"]
    assert cgroups.folders("f7", 2, tmp_path / "none") == []


def test_creating_a_v2_device_writes_its_quota_memory_and_core_set(tmp_path):
    root = v2_tree(tmp_path / "v2")
    for level in (root / GROUP, root / GROUP / "f"):  # the kernel fills these in each new group
        level.mkdir(parents=True)
        (level / "cgroup.controllers").write_text("cpuset cpu memory\n")
    leaf = root / GROUP / "f" / "d1"
    leaf.mkdir()
    (leaf / "memory.swap.max").write_text("max\n")
    cgroups.create("f", 1, Limits(0.25, 64 << 20, "1"), root)
    assert (leaf / "cpu.max").read_text() == "2500 10000"
    assert (leaf / "memory.max").read_text() == str(64 << 20) and (leaf / "memory.swap.max").read_text() == "0"
    assert (leaf / "cpuset.cpus").read_text() == "1"
    for level in (leaf.parent.parent, leaf.parent):  # each group above a device hands its controllers down
        assert (level / "cgroup.subtree_control").read_text() == "+cpu +cpuset +memory"
    assert {(p / "cpu.weight").read_text() for p in (leaf, leaf.parent, leaf.parent.parent)} == {str(cgroups.WEIGHT)}
    assert cgroups.limits_now("f", 1, root) == Limits(0.25, 64 << 20, "1")


def test_creating_a_v1_device_gives_a_new_cpuset_its_parents_cores(tmp_path):
    root = v1_tree(tmp_path / "v1")
    cgroups.create("f", 3, Limits(0.5, 1 << 30), root)
    cpu = root / "cpu" / GROUP / "f" / "d3"
    assert (cpu / "cpu.cfs_period_us").read_text() == "10000" and (cpu / "cpu.cfs_quota_us").read_text() == "5000"
    assert (cpu / "cpu.shares").read_text() == str(cgroups.WEIGHT * 1024 // 100)
    assert (root / "cpuset" / GROUP / "f" / "d3" / "cpuset.cpus").read_text() == "0-1"
    assert (root / "memory" / GROUP / "f" / "d3" / "memory.limit_in_bytes").read_text() == str(1 << 30)
    assert cgroups.limits_now("f", 3, root) == Limits(0.5, 1 << 30, "0-1")
    assert cgroups.fleets(root) == ["f"]


def test_no_hierarchy_is_one_error_naming_the_root(tmp_path):
    with pytest.raises(DnnpipeError, match=f"testbed: no cgroup hierarchy with cpu and memory controllers under "
                                           f"{tmp_path}"):
        cgroups.create("f", 1, Limits(1.0, 1 << 20), tmp_path)


def test_a_write_the_kernel_refuses_names_the_value_and_the_file(tmp_path):
    root = v2_tree(tmp_path / "v2")
    for level in (root / GROUP, root / GROUP / "f"):
        level.mkdir(parents=True)
        (level / "cgroup.controllers").write_text("cpu memory\n")
    (root / GROUP / "f" / "d1" / "cpu.max").mkdir(parents=True)  # a file no value can be written to
    with pytest.raises(DnnpipeError, match=r"testbed: cannot write '5000 10000' to .*/f/d1/cpu.max: "):
        cgroups.create("f", 1, Limits(0.5, 1 << 20), root)
    with pytest.raises(DnnpipeError, match=r"testbed: cannot write '5' to .*/missing/cpu.max: "):
        cgroups._write(tmp_path / "missing" / "cpu.max", "5")


def test_stats_and_limits_read_back_as_the_kernel_writes_them(tmp_path):
    root = v2_tree(tmp_path / "v2")
    leaf = root / GROUP / "f" / "d2"
    leaf.mkdir(parents=True)
    (leaf / "cpu.stat").write_text("usage_usec 900\nnr_periods 40\nnr_throttled 7\nthrottled_usec 2500000\n")
    (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n")
    (leaf / "memory.peak").write_text("12345\n")
    (leaf / "cpu.max").write_text("max 100000\n")  # no quota: read as 0 cores, never a crash
    (leaf / "memory.max").write_text("max\n")
    (leaf / "cgroup.procs").write_text("11\n12\n")
    (leaf / "child").mkdir()
    (leaf / "child" / "cgroup.procs").write_text("13\n")
    assert cgroups.stats("f", 2, root) == {"nr_periods": 40, "nr_throttled": 7, "throttled_s": 2.5,
                                           "memory_peak_bytes": 12345, "oom_kills": 2}
    assert cgroups.limits_now("f", 2, root) == Limits(0.0, 0, None)
    assert cgroups.limits_now("f", 9, root) is None  # gone
    assert cgroups.pids("f", 2, root) == {11, 12, 13} and cgroups.pids("f", None, root) == {11, 12, 13}
    assert cgroups.pids("other", None, root) == set()
