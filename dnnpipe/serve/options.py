"""What serve is asked to do, as one typed value (the command builds it from arguments, benchmarks directly)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..deploy.transport import SshOptions


@dataclass(frozen=True)
class ServeOptions:
    registry: Path
    model_path: Path
    model_name: str
    config: Path
    data_path: Optional[Path]  # the file mode's DATA and OUT; None when a Feed is given (the service)
    output_path: Optional[Path]
    num_inputs: Optional[int] = None
    fps: Optional[float] = None
    resume: bool = False
    window: int = 8  # inputs in flight at most (credits)
    progress_timeout: float = 0.5  # an agent without a heartbeat (every 0.1 s) this long is frozen or cut off
    loading_timeout: float = 3.0  # ... or this long while it receives or loads a sub-model pushed to it
    connect_timeout: float = 30.0  # how long an agent may take to come up; a stall with inputs in flight
    threshold: float = 0.10  # re-plan for speed when the new bottleneck is this much better
    cooldown: float = 3.0  # no re-plan for speed this soon after a switch (hysteresis)
    emulate_speed: bool = False  # each stage emulates its device's C from the config, times emulation_scale
    emulation_scale: float = 1.0
    controller_host: str = "127.0.0.1"  # the address the devices reach this machine at
    ssh: SshOptions = field(default_factory=SshOptions)
    emulate_changes: tuple[tuple[float, int, float], ...] = ()  # (after s, device, C): a device slows down
    max_restarts: int = 3  # epochs that fail without a device to blame, in a row, before giving up
    insecure: bool = False  # links without the pipeline key handshake (agents get --insecure too)
    tls: bool = True  # every link of serve and its agents inside mutual TLS (opt out: --no-tls)
    work_dir: Path = Path("serve_work")  # serve's own files (WORK/NAME/serve_plan.json); the partition is only read

    @property
    def folder(self) -> Path:
        return self.model_path / self.model_name
