"""How files reach a device: the system OpenSSH client, or a plain copy for "local" devices.

Both follow one contract so a broken transfer never leaves a half file where the runtime loads it:
upload to a temporary name beside the target, check its sha256 on the device, then rename it into
place (atomic on one file system). OpenSSH is used as installed, so the user's ~/.ssh/config, keys,
agent and known_hosts just work; BatchMode means it never prompts.

No shell or sftp text is ever built from a value: every remote step is one of the fixed scripts below,
run as `sh -c SCRIPT sh ARG...` with the registry's and manifest's values as its arguments, and the
files travel as a tar stream on ssh's stdin (tar, sh and sha256sum are all a device needs; no sftp).
"""

from __future__ import annotations

import io
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import tarfile
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
    private: bool = False  # a secret (the pipeline key): mode 0600 on the device, from the first byte

    @property
    def temporary(self) -> str:
        folder, _, name = self.rel.rpartition("/")
        return f"{folder + '/' if folder else ''}.{name}.part-{secrets.token_hex(4)}"

    @property
    def mode(self) -> int:
        return 0o600 if self.private else 0o644


def temporary_names(uploads: Sequence[Upload]) -> list[tuple[Upload, str]]:
    return [(u, u.temporary) for u in uploads]


class Transport(Protocol):
    """What the deployer and the launcher need from a way of reaching a device."""

    def hashes(self, rels: Sequence[str]) -> dict[str, str]: ...

    def send(self, staged: Sequence[tuple[Upload, str]]) -> dict[str, Optional[str]]: ...

    def start(self, argv: Sequence[str], log_rel: str, pid_rel: str) -> None: ...

    def alive(self, pid_rel: str) -> bool: ...

    def tail(self, log_rel: str, lines: int = 10) -> str: ...

    def stop(self, pid_rel: str) -> bool: ...


LINK_REFUSED = "a symbolic link on the device where the deployer writes: refused (remove it, then deploy again)"


def refuse_links(root: Path, rel: str) -> None:
    """Nothing is written outside root: each part of rel (a path of ours below root) must not be a symbolic link."""
    path = root
    for part in rel.split("/"):
        path = path / part
        if path.is_symlink():
            raise TransportError(f"{path.relative_to(root).as_posix()}: {LINK_REFUSED}")


class LocalTransport:
    """A device on this machine: remote_dir is a local folder."""

    def __init__(self, device: Device):
        self.device = device
        self.root = Path(os.path.expanduser(device.remote_dir))
        self.started: dict[str, subprocess.Popen] = {}

    def hashes(self, rels: Sequence[str]) -> dict[str, str]:
        return {rel: sha256_file(self.root / rel) for rel in rels
                if (self.root / rel).is_file() and not (self.root / rel).is_symlink()}

    def send(self, staged: Sequence[tuple[Upload, str]]) -> dict[str, Optional[str]]:
        """Copy to temporary names, check, rename; returns rel -> None (ok) or why it failed."""
        for upload, temporary in staged:
            refuse_links(self.root, upload.rel)
            refuse_links(self.root, temporary)
        results: dict[str, Optional[str]] = {}
        for upload, temporary in staged:
            target, part = self.root / upload.rel, self.root / temporary
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                self.copy(upload.local, part, upload.mode)
                got = sha256_file(part)
                if got != upload.sha256:
                    part.unlink()
                    results[upload.rel] = f"sha256 mismatch after transfer ({got[:12]}...)"
                    continue
                os.replace(part, target)
                results[upload.rel] = None
            except OSError as e:
                part.unlink(missing_ok=True)
                results[upload.rel] = e.strerror or str(e)
        return results

    def copy(self, source: Path, destination: Path, mode: int = 0o644) -> None:
        """Created with its final mode, so a secret is never readable by others, even for a moment."""
        with open(source, "rb") as src, open(os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode),
                                             "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.chmod(destination, mode)  # the umask may have narrowed it; the key must be exactly 0600

    def start(self, argv: Sequence[str], log_rel: str, pid_rel: str) -> None:
        refuse_links(self.root, log_rel)
        refuse_links(self.root, pid_rel)
        (self.root / log_rel).parent.mkdir(parents=True, exist_ok=True)
        command = [os.path.expanduser(argv[0]), *argv[1:]]
        with open(self.root / log_rel, "w") as log:
            try:
                process = subprocess.Popen(command, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:
                raise TransportError(f"cannot start {command[0]!r}: {e.strerror or e}") from None
        self.started[pid_rel] = process
        (self.root / pid_rel).write_text(f"{process.pid}\n")

    def alive(self, pid_rel: str) -> bool:
        if pid_rel in self.started:
            return self.started[pid_rel].poll() is None
        try:
            os.kill(int((self.root / pid_rel).read_text()), 0)
        except (OSError, ValueError):
            return False
        return True

    def tail(self, log_rel: str, lines: int = 10) -> str:
        try:
            return "\n".join((self.root / log_rel).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, pid_rel: str) -> bool:
        refuse_links(self.root, pid_rel)
        try:
            pid = int((self.root / pid_rel).read_text())
            os.killpg(pid, signal.SIGTERM)
        except (OSError, ValueError):
            return False
        (self.root / pid_rel).unlink(missing_ok=True)
        if pid_rel in self.started:
            self.started.pop(pid_rel).wait(10)
        return True


# The fixed remote scripts. $1 is always remote_dir ("~" and "~/..." mean the login's home), which `enter`
# makes the working directory; the rest of the arguments are the step's own.
ENTER = ('enter() { case $1 in "~") d=$HOME;; "~/"*) d=$HOME/${1#"~/"};; *) d=$1;; esac; '
         'if [ "$2" = make ]; then mkdir -p -- "$d" || exit 3; fi; cd -- "$d" 2>/dev/null; }\n')
# Nothing is written outside remote_dir: a symbolic link planted where one of our files or folders belongs (a
# path below remote_dir, walked one part at a time) stops the step with one line naming it (LINK_REFUSED).
NOLINKS = ('nolinks() { rest=$1 p=\nwhile [ -n "$rest" ]; do\n'
           '  case $rest in */*) head=${rest%%/*} rest=${rest#*/};; *) head=$rest rest=;; esac\n'
           '  p=${p:+$p/}$head\n'
           '  if [ -L "$p" ]; then printf "%s: %s\\n" "$p" "$LINK_REFUSED" >&2; exit 5; fi\ndone; }\n'
           f'LINK_REFUSED="{LINK_REFUSED}"\n')
HASHES = ENTER + ('enter "$1" || exit 0\nshift\n'
                  'for f do if [ -f "$f" ] && [ ! -L "$f" ]; then sha256sum -- "$f"; fi; done\n')
NEEDS = ('for tool in tar sha256sum; do command -v $tool >/dev/null || '
         '{ echo "$tool is not installed on the device" >&2; exit 4; }; done\n')
# Unpack the stream under temporary names, then check each one's sha256: rename the good ones into place, delete
# the rest (also what a broken stream left), so the device never holds a half file under a real name.
SEND = ENTER + NEEDS + NOLINKS + ('enter "$1" make || exit 3\nshift\n'
                        'i=0; for a do i=$((i + 1)); case $((i % 4)) in 1|2) nolinks "$a";; esac; done\n'
                        'tar -x -o -f - || echo "tar could not unpack everything" >&2\n'
                        'while [ $# -ge 4 ]; do t=$1 r=$2 want=$3 mode=$4; shift 4\n'
                        '  got=$(sha256sum -- "$t" 2>/dev/null | cut -d" " -f1)\n'
                        '  if [ "$got" = "$want" ] && chmod -- "$mode" "$t" && mv -f -- "$t" "$r"; then echo "OK $r"\n'
                        '  else rm -f -- "$t"; echo "BAD $r ${got:-missing}"; fi\ndone\n')
START = ENTER + NOLINKS + ('enter "$1" make || { echo "cannot enter $1" >&2; exit 3; }\nlog=$2 pid=$3; shift 3\n'
                 'nolinks "$log"; nolinks "$pid"\n'
                 'case $1 in "~/"*) p=$HOME/${1#"~/"}; shift; set -- "$p" "$@";; esac\n'
                 'mkdir -p -- "$(dirname -- "$log")" || exit 3\n'
                 'nohup "$@" > "$log" 2>&1 < /dev/null &\necho $! > "$pid"\n')
# A stage that exited may linger as a zombie when nothing reaps it (containers): that is not alive.
ALIVE = ENTER + ('enter "$1" || exit 1\npid=$(cat -- "$2" 2>/dev/null) || exit 1\n'
                 'kill -0 "$pid" 2>/dev/null || exit 1\n'
                 'if [ -r "/proc/$pid/stat" ]; then case $(sed -n "s/.*) //p" "/proc/$pid/stat") in Z*) exit 1;; '
                 'esac; fi\necho alive\n')
RUN = ENTER + ('enter "$1" || { echo "cannot enter $1" >&2; exit 3; }\nshift\n'
               'case $1 in "~/"*) p=$HOME/${1#"~/"}; shift; set -- "$p" "$@";; esac\nexec "$@"\n')
TAIL = ENTER + 'enter "$1" || exit 0\ntail -n "$3" -- "$2" 2>/dev/null || true\n'
STOP = ENTER + NOLINKS + ('enter "$1" || exit 0\nnolinks "$2"\n'
                          'if [ -f "$2" ]; then kill "$(cat -- "$2")" 2>/dev/null && echo stopped; rm -f -- "$2"; fi\n')


class SshTransport:
    """A device reached with the system's ssh (one connection per step: two a deploy, hashes and send)."""

    def __init__(self, device: Device, options: SshOptions = SshOptions()):
        self.device, self.options = device, options

    def _options(self) -> list[str]:
        o, d = self.options, self.device
        args = ["-F", str(o.ssh_config)] if o.ssh_config else []
        args += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(max(1, o.connect_timeout))}",
                 "-o", f"StrictHostKeyChecking={'accept-new' if o.accept_new_host_keys else 'yes'}",
                 "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-p", str(d.port)]
        if d.user:
            args += ["-l", d.user]
        if d.identity_file:
            args += ["-i", os.path.expanduser(d.identity_file), "-o", "IdentitiesOnly=yes"]
        if d.known_hosts:  # quoted (the value is a list of files), '%' as itself (ssh expands %-tokens there)
            known = os.path.expanduser(d.known_hosts).replace("%", "%%")
            args += ["-o", f'UserKnownHostsFile="{known}"', "-o", "GlobalKnownHostsFile=/dev/null"]
        return args

    def argv(self, script: str, *args: str) -> list[str]:
        """The ssh command running a fixed script on the device with remote_dir and `args` as its arguments."""
        remote = shlex.join(["sh", "-c", script, "sh", self.device.remote_dir, *args])
        return ["ssh", *self._options(), "--", self.device.host, remote]

    def run(self, script: str, *args: str, stdin: Optional[bytes] = None, check: bool = True) -> str:
        """Run one of the fixed scripts on the device with remote_dir and `args` as its arguments.

        ssh hands the remote login shell one string, so the vector is quoted for it as a whole; the
        script itself sees every value as a plain argument."""
        command = self.argv(script, *args)
        try:
            result = subprocess.run(command, input=stdin, capture_output=True, timeout=self.options.command_timeout)
        except subprocess.TimeoutExpired:
            raise TransportError(f"ssh to {self.device.address}:{self.device.port} took longer than "
                                 f"{self.options.command_timeout:g} s") from None
        except FileNotFoundError:
            raise TransportError("'ssh' not found: install the OpenSSH client") from None
        stdout, stderr = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
        if check and result.returncode != 0:
            raise TransportError(_reason(stderr) or f"ssh exited with {result.returncode}")
        return stdout

    def hashes(self, rels: Sequence[str]) -> dict[str, str]:
        """The sha256 of each file that exists; read-only, so a dry run can ask too."""
        found = {}
        for line in self.run(HASHES, *rels).splitlines():
            digest, _, rel = line.partition("  ")
            found[rel.strip()] = digest.strip()
        return found

    def send(self, staged: Sequence[tuple[Upload, str]]) -> dict[str, Optional[str]]:
        """All files in one connection: a tar stream in, one OK or BAD line per file out."""
        if not staged:
            return {}
        stream = self.payload([(upload.local, temporary, upload.mode) for upload, temporary in staged])
        args = [a for upload, temporary in staged for a in (temporary, upload.rel, upload.sha256, f"{upload.mode:o}")]
        results: dict[str, Optional[str]] = {u.rel: "not confirmed by the device" for u, _ in staged}
        for line in self.run(SEND, *args, stdin=stream).splitlines():
            status, _, rest = line.partition(" ")
            rel, _, got = rest.partition(" ")
            if status == "OK":
                results[rel] = None
            elif status == "BAD":
                results[rel] = f"sha256 mismatch after transfer ({got[:12]}...)" if got != "missing" else \
                    "file missing after transfer"
        return results

    def payload(self, items: Sequence[tuple[Path, str, int]]) -> bytes:
        return tar_stream(items)

    def start(self, argv: Sequence[str], log_rel: str, pid_rel: str) -> None:
        self.run(START, log_rel, pid_rel, *argv)

    def alive(self, pid_rel: str) -> bool:
        return "alive" in self.run(ALIVE, pid_rel, check=False)

    def tail(self, log_rel: str, lines: int = 10) -> str:
        return self.run(TAIL, log_rel, str(lines), check=False).rstrip("\n")

    def stop(self, pid_rel: str) -> bool:
        return "stopped" in self.run(STOP, pid_rel)


def tar_stream(items: Sequence[tuple[Path, str, int]]) -> bytes:
    """A tar archive of (local file, name, mode): names are ours (checked paths below remote_dir)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for local, name, mode in items:
            info = tar.gettarinfo(str(local), arcname=name)
            info.mode, info.uid, info.gid, info.uname, info.gname = mode, 0, 0, "", ""
            with open(local, "rb") as f:
                tar.addfile(info, f)
    return buffer.getvalue()


def _reason(stderr: str) -> str:
    """ssh's own words, without the chatter (warnings about added host keys, banners), plus what to do."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()
             and not line.startswith(("Warning: Permanently added", "**", "@@@"))]
    reason = "; ".join(lines[-2:])
    if "Host key verification failed" in stderr:
        if "HOST IDENTIFICATION HAS CHANGED" in stderr:
            reason += (" (the device's host key differs from the one in known_hosts: if the device was really "
                       "reinstalled, remove the old key with ssh-keygen -R)")
        else:
            reason += (" (the device's host key is not in known_hosts: add it, or pass --accept-new-host-keys "
                       "to trust it on first contact)")
    return reason


def transport_for(device: Device, options: SshOptions) -> Transport:
    return LocalTransport(device) if device.is_local else SshTransport(device, options)
