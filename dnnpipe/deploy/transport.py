"""How files reach a device: the system OpenSSH client, or a plain copy for "local" devices.

Both follow one contract so a broken transfer never leaves a half file where the runtime loads it:
upload to a temporary name beside the target, check its sha256 on the device, then rename it into
place (atomic on one file system). OpenSSH is used as installed, so the user's ~/.ssh/config, keys,
agent and known_hosts just work; BatchMode means it never prompts.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence

from ..errors import DnnpipeError
from ..manifest import sha256_file
from .registry import Device


class TransportError(DnnpipeError):
    """A device could not be reached or did not do what was asked; the message says what ssh said."""


@dataclass(frozen=True)
class SshOptions:
    connect_timeout: float = 10.0
    command_timeout: float = 600.0
    accept_new_host_keys: bool = False  # trust on first use, only when asked
    ssh_config: Optional[Path] = None  # passed as -F (tests use their own)


@dataclass(frozen=True)
class Upload:
    local: Path
    rel: str  # path below the device's remote_dir
    sha256: str
    private: bool = False  # mode 0600 on the device (the pipeline key)

    @property
    def temporary(self) -> str:
        folder, _, name = self.rel.rpartition("/")
        return f"{folder + '/' if folder else ''}.{name}.part-{secrets.token_hex(4)}"


def temporary_names(uploads: Sequence[Upload]) -> list[tuple[Upload, str]]:
    return [(u, u.temporary) for u in uploads]


class Transport(Protocol):
    """What the deployer and the launcher need from a way of reaching a device."""

    def hashes(self, rels: Sequence[str]) -> dict[str, str]: ...

    def send(self, staged: Sequence[tuple[Upload, str]]) -> dict[str, Optional[str]]: ...

    def start(self, argv: Sequence[str], log_rel: str, pid_rel: str) -> None: ...

    def stop(self, pid_rel: str) -> bool: ...


class LocalTransport:
    """A device on this machine: remote_dir is a local folder."""

    def __init__(self, device: Device):
        self.device = device
        self.root = Path(os.path.expanduser(device.remote_dir))

    def hashes(self, rels: Sequence[str]) -> dict[str, str]:
        return {rel: sha256_file(self.root / rel) for rel in rels if (self.root / rel).is_file()}

    def send(self, staged: Sequence[tuple[Upload, str]]) -> dict[str, Optional[str]]:
        """Copy to temporary names, check, rename; returns rel -> None (ok) or why it failed."""
        results: dict[str, Optional[str]] = {}
        for upload, temporary in staged:
            target, part = self.root / upload.rel, self.root / temporary
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                self.copy(upload.local, part)
                got = sha256_file(part)
                if got != upload.sha256:
                    part.unlink()
                    results[upload.rel] = f"sha256 mismatch after transfer ({got[:12]}...)"
                    continue
                if upload.private:
                    part.chmod(0o600)
                os.replace(part, target)
                results[upload.rel] = None
            except OSError as e:
                results[upload.rel] = e.strerror or str(e)
        return results

    def copy(self, source: Path, destination: Path) -> None:
        shutil.copyfile(source, destination)

    def start(self, argv: Sequence[str], log_rel: str, pid_rel: str) -> None:
        (self.root / log_rel).parent.mkdir(parents=True, exist_ok=True)
        with open(self.root / log_rel, "w") as log:
            process = subprocess.Popen(list(argv), cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        (self.root / pid_rel).write_text(f"{process.pid}\n")

    def stop(self, pid_rel: str) -> bool:
        try:
            pid = int((self.root / pid_rel).read_text())
            os.killpg(pid, signal.SIGTERM)
        except (OSError, ValueError):
            return False
        (self.root / pid_rel).unlink(missing_ok=True)
        return True


def shell_path(remote_dir: str, rel: str = "") -> str:
    """A POSIX shell word for remote_dir/rel; a leading ~ is expanded by the device's shell."""
    path = remote_dir.rstrip("/") + (f"/{rel}" if rel else "")
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


class SshTransport:
    """A device reached with the system's ssh and sftp (one connection per step, three steps a deploy)."""

    def __init__(self, device: Device, options: SshOptions = SshOptions()):
        self.device, self.options = device, options

    def _options(self) -> list[str]:
        o, d = self.options, self.device
        args = ["-F", str(o.ssh_config)] if o.ssh_config else []
        args += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(max(1, o.connect_timeout))}",
                 "-o", f"StrictHostKeyChecking={'accept-new' if o.accept_new_host_keys else 'yes'}",
                 "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-o", f"Port={d.port}"]
        if d.identity_file:
            args += ["-i", os.path.expanduser(d.identity_file), "-o", "IdentitiesOnly=yes"]
        return args

    def run(self, script: str, stdin: Optional[str] = None) -> str:
        """Run a POSIX shell script on the device; its stdout, or TransportError with ssh's reason."""
        command = ["ssh", *self._options(), self.device.address, "sh -c " + shlex.quote(script)]
        return self._call(command, stdin)

    def _call(self, command: list[str], stdin: Optional[str] = None) -> str:
        try:
            result = subprocess.run(command, input=stdin, capture_output=True, text=True,
                                    timeout=self.options.command_timeout)
        except subprocess.TimeoutExpired:
            raise TransportError(f"{command[0]} to {self.device.address}:{self.device.port} took longer than "
                                 f"{self.options.command_timeout:g} s") from None
        except FileNotFoundError:
            raise TransportError(f"'{command[0]}' not found: install the OpenSSH client") from None
        if result.returncode != 0:
            raise TransportError(_reason(result.stderr) or f"{command[0]} exited with {result.returncode}")
        return result.stdout

    def hashes(self, rels: Sequence[str]) -> dict[str, str]:
        folders = sorted({rel.rpartition("/")[0] for rel in rels} - {""})
        root = shell_path(self.device.remote_dir)
        script = (f"mkdir -p {root} {' '.join(shell_path(self.device.remote_dir, f) for f in folders)} && "
                  f"cd {root} && for f in {' '.join(shlex.quote(r) for r in rels)}; do "
                  f'if [ -f "$f" ]; then sha256sum "$f"; fi; done')
        found = {}
        for line in self.run(script).splitlines():
            digest, _, rel = line.partition("  ")
            found[rel.strip()] = digest.strip()
        return found

    def send(self, staged: Sequence[tuple[Upload, str]]) -> dict[str, Optional[str]]:
        if not staged:
            return {}
        self.upload([(upload.local, temporary) for upload, temporary in staged])
        return self.install(staged)

    def upload(self, pairs: Sequence[tuple[Path, str]]) -> None:
        """All files in one sftp session, to the given (temporary) names below remote_dir."""
        base = self.device.remote_dir.rstrip("/")
        base = base[2:] if base.startswith("~/") else ("." if base == "~" else base)  # sftp starts at $HOME
        batch = "".join(f'put "{local}" "{base}/{rel}"\n' for local, rel in pairs)
        self._call(["sftp", *self._options(), "-b", "-", self.device.address], stdin=batch)

    def install(self, staged: Sequence[tuple[Upload, str]]) -> dict[str, Optional[str]]:
        """Check each temporary file's sha256 on the device; rename the good ones, delete the bad ones."""
        lines = ['check() { got=$(sha256sum "$1" 2>/dev/null | cut -d" " -f1); '
                 'if [ "$got" = "$3" ]; then mv -f "$1" "$2" && echo "OK $4"; '
                 'else rm -f "$1"; echo "BAD $4 ${got:-missing}"; fi; }',
                 f"cd {shell_path(self.device.remote_dir)}"]
        for upload, temporary in staged:
            if upload.private:
                lines.append(f"chmod 600 {shlex.quote(temporary)}")
            lines.append(f"check {shlex.quote(temporary)} {shlex.quote(upload.rel)} {upload.sha256} "
                         f"{shlex.quote(upload.rel)}")
        results: dict[str, Optional[str]] = {u.rel: "not confirmed by the device" for u, _ in staged}
        for line in self.run("\n".join(lines)).splitlines():
            status, _, rest = line.partition(" ")
            rel, _, got = rest.partition(" ")
            if status == "OK":
                results[rel] = None
            elif status == "BAD":
                results[rel] = f"sha256 mismatch after transfer ({got[:12]}...)" if got != "missing" else \
                    "file missing after transfer"
        return results

    def start(self, argv: Sequence[str], log_rel: str, pid_rel: str) -> None:
        root = shell_path(self.device.remote_dir)
        folder = shlex.quote(log_rel.rpartition("/")[0] or ".")
        self.run(f"cd {root} || exit 1\nmkdir -p {folder} || exit 1\n"
                 f"nohup {' '.join(shlex.quote(a) for a in argv)} > {shlex.quote(log_rel)} 2>&1 < /dev/null &\n"
                 f"echo $! > {shlex.quote(pid_rel)}")

    def stop(self, pid_rel: str) -> bool:
        root = shell_path(self.device.remote_dir)
        out = self.run(f"cd {root} && if [ -f {shlex.quote(pid_rel)} ]; then kill $(cat {shlex.quote(pid_rel)}) "
                       f"2>/dev/null && echo stopped; rm -f {shlex.quote(pid_rel)}; fi")
        return "stopped" in out


def _reason(stderr: str) -> str:
    """ssh's own words, without the chatter (warnings about added host keys, banners)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()
             and not line.startswith(("Warning: Permanently added", "**"))]
    return "; ".join(lines[-2:])


def transport_for(device: Device, options: SshOptions) -> Transport:
    return LocalTransport(device) if device.is_local else SshTransport(device, options)
