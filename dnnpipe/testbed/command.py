"""`python -m dnnpipe run-local`: every stage of a partitioned model on this host, each emulated device in its
own network namespace with a shaped link when it can be (the testbed), else on loopback."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from ..config import load_config
from ..keygen import create_certificate
from ..console import positive_float
from ..layout import config_paths
from ..manifest import read_manifest
from ..runtime.command import add_run_arguments, run_options
from ..runtime.dataio import INPUTS_HELP, RESULTS_HELP
from ..runtime.local import run_local
from .cores import usable_cores
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
