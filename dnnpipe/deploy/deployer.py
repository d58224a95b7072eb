"""The deployer's job as a library call: ship every stage to its device, then (optionally) start or stop them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import DnnpipeError
from ..layout import config_paths
from ..manifest import Manifest, read_manifest
from ..keygen import create_certificate
from .launch import StageLaunch, StageProbe, launch, launch_plan, model_folder, stop, write_launch_plan
from .registry import devices_for, load_registry
from .ship import DeviceReport, runtime_code, ship_all, uploads_for
from .transport import SshOptions, Transport, transport_for

LAUNCH_PLAN = "launch_plan.json"
DATASET = "dataset.h5"  # in the model's folder on the device (launch.model_folder), as are the results
RESULTS = "results.h5"
Echo = Callable[[str], None]


@dataclass(frozen=True)
class DeployOptions:
    registry: Path
    model_name: str
    model_path: Path = Path("partitioned_submodels")
    config: Path = Path("configurations")
    dry_run: bool = False
    ssh: SshOptions = field(default_factory=SshOptions)
    runtime_code: bool = True
    dataset: Optional[Path] = None  # shipped to the first stage's device
    data_path: Optional[str] = None  # the input path there (default: dataset.h5 in the model's folder)
    output_path: Optional[str] = None  # the results path on the last device (default: results.h5 there too)
    tls: bool = True  # stage links inside mutual TLS (off: each stage gets --no-tls); a missing certificate is made

    @property
    def folder(self) -> Path:
        return self.model_path / self.model_name

    @property
    def models_dir(self) -> str:
        """The models folder's name on every device (the runtime's --model-path there)."""
        return self.model_path.resolve().name

    def device_data_path(self, manifest: Manifest) -> str:
        """The input path on the first device: by default in the model's folder, named as the manifest names the
        model (as the runtime's --model-name, logs and sub-models are; the local folder may be named otherwise)."""
        return self.data_path or f"{model_folder(self.models_dir, manifest.model_name)}/{DATASET}"

    def device_output_path(self, manifest: Manifest) -> str:
        return self.output_path or f"{model_folder(self.models_dir, manifest.model_name)}/{RESULTS}"


@dataclass
class Deployment:
    """What deploy() did: per-device reports, the launch plan, and where it was written."""

    reports: list[DeviceReport]
    launches: list[StageLaunch]
    transports: dict[int, Transport]
    folder: Path  # the partition: its key and manifest prove a launched stage is this pipeline's
    tls: bool = False
    launch_plan_file: Optional[Path] = None

    @property
    def failed(self) -> list[DeviceReport]:
        return [r for r in self.reports if not r.ok]


def _setup(options: DeployOptions) -> tuple[Manifest, list[StageLaunch], dict[int, Transport]]:
    registry = load_registry(options.registry)
    manifest = read_manifest(options.folder)
    devices = devices_for(registry, [s.device for s in manifest.stages], str(options.registry))
    transports = {d.device_id: transport_for(d, options.ssh) for d in devices}
    launches = launch_plan(manifest, devices, options.models_dir, options.device_data_path(manifest),
                           options.device_output_path(manifest), [] if options.tls else ["--no-tls"])
    return manifest, launches, transports


def deploy(options: DeployOptions) -> Deployment:
    """Ship each device its stage's files (hash-checked, skipping what is there); write launch_plan.json when
    every device succeeded."""
    if options.dataset is not None and not options.dataset.is_file():
        raise DnnpipeError(f"{options.dataset}: dataset file not found")
    if options.dataset is not None and options.data_path is not None:
        check_device_path(options.data_path, "--data-path")
    manifest, launches, transports = _setup(options)
    if options.tls and not options.dry_run:
        create_certificate(options.folder)
    models_dir = options.models_dir
    plan_file = config_paths(options.config, options.model_name)[1]
    on_device = model_folder(models_dir, manifest.model_name)
    extra = [(plan_file, f"{on_device}/{plan_file.name}")] if plan_file.is_file() else []
    extra += runtime_code() if options.runtime_code else []
    jobs = []
    for item in launches:
        files = list(extra)
        if item.stage == 1 and options.dataset is not None:
            files.append((options.dataset, options.device_data_path(manifest)))
        jobs.append((transports[item.device.device_id], DeviceReport(item.device, [item.stage]),
                     uploads_for(manifest, options.folder, models_dir, [item.stage], files)))
    deployment = Deployment(ship_all(jobs, dry_run=options.dry_run), launches, transports, options.folder,
                            options.tls)
    if not options.dry_run and not deployment.failed:
        deployment.launch_plan_file = options.folder / LAUNCH_PLAN
        write_launch_plan(deployment.launch_plan_file, launches)
    return deployment


def check_device_path(path: str, what: str) -> None:
    """A file shipped to a device stays inside its remote_dir: relative, no '..', no control characters."""
    parts = path.split("/")
    if path.startswith("/") or ".." in parts or "" in parts or any(p.startswith("-") for p in parts) \
            or any(ord(c) < 32 or c == "\x7f" for c in path):
        raise DnnpipeError(f"{what} {path!r} must be a relative path inside the device folder (no '..', no leading "
                           f"'/' or '-', no control characters)")


def start_stages(deployment: Deployment, wait: float, echo: Echo = print) -> None:
    """Start every stage, last first; each must answer the pipeline-key probe as its own stage before the one
    before it starts, and a failure stops what was started."""
    probe = StageProbe.of(deployment.folder, deployment.tls)
    launch(deployment.launches, deployment.transports, wait, probe, echo)


def stop_stages(options: DeployOptions, echo: Echo = print) -> None:
    """Stop the stages a launch started, by the pid files on each device."""
    _, launches, transports = _setup(options)
    stop(launches, transports, echo)
