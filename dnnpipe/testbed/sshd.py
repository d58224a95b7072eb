"""An emulated device's own OpenSSH server: key-only, its own host key, started inside its namespace and groups.

The fleet has one identity (a key pair in the state folder) that every device's server accepts, and one
known_hosts file holding every device's host key, so the device registry reaches the fleet as it reaches boards:
strict host key checking, no trust on first use. Programs run as argument vectors; the config is written from
checked values only (paths of the state folder, addresses the fleet chose).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

from ..errors import DnnpipeError

SSHD = "/usr/sbin/sshd"
# A board's logins run its own startup files, never the workstation's. Bash sources ~/.bashrc for a command from
# sshd only as the top-level shell; with SHLVL=1 in the session it counts itself at level 2 and skips it. The
# workstation's ~/.bashrc may run `pyenv init`, whose shim rehash takes a lock file: a device powered off (or over
# its memory) mid-login leaves the lock behind, and every later login of every device waits 60 s for it.
LOGIN_WITHOUT_RC = "SetEnv SHLVL=1"
START_SECONDS = 15.0


def sshd_path() -> Optional[str]:
    found = shutil.which("sshd") or SSHD
    return found if Path(found).exists() else None


def keygen(path: Path) -> Path:
    """An ed25519 key pair without a passphrase at path (and path.pub), made once."""
    if not path.exists():
        try:
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dnnpipe-fleet", "-f", str(path)],
                           check=True, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            raise DnnpipeError(f"testbed: ssh-keygen could not make {path}: {e}") from None
    return path


def config_text(address: str, host_key: Path, authorized_keys: Path, pid_file: Path) -> str:
    for value in (str(host_key), str(authorized_keys), str(pid_file)):
        if any(c in value for c in "\n\r\"") or value != value.strip():
            raise DnnpipeError(f"testbed: the state folder's path {value!r} cannot go into an sshd config "
                               f"(quotes, newlines or surrounding spaces); choose another --state")
    return "\n".join([f"ListenAddress {address}", "Port 22", f'HostKey "{host_key}"',
                      f'AuthorizedKeysFile "{authorized_keys}"', f'PidFile "{pid_file}"', "StrictModes no",
                      "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
                      "PermitRootLogin prohibit-password", "X11Forwarding no", "PrintMotd no", "LogLevel ERROR",
                      "MaxStartups 64", LOGIN_WITHOUT_RC, ""])


def known_hosts_line(address: str, host_key: Path) -> str:
    kind, key = Path(f"{host_key}.pub").read_text().split()[:2]
    return f"{address} {kind} {key}\n"


def start(namespace: str, config: Path, log: Path, join: Callable[[], None]) -> None:
    """sshd inside the namespace and, through `join` run in the child before exec, inside the device's groups;
    it detaches and writes its pid file."""
    binary = sshd_path()
    if binary is None:
        raise DnnpipeError("testbed: sshd not found (install openssh-server)")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege separation folder
    try:
        done = subprocess.run(["ip", "netns", "exec", namespace, binary, "-f", str(config), "-E", str(log)],
                              preexec_fn=join, capture_output=True, text=True, timeout=START_SECONDS,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        raise DnnpipeError(f"testbed: sshd in {namespace} did not start: {e}") from None
    if done.returncode != 0:
        reason = (done.stderr.strip() or _tail(log) or f"exit status {done.returncode}").splitlines()[-1]
        raise DnnpipeError(f"testbed: sshd in {namespace} did not start: {reason}")


def wait_until_listening(address: str, log: Path, seconds: float = START_SECONDS) -> None:
    """Until sshd greets a connection (its banner), not only until the kernel accepts one: a connection the kernel
    took sshd may fork for later, after the board was reported up (a check of what runs on it then saw sshd's
    child for that probe)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((address, 22), timeout=1) as probe:
                if probe.recv(4, socket.MSG_WAITALL) == b"SSH-":
                    return
                raise OSError("no SSH banner")
        except OSError as e:
            if time.monotonic() > deadline:
                raise DnnpipeError(f"testbed: sshd on {address} does not accept connections ({e}); "
                                   f"{_tail(log)}") from None
            time.sleep(0.1)


def running_pid(pid_file: Path, members: set[int]) -> Optional[int]:
    """The device's sshd from its pid file, only when that pid is one of `members` (the processes in the device's
    groups): after a crash or a reboot the file may name a pid the kernel gave to an unrelated process."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid in members else None


def stop(pid_file: Path, members: set[int]) -> None:
    """Kill the device's sshd (when the pid file names one of `members`) and delete the pid file."""
    pid = running_pid(pid_file, members)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    pid_file.unlink(missing_ok=True)


def _tail(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""
