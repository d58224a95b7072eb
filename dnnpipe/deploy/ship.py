"""What each device needs, sent in parallel, skipping what is already there, reported per device."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..manifest import MANIFEST_FILE, Manifest, sha256_file
from ..pipeline_key import CERT_FILE, CERT_KEY_FILE, KEY_FILE
from .closure import device_files
from .launch import model_folder
from .registry import Device
from .transport import Transport, TransportError, Upload, temporary_names

RUNTIME_ROOT = Path(__file__).resolve().parents[2]  # holds runtime_engine.py and dnnpipe/
WHERE_WIDTH = 34


@dataclass
class DeviceReport:
    device: Device
    stages: list[int]
    sent: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    error: Optional[str] = None  # the device could not be reached or refused

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed


def runtime_code() -> list[tuple[Path, str]]:
    """runtime_engine.py and the part of the dnnpipe package a stage imports, so a fresh board can run its
    stage with NumPy, h5py and a lite interpreter only."""
    files = [(RUNTIME_ROOT / "runtime_engine.py", "runtime_engine.py"),
             (RUNTIME_ROOT / "dnnpipe/runtime/__main__.py", "dnnpipe/runtime/__main__.py")]  # the agent's entry
    files += [(RUNTIME_ROOT / rel, rel.as_posix()) for rel in device_files(RUNTIME_ROOT)]
    return [(local, rel) for local, rel in files if local.is_file()]


def uploads_for(manifest: Manifest, folder: Path, models_dir: str, stages: Sequence[int],
                extra: Sequence[tuple[Path, str]] = ()) -> list[Upload]:
    """A device's files: its stages' sub-models, the manifest, the pipeline key and the --tls certificate (when
    present; the keys private), in the runtime's layout, plus extras. Names come from the checked manifest, so
    none leaves `folder`."""
    prefix = model_folder(models_dir, manifest.model_name)
    uploads = [Upload(folder / manifest.stage(k).file, f"{prefix}/{manifest.stage(k).file}",
                      manifest.stage(k).sha256) for k in stages]
    uploads.append(Upload(folder / MANIFEST_FILE, f"{prefix}/{MANIFEST_FILE}", sha256_file(folder / MANIFEST_FILE)))
    for name, private in ((KEY_FILE, True), (CERT_FILE, False), (CERT_KEY_FILE, True)):
        if (folder / name).is_file():
            uploads.append(Upload(folder / name, f"{prefix}/{name}", sha256_file(folder / name), private=private))
    uploads += [Upload(local, rel, sha256_file(local)) for local, rel in extra]
    return uploads


def ship(transport: Transport, report: DeviceReport, uploads: Sequence[Upload], dry_run: bool = False) -> DeviceReport:
    """Compare hashes first, send only what differs, and record the outcome of every file. A dry run asks
    the device too (reading only), so it reports what a real run would send."""
    try:
        present = transport.hashes([u.rel for u in uploads])
        todo = [u for u in uploads if present.get(u.rel) != u.sha256]
        report.skipped = [u.rel for u in uploads if u not in todo]
        if dry_run:
            report.sent = [u.rel for u in todo]
            return report
        results = transport.send(temporary_names(todo))
    except TransportError as e:
        report.error = str(e)
        return report
    report.sent = [rel for rel, problem in results.items() if problem is None]
    report.failed = {rel: problem for rel, problem in results.items() if problem is not None}
    return report


Job = tuple[Transport, DeviceReport, list[Upload]]


def ship_all(jobs: Sequence[Job], dry_run: bool = False, workers: int = 8) -> list[DeviceReport]:
    """Every device at once; one failing device does not stop or hide the others."""
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        return list(pool.map(lambda job: ship(job[0], job[1], job[2], dry_run=dry_run), jobs))


def format_reports(reports: Sequence[DeviceReport], dry_run: bool = False) -> str:
    """Fixed columns whatever the paths: the destination is cut from the left, the result comes last."""
    verb = "would send" if dry_run else "sent"
    rows = [f"{'device':>6}  {'stages':<6} {verb:>10} {'skipped':>7} {'failed':>6}  {'destination':<{WHERE_WIDTH}}  "
            f"result"]
    for r in reports:
        if r.error:
            result = f"FAILED: {r.error}"
        elif r.failed:
            rel, why = next(iter(r.failed.items()))
            result = f"FAILED: {rel}: {why}" + (f" (+{len(r.failed) - 1} more)" if len(r.failed) > 1 else "")
        else:
            result = "dry run" if dry_run else "ok"
        d = r.device
        where = d.remote_dir if d.is_local else f"{d.address}:{d.port}:{d.remote_dir}"
        rows.append(f"{d.device_id:>6}  {','.join(map(str, r.stages)):<6} {len(r.sent):>10} {len(r.skipped):>7} "
                    f"{len(r.failed) or (1 if r.error else 0):>6}  {cut_left(where, WHERE_WIDTH):<{WHERE_WIDTH}}  "
                    f"{result}")
    return "\n".join(rows)


def cut_left(text: str, width: int) -> str:
    """The end of a path is the part that tells devices apart."""
    return text if len(text) <= width else "..." + text[len(text) - width + 3:]
