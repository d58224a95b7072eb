"""deployer.py's job: ship every stage to its device, then print (and optionally run) the launch plan."""

from __future__ import annotations

import argparse

from ..cli import config_paths
from ..errors import DnnpipeError
from ..manifest import read_manifest
from .launch import format_launch_plan, launch, launch_plan, stop, write_launch_plan
from .registry import devices_for, load_registry
from .ship import DeviceReport, format_reports, runtime_code, ship_all, uploads_for
from .transport import SshOptions, transport_for

LAUNCH_PLAN = "launch_plan.json"
DATASET = "dataset.h5"


def deploy_command(args: argparse.Namespace) -> int:
    registry = load_registry(args.device_registry)
    folder = args.model_path / args.model_name
    manifest = read_manifest(folder)
    devices = devices_for(registry, [s.device for s in manifest.stages], str(args.device_registry))
    options = SshOptions(connect_timeout=args.connect_timeout, accept_new_host_keys=args.accept_new_host_keys,
                         ssh_config=args.ssh_config)
    transports = {d.device_id: transport_for(d, options) for d in devices}
    models_dir = args.model_path.resolve().name
    data_path = args.data_path or DATASET
    launches = launch_plan(manifest, devices, models_dir, data_path, args.output_path)
    if args.stop:
        stop(launches, transports)
        return 0

    plan_file = config_paths(args.config, args.model_name)[1]
    extra = [(plan_file, f"{models_dir}/{args.model_name}/{plan_file.name}")] if plan_file.is_file() else []
    extra += [] if args.no_runtime_code else runtime_code()
    jobs = []
    for k, device in enumerate(devices, 1):
        files = list(extra)
        if k == 1 and args.dataset is not None:
            if not args.dataset.is_file():
                raise DnnpipeError(f"{args.dataset}: dataset file not found")
            files.append((args.dataset, data_path))
        jobs.append((transports[device.device_id], DeviceReport(device, [k]),
                     uploads_for(manifest, folder, models_dir, [k], files)))
    reports = ship_all(jobs, dry_run=args.dry_run)
    print(format_reports(reports, args.dry_run))
    print(format_launch_plan(launches))
    if not args.dry_run:
        write_launch_plan(folder / LAUNCH_PLAN, launches)
        print(f"wrote {folder / LAUNCH_PLAN}")
    failed = [r for r in reports if not r.ok]
    if failed:
        raise DnnpipeError(f"{len(failed)} of {len(reports)} devices failed: "
                           f"{', '.join(str(r.device.device_id) for r in failed)} (see the table above)")
    if args.launch and not args.dry_run:
        launch(launches, transports, args.wait)
    return 0
