"""`python -m dnnpipe replan`: the new optimum after devices left, slowed down or lost memory, and what moves."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import DnnpipeError
from ..layout import config_paths
from ..planfile import format_plan, read_stages, write_plan
from ..planner import ALGORITHMS
from ..planner.replan import ClusterChange, replan


def assignments(values: list[str] | None, flag: str) -> dict[int, float]:
    """DEVICE=VALUE pairs, each a device id >= 1 and a finite value > 0."""
    result = {}
    for value in values or []:
        device, _, number = value.partition("=")
        try:
            result[int(device)] = float(number)
        except ValueError:
            raise DnnpipeError(f"{flag} takes DEVICE=VALUE, e.g. 2=0.5, got {value!r}") from None
        if result[int(device)] <= 0 or not math.isfinite(result[int(device)]) or int(device) < 1:
            raise DnnpipeError(f"{flag} {value!r}: the device must be >= 1 and the value a finite number > 0")
    return result


def add_replan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", type=Path, required=True, help="folder with NAME/config.json, or the file")
    parser.add_argument("--model-name", default="model", help="model name, the config's sub-folder (default model)")
    parser.add_argument("--plan", type=Path, help="the running plan (default: NAME/pipeline_plan.json)")
    parser.add_argument("--remove", type=int, nargs="+", default=[], metavar="DEVICE", help="devices that left")
    parser.add_argument("--speed", nargs="+", metavar="DEVICE=C", help="devices whose speed changed")
    parser.add_argument("--memory", nargs="+", metavar="DEVICE=MB", help="devices whose free memory changed")
    parser.add_argument("--algorithm", choices=sorted(ALGORITHMS), help="default: as for planning")
    parser.add_argument("--write", action="store_true", help="replace the plan file with the new plan")
    return parser


def replan_command(args: argparse.Namespace) -> int:
    config_file, plan_file = config_paths(args.config, args.model_name)
    running_file = args.plan or plan_file
    change = ClusterChange(frozenset(args.remove), assignments(args.speed, "--speed"),
                           assignments(args.memory, "--memory"))
    result = replan(config_file, read_stages(running_file), change, args.algorithm)
    print(format_plan(result.plan))
    print(result.describe())
    for start, end, device in result.moved:
        print(f"  move: units {start}-{end} to device {device}")
    if args.write:
        write_plan(result.plan, plan_file)
        print(f"wrote {plan_file}")
    return 0
