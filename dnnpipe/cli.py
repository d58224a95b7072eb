"""Argument parsers and command bodies shared by the top-level scripts and `python -m dnnpipe`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from .errors import DnnpipeError
from .planfile import PLAN_FILE, format_plan, write_plan
from .planner import ALGORITHMS, plan

CONFIG_FILE = "config.json"


def run_cli(command: Callable[[argparse.Namespace], int], args: argparse.Namespace, prog: str) -> int:
    """Run a command; user errors become one line on stderr and a non-zero exit, never a traceback."""
    try:
        return command(args)
    except DnnpipeError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def config_paths(config: Path, model_name: str) -> tuple[Path, Path]:
    """The config file and where its plan goes: DIR/NAME/config.json, or a JSON file given directly."""
    if config.suffix == ".json" and not config.is_dir():
        return config, config.parent / PLAN_FILE
    folder = config / model_name
    return folder / CONFIG_FILE, folder / PLAN_FILE


# --- model_partitioner.py ---------------------------------------------------------------------

def add_partitioner_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model-path", type=Path, help="folder holding NAME.h5 (or NAME.keras)")
    parser.add_argument("--config", type=Path, required=True,
                        help="folder holding NAME/config.json, or a config JSON file")
    parser.add_argument("--output-dir", type=Path, help="where NAME/sub_model_K.tflite are written")
    parser.add_argument("--model-name", required=True, help="model name (file stem and sub-folder)")
    parser.add_argument("--algorithm", choices=sorted(ALGORITHMS),
                        help="default: bisect (exact, fastest), or links when the config has link bandwidth B")
    parser.add_argument("--plan-only", action="store_true", help="plan, write pipeline_plan.json, stop")
    parser.add_argument("--plan", type=Path, help="partition by this existing plan instead of planning")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="check the sub-model chain against the Keras model (default: on)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest absolute difference --verify accepts (default depends on --quantize)")
    parser.add_argument("--quantize", choices=["none", "float16", "int8"], default="none")
    parser.add_argument("--calibration-data", type=Path,
                        help="HDF5 file with an 'images' dataset for --quantize int8")
    return parser


def partitioner_parser() -> argparse.ArgumentParser:
    return add_partitioner_arguments(argparse.ArgumentParser(
        prog="model_partitioner.py",
        description="Plan the optimal pipeline for a model and cut it into TFLite sub-models."))


def partition_command(args: argparse.Namespace) -> int:
    config_file, plan_file = config_paths(args.config, args.model_name)
    if args.plan_only:
        result = plan(config_file, args.algorithm)
        write_plan(result, plan_file)
        print(format_plan(result))
        print(f"wrote {plan_file}")
        return 0
    if args.model_path is None or args.output_dir is None:
        raise DnnpipeError("--model-path and --output-dir are needed to partition a model "
                           "(or give --plan-only to only plan)")
    from .partition.command import partition_model  # TensorFlow only where a model is cut

    return partition_model(args, config_file, plan_file)


# --- python -m dnnpipe replan ------------------------------------------------------------------

def _assignments(values: list[str] | None, flag: str) -> dict[int, float]:
    result = {}
    for value in values or []:
        device, sep, number = value.partition("=")
        try:
            result[int(device)] = float(number)
        except ValueError:
            raise DnnpipeError(f"{flag} takes DEVICE=VALUE, e.g. 2=0.5, got {value!r}") from None
    return result


def add_replan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", type=Path, required=True, help="folder with NAME/config.json, or the file")
    parser.add_argument("--model-name", default="model")
    parser.add_argument("--plan", type=Path, help="the running plan (default: NAME/pipeline_plan.json)")
    parser.add_argument("--remove", type=int, nargs="+", default=[], metavar="DEVICE", help="devices that left")
    parser.add_argument("--speed", nargs="+", metavar="DEVICE=C", help="devices whose speed changed")
    parser.add_argument("--memory", nargs="+", metavar="DEVICE=MB", help="devices whose free memory changed")
    parser.add_argument("--algorithm", choices=sorted(ALGORITHMS))
    parser.add_argument("--write", action="store_true", help="replace the plan file with the new plan")
    return parser


def replan_command(args: argparse.Namespace) -> int:
    from .planfile import read_stages
    from .planner.replan import ClusterChange, replan

    config_file, plan_file = config_paths(args.config, args.model_name)
    running_file = args.plan or plan_file
    change = ClusterChange(frozenset(args.remove), _assignments(args.speed, "--speed"),
                           _assignments(args.memory, "--memory"))
    result = replan(config_file, read_stages(running_file), change, args.algorithm)
    print(format_plan(result.plan))
    print(result.describe())
    for start, end, device in result.moved:
        print(f"  move: units {start}-{end} to device {device}")
    if args.write:
        write_plan(result.plan, plan_file)
        print(f"wrote {plan_file}")
    return 0


# --- python -m dnnpipe make-model --------------------------------------------------------------

def add_make_model_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .examples import EXAMPLES

    parser.add_argument("--model", choices=sorted(EXAMPLES), default="tiny", help="which example model")
    parser.add_argument("--model-path", type=Path, default=Path("original_models"))
    parser.add_argument("--model-name", help="file stem (default: the --model name)")
    parser.add_argument("--input-size", type=int, help="image height and width")
    parser.add_argument("--dataset", type=Path, help="also write this HDF5 dataset of synthetic images")
    parser.add_argument("--samples", type=int, default=64, help="rows in --dataset")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def make_model_command(args: argparse.Namespace) -> int:
    from .examples import make_dataset, make_model

    path = make_model(args.model, args.model_path / f"{args.model_name or args.model}.h5", args.input_size,
                      args.seed)
    print(f"wrote {path}")
    if args.dataset:
        from .partition.command import load_keras_model

        shape = tuple(load_keras_model(path).inputs[0].shape[1:])
        print(f"wrote {make_dataset(args.dataset, shape, args.samples, args.seed)} ({args.samples} x {shape})")
    return 0


# --- runtime_engine.py and python -m dnnpipe stage / run-local -------------------------------

def add_stage_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--stage", type=int, required=True, help="this process's stage, 1-based")
    parser.add_argument("--model-path", type=Path, required=True, help="folder holding NAME/manifest.json")
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--bind-addr", default="0.0.0.0", help="address to receive the previous stage on")
    parser.add_argument("--bind-port", type=int, help="port to receive on (every stage but the first)")
    parser.add_argument("--next-host", help="the next stage's host (every stage but the last)")
    parser.add_argument("--next-port", type=int)
    parser.add_argument("--data-path", type=Path, help="first stage: HDF5 inputs, dataset 'images'")
    parser.add_argument("--output-path", type=Path, help="last stage: HDF5 results, one dataset per output")
    add_run_arguments(parser)
    parser.add_argument("--emulate-speed", type=float, metavar="C",
                        help="emulate a device of speed C: sleep so that stage time = measured / C")
    return parser


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every stage of a run shares (run-local passes them on to each stage)."""
    parser.add_argument("--num-inputs", type=int, help="inferences to run (cycles the data; default: every row)")
    parser.add_argument("--fps", type=float, help="pace inputs at this rate (default: as fast as taken)")
    parser.add_argument("--log-dir", type=Path, help="per-frame CSV and summary JSON per stage")
    parser.add_argument("--num-threads", type=int, help="interpreter threads")
    parser.add_argument("--delegate", help="delegate library, e.g. libedgetpu.so.1")
    parser.add_argument("--timeout", type=float, default=60.0, help="longest wait for a frame, s (default 60)")
    parser.add_argument("--connect-timeout", type=float, default=60.0,
                        help="longest wait for the neighbouring stages to come up, s (default 60)")
    parser.add_argument("--queue-size", type=int, default=4, help="frames buffered between threads")


def stage_parser() -> argparse.ArgumentParser:
    return add_stage_arguments(argparse.ArgumentParser(
        prog="runtime_engine.py", description="Run one stage of a pipeline; tensors flow between stages over TCP."))


def stage_command(args: argparse.Namespace) -> int:
    from .runtime.stage import Stage, StageOptions

    options = StageOptions(
        stage=args.stage, folder=args.model_path / args.model_name, bind_addr=args.bind_addr,
        bind_port=args.bind_port, next_host=args.next_host, next_port=args.next_port, data_path=args.data_path,
        output_path=args.output_path, num_inputs=args.num_inputs, fps=args.fps, log_dir=args.log_dir,
        num_threads=args.num_threads, delegate=args.delegate, timeout=args.timeout,
        connect_timeout=args.connect_timeout, queue_size=args.queue_size, emulate_speed=args.emulate_speed)
    print(Stage(options).run().describe(), flush=True)
    return 0


def add_run_local_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model-path", type=Path, default=Path("partitioned_submodels"))
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--data-path", type=Path, required=True)
    parser.add_argument("--output-path", type=Path)
    parser.add_argument("--emulate-speed", action="store_true",
                        help="slow each stage to its device's C from the config")
    parser.add_argument("--config", type=Path, default=Path("configurations"),
                        help="folder with NAME/config.json, or the config file (for --emulate-speed)")
    add_run_arguments(parser)
    return parser


def run_local_command(args: argparse.Namespace) -> int:
    from .config import load_config
    from .runtime.local import run_local

    speeds = load_config(config_paths(args.config, args.model_name)[0]).cluster.C if args.emulate_speed else None
    folder = args.model_path / args.model_name
    extra = [f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items()
             if name in ("num_inputs", "fps", "num_threads", "delegate", "timeout", "connect_timeout", "queue_size")
             and value is not None]
    run = run_local(folder, args.data_path, args.output_path, args.log_dir or folder / "logs", speeds, extra)
    print(run.describe())
    return 0


# --- deployer.py -------------------------------------------------------------------------------

def add_deployer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device-registry", type=Path, required=True, help="device_registry.json")
    parser.add_argument("--model-path", type=Path, default=Path("partitioned_submodels"),
                        help="folder holding NAME/manifest.json and the sub-models")
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--config", type=Path, default=Path("configurations"),
                        help="folder with NAME/pipeline_plan.json (shipped along when present)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be sent and run; change nothing")
    parser.add_argument("--accept-new-host-keys", action="store_true",
                        help="trust a device's host key on first contact (default: it must be in known_hosts)")
    parser.add_argument("--ssh-config", type=Path, help="an ssh_config file to use instead of ~/.ssh/config")
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="SSH connect timeout, s")
    parser.add_argument("--no-runtime-code", action="store_true",
                        help="do not ship runtime_engine.py and the dnnpipe package")
    parser.add_argument("--dataset", type=Path, help="an HDF5 input file to ship to the first stage's device")
    parser.add_argument("--data-path", help="input path on the first device (default dataset.h5)")
    parser.add_argument("--output-path", default="results.h5", help="results path on the last device")
    parser.add_argument("--launch", action="store_true", help="start every stage over SSH, last stage first")
    parser.add_argument("--wait", type=float, default=60.0, help="how long --launch waits for each port, s")
    parser.add_argument("--stop", action="store_true", help="stop the stages started by --launch")
    return parser


def deployer_parser() -> argparse.ArgumentParser:
    return add_deployer_arguments(argparse.ArgumentParser(
        prog="deployer.py", description="Ship each stage's sub-model to its device over SSH, verified."))


def deploy_command(args: argparse.Namespace) -> int:
    from .deploy.command import deploy_command as deploy

    return deploy(args)


# --- python -m dnnpipe profile -----------------------------------------------------------------

def add_profile_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model-path", type=Path, default=Path("original_models"))
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--config", type=Path, default=Path("configurations"),
                        help="writes NAME/config.json below this folder (or this .json file)")
    parser.add_argument("--devices", type=Path, help='JSON file {"C": [...], "M": [...]} of the cluster')
    parser.add_argument("--speeds", type=float, nargs="+", metavar="C", help="each device's speed factor")
    parser.add_argument("--memory", type=float, nargs="+", metavar="MB", help="each device's memory, MiB")
    parser.add_argument("--speed-factor-of", type=float, nargs="+", metavar="MS",
                        help="the whole model's time measured on each device, ms: sets C relative to this machine")
    parser.add_argument("--bandwidth", type=float, nargs="+", metavar="MBPS",
                        help="each device's link, Mbit/s: plans then count the time to ship each cut")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per unit (median)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--num-threads", type=int, default=1, help="interpreter threads (default 1)")
    return parser


def profile_command(args: argparse.Namespace) -> int:
    import json

    from .partition.command import find_model, load_keras_model
    from .planfile import dump_json
    from .profile import config_from, describe, device_config, profile_keras_model, progress_line

    device_config(args.devices, args.speeds, args.memory, args.speed_factor_of, None, args.bandwidth)  # fail early
    model = load_keras_model(find_model(args.model_path, args.model_name))
    profile = profile_keras_model(model, args.repeats, args.warmup, args.num_threads, progress_line)
    devices = device_config(args.devices, args.speeds, args.memory, args.speed_factor_of, profile.whole_ms,
                            args.bandwidth)
    config_file = config_paths(args.config, args.model_name)[0]
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(dump_json(config_from(profile, devices)))
    print(describe(profile))
    print(f"devices: C = {json.dumps(devices['C'])}, M = {json.dumps(devices['M'])}")
    print(f"wrote {config_file}")
    return 0


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .demo import add_demo_arguments as add

    return add(parser)


def demo_command(args: argparse.Namespace) -> int:
    from .demo import demo_command as demo

    return demo(args)


SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
                             Callable[[argparse.Namespace], int], str]] = {
    "partition": (add_partitioner_arguments, partition_command,
                  "plan a model's pipeline and cut it into TFLite sub-models (model_partitioner.py)"),
    "deploy": (add_deployer_arguments, deploy_command, "ship the stages to their devices (deployer.py)"),
    "replan": (add_replan_arguments, replan_command,
               "re-plan a running pipeline after devices left, slowed down or lost memory"),
    "stage": (add_stage_arguments, stage_command, "run one pipeline stage (runtime_engine.py)"),
    "run-local": (add_run_local_arguments, run_local_command,
                  "run every stage of a partitioned model as its own process on loopback ports"),
    "profile": (add_profile_arguments, profile_command,
                "measure each unit's time and memory on this machine and write the config"),
    "demo": (add_demo_arguments, demo_command,
             "the whole job on this machine: model, profile, plan, partition, deploy, run, report"),
    "slice": (lambda parser: __import__("dnnpipe.slicing.command", fromlist=["_"]).add_slice_arguments(parser),
              lambda args: __import__("dnnpipe.slicing.command", fromlist=["_"]).slice_command(args),
              "cut the sub-models of a new plan from the stored whole model.tflite, without TensorFlow"),
    "make-model": (add_make_model_arguments, make_model_command,
                   "write an example Keras model (weights=None, fixed seed) and optionally a synthetic dataset"),
}
