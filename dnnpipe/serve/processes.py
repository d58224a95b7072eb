"""Stage processes on their devices: started in their remote_dir, stopped for sure (frozen ones included)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

from ..deploy.registry import Device
from ..deploy.transport import SshOptions, SshTransport

STOP_SECONDS = 3.0  # how long a stage gets to stop on SIGTERM before SIGKILL


class StageProcess:
    """A `local` device's stage is a child process in its own session (so stopping it stops all it started);
    a remote one is started and stopped over ssh by its pid file, as the deployer's launcher does."""

    def __init__(self, stage: int, device: Device, argv: Sequence[str], ssh: SshOptions):
        self.stage, self.device = stage, device
        self.log_rel, self.pid_rel = f"logs/stage_{stage}.out", f"logs/stage_{stage}.pid"
        self.process: Optional[subprocess.Popen] = None
        self.remote: Optional[SshTransport] = None
        if device.is_local:
            root = Path(os.path.expanduser(device.remote_dir))
            (root / "logs").mkdir(parents=True, exist_ok=True)
            with open(root / self.log_rel, "w") as log:
                self.process = subprocess.Popen(list(argv), cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
            (root / self.pid_rel).write_text(f"{self.process.pid}\n")
        else:
            self.remote = SshTransport(device, ssh)
            self.remote.start(argv, self.log_rel, self.pid_rel)

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process is not None else None

    def exited(self) -> Optional[int]:
        """The exit status once the process ended (None while running, or when remote)."""
        return self.process.poll() if self.process is not None else None

    def terminate(self) -> None:
        """Ask the stage to stop (a frozen one is woken first, so it can see SIGTERM)."""
        if self.remote is not None:
            try:
                self.remote.stop(self.pid_rel)
            except Exception:  # noqa: BLE001 - a lost device cannot be reached to stop; nothing more to do
                pass
        elif self.process is not None and self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGCONT)
            _signal_group(self.process.pid, signal.SIGTERM)

    def wait(self, deadline: float) -> None:
        """Until it exited, or kill it at the deadline; then anything left in its session."""
        if self.process is None:
            return
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait()
        _signal_group(self.process.pid, signal.SIGKILL)


def stop_all(processes: Sequence[StageProcess]) -> None:
    """Every stage at once: all asked first, then each waited for, so stopping K stages costs one grace period."""
    for p in processes:
        p.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    for p in processes:
        p.wait(deadline)


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except OSError:
        pass
