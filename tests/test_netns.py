"""testbed/netns.py's parts that need no namespace: names, addresses, argument vectors, modes, one iproute2
command's error. Real namespaces (root and iproute2) are tests/test_testbed.py's."""

import os
import subprocess
import sys

import pytest

from dnnpipe.errors import DnnpipeError
from dnnpipe.testbed import netns


def test_each_device_has_its_own_namespace_address_and_the_same_port():
    bed = netns.Testbed([3, 1, 3], {1: 40.0})
    assert bed.devices == [1, 3]  # each device once, in order
    assert bed.namespace(3) == f"{netns.PREFIX}{os.getpid()}-d3" and bed.hub == f"{netns.PREFIX}{os.getpid()}-hub"
    assert (bed.address(1), bed.address(3)) == (f"{netns.SUBNET}.11", f"{netns.SUBNET}.13")
    assert bed.address(1).startswith("198.18.")  # RFC 2544's benchmarking range, routed nowhere
    assert bed.port(1) == bed.port(2) == netns.PORT


def test_a_stage_runs_inside_its_devices_namespace_as_an_argument_vector():
    bed = netns.Testbed([2])
    argv = ["python", "-m", "dnnpipe", "stage", "--model-name", "a b; rm -rf /"]
    assert bed.command(2, argv) == ["ip", "netns", "exec", bed.namespace(2), *argv]


def test_the_description_names_each_shaped_link():
    assert "links shaped with tbf: device 1 40 Mbit/s" in netns.Testbed([1, 2], {1: 40.0}).describe()
    assert "2 devices" in netns.Testbed([1, 2]).describe() and "not shaped" in netns.Testbed([1, 2]).describe()


def test_only_names_this_module_makes_count_as_its_own():
    owned = netns._OWNED
    assert owned.match(f"{netns.PREFIX}123-hub").group(1) == "123"  # type: ignore[union-attr]
    assert owned.match(f"{netns.PREFIX}123-d7").group(1) == "123"  # type: ignore[union-attr]
    for other in ("dnnpipe-tb-hub", f"{netns.PREFIX}x-d1", f"{netns.PREFIX}12-d1-extra", "docker-ns", "d1"):
        assert owned.match(other) is None, other


def test_a_process_that_is_gone_marks_its_namespaces_stale():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert netns._alive(os.getpid()) and not netns._alive(gone.pid)


@pytest.mark.parametrize("mbps", [0.5, 40, 8000])
def test_tbf_holds_at_least_a_frame_and_a_half_second_of_line_rate(mbps):
    arguments = netns.tbf_arguments(mbps)
    rate, burst, limit = int(arguments[2].removesuffix("bit")), int(arguments[4]), int(arguments[6])
    assert arguments[1] == "rate" and arguments[3] == "burst" and arguments[5] == "limit"
    assert rate == int(mbps * 1e6) and burst >= netns.MTU + 14 and limit >= max(16 << 20, rate // 16)


def test_device_numbers_outside_the_subnet_are_refused_before_anything_is_made():
    with pytest.raises(DnnpipeError, match=r"testbed: devices must be numbered 1..200, got \[0, 1\]"):
        netns.Testbed([0, 1]).__enter__()
    with pytest.raises(DnnpipeError, match="numbered 1..200"):
        netns.Testbed([201]).__enter__()


def test_an_unknown_mode_is_one_error_and_loopback_asked_for_makes_nothing():
    with pytest.raises(DnnpipeError, match="testbed: mode must be one of auto, netns, loopback, got 'vm'"):
        with netns.open_testbed([1], mode="vm"):
            pass
    said: list[str] = []
    with netns.open_testbed([1, 2], {1: 10.0}, mode="loopback", echo=said.append) as bed:
        assert bed is None
    assert said == ["testbed: loopback, same pacing, links not emulated (asked for)"]


def test_a_failing_command_is_one_line_naming_it_and_its_last_words():
    script = "import sys; sys.stderr.write('first\\nRTNETLINK answers: File exists\\n'); sys.exit(2)"
    with pytest.raises(DnnpipeError, match=r"^testbed: .* -c .*: RTNETLINK answers: File exists$"):
        netns.run_ip(sys.executable, "-c", script)
    with pytest.raises(DnnpipeError, match=r"testbed: .*: exit status 3$"):
        netns.run_ip(sys.executable, "-c", "raise SystemExit(3)")
    with pytest.raises(DnnpipeError, match="testbed: /nonexistent/ip netns list: "):
        netns.run_ip("/nonexistent/ip", "netns", "list")
    assert netns.run_ip(sys.executable, "-c", "import sys; print(sys.stdin.read()[::-1])", input="abc") == "cba\n"


def test_why_not_available_matches_what_this_process_may_do():
    reason = netns.why_not_available()
    if os.geteuid() != 0:
        assert reason == "not root"
    else:
        assert reason is None or "install iproute2" in reason
