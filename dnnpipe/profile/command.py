"""`python -m dnnpipe profile`: measure a model's units on this machine and write the paper's config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from ..config import load_devices, parse_cluster
from ..console import positive_float, positive_int
from ..jsonio import write_json
from ..layout import config_paths
from ..partition.load import find_any_model, load_keras_model
from ..errors import DnnpipeError
from .costs import config_from, describe
from .devices import DeviceProfileOptions, format_outcomes, on_devices
from .profiler import device_config, keras_config, profile_keras_model, profiling_model, progress_line
from .tflite import profile_tflite


def add_profile_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model-path", type=Path, default=Path("original_models"),
                        help="folder holding NAME.h5 (default original_models)")
    parser.add_argument("--model-name", required=True, help="model name (file stem and config sub-folder)")
    parser.add_argument("--config", type=Path, default=Path("configurations"),
                        help="writes NAME/config.json below this folder (or this .json file; default configurations)")
    parser.add_argument("--devices", type=Path, help='JSON file {"C": [...], "M": [...]} of the cluster')
    parser.add_argument("--speeds", type=positive_float, nargs="+", metavar="C", help="each device's speed factor")
    parser.add_argument("--memory", type=float, nargs="+", metavar="MB", help="each device's memory, MiB")
    parser.add_argument("--speed-factor-of", type=positive_float, nargs="+", metavar="MS",
                        help="the whole model's time measured on each device, ms: sets C relative to this machine")
    parser.add_argument("--bandwidth", type=positive_float, nargs="+", metavar="MBPS",
                        help="each device's link, Mbit/s: plans then count the time to ship each cut")
    parser.add_argument("--repeats", type=positive_int, default=30,
                        help="timed runs per unit; E is their median (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per unit before timing (default 5)")
    parser.add_argument("--num-threads", type=positive_int, default=1, help="interpreter threads (default 1)")
    parser.add_argument("--device-registry", type=Path,
                        help="also time every unit on every device of this registry (boards over ssh, the virtual "
                             "fleet, local folders) and write their rows as E_device and C (default: this machine)")
    parser.add_argument("--custom-objects", type=Path, metavar="FILE",
                        help="Python file defining the model's custom layers (registered before loading)")
    return parser


def profile_command(args: argparse.Namespace) -> int:
    devices(args, None)  # every input checked before anything is measured or written
    model_file = find_any_model(args.model_path, args.model_name)
    if model_file.suffix == ".tflite" and args.device_registry is not None:
        raise DnnpipeError(f"{model_file}: per-device profiling (--device-registry) needs the Keras model")
    if model_file.suffix == ".tflite":  # its operators are the units; every cut exists
        profile = profile_tflite(model_file, args.repeats, args.warmup, args.num_threads, progress_line)
        config = config_from(profile, devices(args, profile.whole_ms))  # every cut exists: no cuts
    else:
        model = load_keras_model(model_file, args.custom_objects)
        converted = profiling_model(model, progress_line)
        profile = profile_keras_model(model, args.repeats, args.warmup, args.num_threads, progress_line, converted)
        config = keras_config(model, profile, devices(args, profile.whole_ms))
        if args.device_registry is not None:
            config, outcomes = on_devices(config, converted.flatbuffer, args.device_registry, DeviceProfileOptions(
                args.repeats, args.warmup, args.num_threads), progress_line)
            print(format_outcomes(outcomes))
    config_file = write_json(config_paths(args.config, args.model_name)[0], config)
    print(describe(profile))
    cluster = config["device_config"]
    print(f"devices: C = {json.dumps(cluster['C'])}, M = {json.dumps(cluster['M'])}")
    print(f"wrote {config_file}")
    return 0


def devices(args: argparse.Namespace, whole_ms: Optional[float]) -> dict:
    """The cluster part of the config, checked as the config loader checks it (the file first, by its name)."""
    if args.devices is not None:
        load_devices(args.devices)
    cluster = device_config(args.devices, args.speeds, args.memory, args.speed_factor_of, whole_ms, args.bandwidth)
    parse_cluster(cluster, "--speeds/--memory", prefix="")
    return cluster
