"""`python -m dnnpipe run-local`: every stage of a partitioned model on this host, each emulated device in its
own network namespace with a shaped link when it can be (the testbed), else on loopback; `python -m dnnpipe
testbed`: the virtual fleet, emulated boards reached over ssh."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from ..config import load_config
from ..keygen import create_certificate
from ..console import positive_float
from ..errors import DnnpipeError
from ..layout import config_paths
from ..manifest import read_manifest
from ..runtime.command import add_run_arguments, run_options
from ..runtime.dataio import INPUTS_HELP, RESULTS_HELP
from . import fleet
from .cores import usable_cores
from .local import run_local
from .netns import MODES, open_testbed
from .pacing import emulation, emulation_scale


def add_run_local_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model-path", type=Path, default=Path("partitioned_submodels"),
                        help="folder holding NAME/manifest.json (default partitioned_submodels)")
    parser.add_argument("--model-name", required=True, help="model name (sub-folder of --model-path)")
    parser.add_argument("--data-path", type=Path, required=True, help=INPUTS_HELP)
    parser.add_argument("--output-path", type=Path, help=f"written by the last stage: {RESULTS_HELP}")
    parser.add_argument("--emulate-speed", action="store_true",
                        help="pace each stage to its device's planned time from the config, and shape links to B")
    parser.add_argument("--config", type=Path, default=Path("configurations"),
                        help="folder with NAME/config.json, or the config file (for --emulate-speed)")
    parser.add_argument("--scale", type=positive_float,
                        help="emulate every speed and bandwidth x SCALE (default: fit the usable cores)")
    parser.add_argument("--testbed", choices=MODES, default="auto",
                        help="each device in its own network namespace with a shaped link (netns; needs root "
                             "and iproute2), on loopback, or netns when possible (auto, the default)")
    add_run_arguments(parser)
    return parser


def run_local_command(args: argparse.Namespace) -> int:
    folder = args.model_path / args.model_name
    stages = [[*s.units, s.device] for s in read_manifest(folder).stages]
    pace: Optional[list[float]] = None
    links: Optional[dict[int, float]] = None
    devices = [device for _, _, device in stages]
    if args.emulate_speed:
        config = load_config(config_paths(args.config, args.model_name)[0])
        emulated = emulation(config, stages, args.scale or emulation_scale(config, usable_cores()))
        pace = emulated.pace_ms()
        if emulated.link_mbps is not None:
            links = {d: emulated.link_mbps[d - 1] for d in devices}
        print(f"emulated cluster: every speed and bandwidth x {emulated.scale:.3g}; predicted "
              f"{emulated.throughput:.1f} inferences/s")
    options = run_options(args)
    if options.tls and not options.insecure:
        create_certificate(folder)  # when the partitioner could not (no openssl there)
    with open_testbed(devices, links, args.testbed) as bed:
        run = run_local(folder, args.data_path, args.output_path, args.log_dir or folder / "logs", pace,
                        options, bed)
    print(run.describe())
    return 0


def add_testbed_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`testbed up|status|down|fault`: the virtual fleet (dnnpipe.testbed.fleet)."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="up|status|down|fault")

    def state(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--state", type=Path, default=fleet.DEFAULT_STATE,
                         help=f"the fleet's state folder: keys, sshd configs, each device's folder "
                              f"(default {fleet.DEFAULT_STATE}, under the current folder)")
        return sub

    up = state(actions.add_parser("up", help="one emulated board per device: namespace, shaped link, CPU quota, "
                                             "memory limit and its own sshd; writes the device registry"))
    up.add_argument("--cluster", type=Path, required=True, help='JSON {"C": [...], "M": [...], "B": [...]}')
    up.add_argument("--registry", type=Path, required=True, help="the device registry to write (reaches the fleet "
                                                                 "over ssh)")
    up.add_argument("--scale", type=positive_float,
                    help=f"every speed and bandwidth x SCALE: C x SCALE cores (default: the quotas add up to "
                         f"{fleet.HOST_SHARE:.0%} of the usable cores, at most x1)")
    up.add_argument("--no-cpuset", action="store_true",
                    help="do not keep a device of at most one core on one core (default: pinned)")
    up.add_argument("--runtime-mb", type=positive_float, default=fleet.RUNTIME_MB,
                    help="memory for each device's python, interpreter and sshd on top of M, MiB (default %(default)g)")
    status = state(actions.add_parser("status", help="each device: namespace, interface, address, limits, state"))
    status.add_argument("--json", action="store_true", help="as JSON")
    down = state(actions.add_parser("down", help="remove the fleet (also what killed runs left)"))
    down.add_argument("--all", action="store_true", help="every fleet on this host, whatever its state folder")
    fault = state(actions.add_parser("fault", help="change one device while things run"))
    fault.add_argument("device", type=int, help="device_id")
    fault.add_argument("fault", choices=("cut", "heal", "poweroff", "slow"),
                       help="cut or heal its link (heal also powers it on), power it off, or slow it to C")
    fault.add_argument("speed", type=positive_float, nargs="?", help="the new C (for slow)")
    return parser


def testbed_command(args: argparse.Namespace) -> int:
    if args.action == "up":
        built = fleet.up(args.cluster, args.registry, args.state, args.scale, not args.no_cpuset, args.runtime_mb)
        print(fleet.format_status(*fleet.status(args.state)))
        print(f"wrote {args.registry} (ssh as {built.user} with {args.state / fleet.IDENTITY}, host keys in "
              f"{args.state / fleet.KNOWN_HOSTS})")
    elif args.action == "status":
        shape, rows = fleet.status(args.state)
        print(json.dumps({"fleet": shape.fleet_id, "scale": shape.scale, "devices": rows}, indent=2) if args.json
              else fleet.format_status(shape, rows))
    elif args.action == "down":
        removed = fleet.down(args.state, args.all)
        print(f"removed fleet {', '.join(removed)}" if removed else "no fleet to remove")
    else:
        if args.fault == "slow" and args.speed is None:
            raise DnnpipeError("testbed fault DEVICE slow C: give the new speed C")
        print(fleet.fault(args.state, args.device, args.fault, args.speed))
    return 0
