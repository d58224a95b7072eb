"""model_partitioner.py and `python -m dnnpipe partition` / `make-model`: arguments in, the library's result out."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from ..console import positive_float, positive_int, script_main
from ..planner import ALGORITHMS
from .partitioner import QUANTIZE, PartitionOptions, partition


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
    parser.add_argument("--tolerance", type=positive_float, default=None,
                        help="largest absolute difference --verify accepts (default depends on --quantize)")
    parser.add_argument("--quantize", choices=QUANTIZE, default="none", help="sub-model precision (default: none)")
    parser.add_argument("--calibration-data", type=Path,
                        help="HDF5 file with an 'images' dataset for --quantize int8")
    parser.add_argument("--custom-objects", type=Path, metavar="FILE",
                        help="Python file defining the model's custom layers (registered before loading)")
    return parser


def partitioner_parser() -> argparse.ArgumentParser:
    return add_partitioner_arguments(argparse.ArgumentParser(
        prog="model_partitioner.py",
        description="Plan the optimal pipeline for a model and cut it into TFLite sub-models."))


def partition_command(args: argparse.Namespace) -> int:
    partition(PartitionOptions(
        config=args.config, model_name=args.model_name, model_path=args.model_path, output_dir=args.output_dir,
        algorithm=args.algorithm, plan_only=args.plan_only, plan=args.plan, verify=args.verify,
        tolerance=args.tolerance, quantize=args.quantize, calibration_data=args.calibration_data,
        custom_objects=args.custom_objects))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return script_main(partitioner_parser(), partition_command, argv)


# --- python -m dnnpipe make-model --------------------------------------------------------------

def add_make_model_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from ..examples import EXAMPLES

    parser.add_argument("--model", choices=sorted(EXAMPLES), default="tiny", help="which example model (default tiny)")
    parser.add_argument("--model-path", type=Path, default=Path("original_models"),
                        help="folder to write NAME.h5 into (default original_models)")
    parser.add_argument("--model-name", help="file stem (default: the --model name)")
    parser.add_argument("--input-size", type=positive_int, help="image height and width")
    parser.add_argument("--dataset", type=Path, help="also write this HDF5 dataset of synthetic images")
    parser.add_argument("--samples", type=positive_int, default=64, help="rows in --dataset (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def make_model_command(args: argparse.Namespace) -> int:
    from ..examples import make_dataset, make_model
    from .load import load_keras_model

    path = make_model(args.model, args.model_path / f"{args.model_name or args.model}.h5", args.input_size,
                      args.seed)
    print(f"wrote {path}")
    if args.dataset:
        shape = tuple(load_keras_model(path).inputs[0].shape[1:])
        print(f"wrote {make_dataset(args.dataset, shape, args.samples, args.seed)} ({args.samples} x {shape})")
    return 0
