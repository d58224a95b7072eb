"""deployer.py and `python -m dnnpipe deploy`: arguments in, the deployment's table and launch plan out."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from ..console import positive_float, script_main
from ..errors import DnnpipeError
from ..runtime.command import use_tls
from .deployer import DeployOptions, deploy, start_stages, stop_stages
from .launch import format_launch_plan
from .ship import format_reports
from .transport import SshOptions


def add_deployer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device-registry", type=Path, required=True,
                        help="device_registry.json: where each device is and how to reach it (required)")
    parser.add_argument("--model-path", type=Path, default=Path("partitioned_submodels"),
                        help="folder holding NAME/manifest.json and the sub-models (default: %(default)s)")
    parser.add_argument("--model-name", required=True, help="model name, a sub-folder of --model-path (required)")
    parser.add_argument("--config", type=Path, default=Path("configurations"),
                        help="folder with NAME/pipeline_plan.json, shipped along when present (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="ask each device what it has and print what a real run would send; change nothing "
                             "(default: off)")
    parser.add_argument("--accept-new-host-keys", action="store_true",
                        help="trust a device's host key on first contact (default: off, it must be in known_hosts)")
    parser.add_argument("--ssh-config", type=Path,
                        help="an ssh_config file to use instead of ~/.ssh/config (default: ssh's own)")
    parser.add_argument("--connect-timeout", type=positive_float, default=10.0,
                        help="SSH connect timeout, s (default: %(default)g)")
    parser.add_argument("--no-runtime-code", action="store_true",
                        help="do not ship runtime_engine.py and the dnnpipe runtime (default: ship them)")
    parser.add_argument("--dataset", type=Path,
                        help="an HDF5 input file to ship to the first stage's device: dataset 'images' for a "
                             "one-input model, else one dataset per input name (default: none)")
    parser.add_argument("--data-path",
                        help="input path on the first device, relative to its remote_dir (default: MODELS/NAME/"
                             "dataset.h5, in the model's own folder there: MODELS is --model-path's last part)")
    parser.add_argument("--output-path",
                        help="results path on the last device, relative to its remote_dir (default: "
                             "MODELS/NAME/results.h5; logs go to MODELS/NAME/logs, so models deployed to one device "
                             "stay apart)")
    parser.add_argument("--launch", action="store_true",
                        help="after shipping, start every stage, last stage first (default: off)")
    parser.add_argument("--wait", type=positive_float, default=60.0,
                        help="how long --launch waits for each stage to answer on its port as that stage (a "
                             "probe with the pipeline key), s; a stage that exits fails at once (default: %(default)g)")
    parser.add_argument("--stop", action="store_true", help="stop the stages started by --launch (default: off)")
    parser.add_argument("--no-tls", action="store_true",
                        help="run every stage with --no-tls: links without TLS, so without integrity after the key "
                             "handshake (default: TLS; ships pipeline.crt and its key, made here with openssl if "
                             "missing)")
    parser.add_argument("--tls", action="store_true",
                        help="accepted for old scripts: TLS is the default now (default: on; see --no-tls)")
    return parser


def deployer_parser() -> argparse.ArgumentParser:
    return add_deployer_arguments(argparse.ArgumentParser(
        prog="deployer.py", description="Ship each stage's sub-model to its device over SSH, verified."))


def deploy_options(args: argparse.Namespace) -> DeployOptions:
    return DeployOptions(
        registry=args.device_registry, model_name=args.model_name, model_path=args.model_path, config=args.config,
        dry_run=args.dry_run, ssh=SshOptions(connect_timeout=args.connect_timeout,
                                             accept_new_host_keys=args.accept_new_host_keys,
                                             ssh_config=args.ssh_config),
        runtime_code=not args.no_runtime_code, dataset=args.dataset, data_path=args.data_path,
        output_path=args.output_path, tls=use_tls(args))


def deploy_command(args: argparse.Namespace) -> int:
    options = deploy_options(args)
    if args.stop:
        stop_stages(options)
        return 0
    deployment = deploy(options)
    print(format_reports(deployment.reports, options.dry_run))
    if deployment.failed:
        raise DnnpipeError(f"{len(deployment.failed)} of {len(deployment.reports)} devices failed: "
                           f"{', '.join(str(r.device.device_id) for r in deployment.failed)} (see the table above)")
    print(format_launch_plan(deployment.launches))
    if deployment.launch_plan_file is not None:
        print(f"wrote {deployment.launch_plan_file}")
    if args.launch and not options.dry_run:
        start_stages(deployment, args.wait)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return script_main(deployer_parser(), deploy_command, argv)
