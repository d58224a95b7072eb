"""A real OpenSSH server on 127.0.0.1 for the deployer's tests: throw-away host and user keys, own known_hosts.

It has no sftp subsystem, like many small boards: the deployer needs ssh, sh, tar and sha256sum only.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dnnpipe.testbed.local import free_ports
from dnnpipe.testbed.sshd import LOGIN_WITHOUT_RC

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass
class SshServer:
    port: int
    user: str
    root: Path
    user_key: Path
    wrong_key: Path
    ssh_config: Path  # points ssh at our known_hosts
    empty_config: Path  # the same with an empty known_hosts: the host is unknown

    def device(self, device_id: int, remote_dir: Path, **overrides) -> dict:
        return {"device_id": device_id, "host": "127.0.0.1", "user": self.user, "port": self.port,
                "identity_file": str(self.user_key), "remote_dir": str(remote_dir),
                "runtime_port": free_port(), **overrides}


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def free_port() -> int:
    return free_ports(1)[0]


def start_sshd(root: Path):
    if not Path(SSHD).exists():
        if os.environ.get("CI"):
            pytest.fail("sshd is not installed; .ci/run installs openssh-server")
        pytest.skip("sshd not installed (apt-get install openssh-server)")
    host_key, user_key, wrong_key = keygen(root / "host_key"), keygen(root / "user_key"), keygen(root / "wrong_key")
    (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
    port = free_port()
    config = root / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
AuthorizedKeysFile {root / 'authorized_keys'}
PidFile {root / 'sshd.pid'}
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
LogLevel ERROR
{LOGIN_WITHOUT_RC}
""")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=open(root / "sshd.log", "w"))
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {(root / 'sshd.log').read_text()}") from None
            time.sleep(0.1)
    host_public = (root / "host_key.pub").read_text().split()
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_public[0]} {host_public[1]}\n")
    (root / "empty_known_hosts").write_text("")
    configs = []
    for name, known in (("ssh_config", "known_hosts"), ("empty_ssh_config", "empty_known_hosts")):
        # curve25519 alone: the post-quantum default key exchange costs each connection CPU on a shared machine
        (root / name).write_text(f"Host *\n  UserKnownHostsFile {root / known}\n  GlobalKnownHostsFile /dev/null\n"
                                 f"  LogLevel ERROR\n  KexAlgorithms curve25519-sha256\n")
        configs.append(root / name)
    server = SshServer(port, getpass.getuser(), root, user_key, wrong_key, *configs)
    return server, process
