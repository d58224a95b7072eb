"""Emulated devices' networks: one Linux network namespace per device, a veth to a bridge, tbf shaping.

Everything lives inside namespaces this process creates (the bridge too, in a hub namespace), so nothing
is added to the host's own network and the test addresses (198.18.0.0/15, set aside for network testing
by RFC 2544) are never routed anywhere else. Names carry a prefix and the creating process's id: a set
left by a killed run (its process gone) is found and removed, with any process still inside, at the next
start. iproute2's `ip` and `tc` are run as argument vectors, never shell text.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Optional, Sequence

from ..errors import DnnpipeError

MODES = ("auto", "netns", "loopback")
PREFIX = "dnnpipe-tb"
SUBNET = "198.18.213"  # host d is SUBNET.(10 + d), /24
PORT = 50000  # every stage listens here: each device has its own address
# Large frames: per-packet work (softirq, bridge, tbf) competes with the stages for the host's cores, and
# at 1500 bytes it slowed the emulated stages 3-7x on 2 cores; at 64 KB headers cost under 0.1% of a link.
MTU = 65000
COMMAND_SECONDS = 10.0
BURST_SECONDS = 0.001  # tbf bucket: 1 ms of line rate, at least one frame (tbf needs that); an idle link
# gives the next transfer that much head start, a busy one (the bottleneck) none
# Send buffers of a device's stages: a link that is the bottleneck holds back the stage before it after
# this much, not after Linux's default 4 MiB (ten frames of 400 KB), so frames in flight stay bounded by
# the stages' own queues and latency is not a backlog's. (Receive buffers keep their defaults: with 64 KB
# frames a small receive window stalls TCP.)
SEND_BUFFER = 256 << 10
QUEUE_SECONDS = 0.5  # tbf queue: half a second of line rate, at least 16 MiB: more than TCP queues (4 MiB)
_OWNED = re.compile(rf"^{re.escape(PREFIX)}(\d+)-(hub|d\d+)$")


def run_ip(*argv: str, input: Optional[str] = None) -> str:
    """One iproute2 command; its error becomes one line naming the command."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_SECONDS, input=input)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DnnpipeError(f"testbed: {' '.join(argv)}: {e}") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise DnnpipeError(f"testbed: {' '.join(argv)}: {reason}")
    return done.stdout


def tbf_arguments(mbps: float) -> list[str]:
    """tbf at mbps Mbit/s: the link model counts A bytes at B Mbit/s, and with 64 KB frames headers add < 0.1%."""
    rate = int(mbps * 1e6)  # bit/s
    burst = max(MTU + 14, int(rate / 8 * BURST_SECONDS))
    limit = max(16 << 20, int(rate / 8 * QUEUE_SECONDS))
    return ["tbf", "rate", f"{rate}bit", "burst", str(burst), "limit", str(limit)]


def why_not_available() -> Optional[str]:
    """None when namespaces can be made here, else the reason in a few words."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found (install iproute2)"
    return None


def namespaces() -> list[str]:
    return [line.split()[0] for line in run_ip("ip", "netns", "list").splitlines() if line.strip()]


def remove_namespace(name: str) -> None:
    """Kill what still runs inside (only our namespaces get here), then delete it."""
    try:
        pids = run_ip("ip", "netns", "pids", name).split()
    except DnnpipeError:
        pids = []
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    run_ip("ip", "netns", "del", name)


def remove_stale() -> list[str]:
    """Namespaces of ours whose creating process is gone (a killed run), removed; their names."""
    stale = []
    for name in namespaces():
        match = _OWNED.match(name)
        if match and not _alive(int(match.group(1))):
            remove_namespace(name)
            stale.append(name)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Testbed:
    """A namespace per emulated device, joined by a bridge; links shaped with tbf at each device's bandwidth.

    Use as a context manager: everything is removed on exit, on error and on Ctrl-C.
    """

    kind = "netns"

    def __init__(self, devices: Sequence[int], link_mbps: Optional[Mapping[int, float]] = None):
        self.devices = sorted(set(devices))
        self.link_mbps = dict(link_mbps or {})
        self.owner = os.getpid()
        self.hub = f"{PREFIX}{self.owner}-hub"
        self.created: list[str] = []
        self.stale: list[str] = []

    def namespace(self, device: int) -> str:
        return f"{PREFIX}{self.owner}-d{device}"

    def address(self, device: int) -> str:
        return f"{SUBNET}.{10 + device}"

    def port(self, stage: int) -> int:
        return PORT

    def command(self, device: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(device), *argv]

    def describe(self) -> str:
        links = ", ".join(f"device {d} {self.link_mbps[d]:.4g} Mbit/s" for d in self.devices if d in self.link_mbps)
        return (f"testbed: netns, {len(self.devices)} devices in their own network namespaces on "
                f"{SUBNET}.0/24, links {'shaped with tbf: ' + links if links else 'not shaped'}")

    def __enter__(self) -> Testbed:
        if any(not 1 <= d <= 200 for d in self.devices):
            raise DnnpipeError(f"testbed: devices must be numbered 1..200, got {self.devices}")
        self.stale = remove_stale()
        try:
            self._add(self.hub)
            run_ip("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            run_ip("ip", "-n", self.hub, "link", "set", "br0", "up")
            for d in self.devices:
                self._device(d)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add(self, name: str) -> None:
        run_ip("ip", "netns", "add", name)
        self.created.append(name)

    def _device(self, d: int) -> None:
        name, port = self.namespace(d), f"h{d}"
        self._add(name)
        run_ip("ip", "-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
        run_ip("ip", "-n", self.hub, "link", "set", port, "mtu", str(MTU), "master", "br0")
        run_ip("ip", "-n", self.hub, "link", "set", port, "up")
        run_ip("ip", "-n", name, "addr", "add", f"{self.address(d)}/24", "dev", "eth0")
        run_ip("ip", "-n", name, "link", "set", "eth0", "mtu", str(MTU), "up")
        run_ip("ip", "-n", name, "link", "set", "lo", "up")
        run_ip("ip", "netns", "exec", name, "tee", "/proc/sys/net/ipv4/tcp_wmem",  # per namespace since Linux 4.15
               input=f"4096 16384 {SEND_BUFFER}")
        if d in self.link_mbps:  # both directions: the device's sending side and the bridge's side toward it
            run_ip("tc", "-n", name, "qdisc", "add", "dev", "eth0", "root", *tbf_arguments(self.link_mbps[d]))
            run_ip("tc", "-n", self.hub, "qdisc", "add", "dev", port, "root", *tbf_arguments(self.link_mbps[d]))

    def close(self) -> None:
        """Remove every namespace this testbed made (their veths and the bridge go with them)."""
        errors = []
        for name in reversed(self.created):
            try:
                remove_namespace(name)
            except DnnpipeError as e:
                errors.append(str(e))
        self.created.clear()
        if errors:
            raise DnnpipeError(errors[0])


@contextmanager
def open_testbed(devices: Sequence[int], link_mbps: Optional[Mapping[int, float]] = None, mode: str = "auto",
                 echo: Callable[[str], None] = print) -> Iterator[Optional[Testbed]]:
    """The devices' testbed, or None for loopback (with the same pacing) when namespaces cannot be made here
    and mode is "auto"; mode "netns" makes that an error, "loopback" asks for loopback."""
    if mode not in MODES:
        raise DnnpipeError(f"testbed: mode must be one of {', '.join(MODES)}, got {mode!r}")
    reason = "asked for" if mode == "loopback" else why_not_available()
    bed = None
    if reason is None:
        try:
            bed = Testbed(devices, link_mbps).__enter__()
        except DnnpipeError as e:
            reason = str(e).removeprefix("testbed: ")
    if bed is None:
        if mode == "netns":
            raise DnnpipeError(f"testbed: cannot make network namespaces ({reason})")
        echo(f"testbed: loopback, same pacing, links not emulated ({reason})")
        yield None
        return
    try:
        if bed.stale:
            echo(f"testbed: removed {len(bed.stale)} namespaces left by a killed run")
        echo(bed.describe())
        yield bed
    finally:
        bed.close()
