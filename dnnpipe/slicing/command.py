"""`python -m dnnpipe slice`: cut the sub-models of a new plan from the stored whole model, no TensorFlow."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from ..manifest import write_manifest
from ..planfile import read_stages
from .plan import CutError
from .slicer import check_against_whole, reslice


def add_slice_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model-path", type=Path, required=True,
                        help="folder holding NAME/manifest.json and NAME/model.tflite (the partitioner's output)")
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--plan", type=Path, required=True, help="pipeline_plan.json of the new plan")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="check the new chain against the whole model.tflite (default: on)")
    return parser


def slice_command(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    folder = args.model_path / args.model_name
    manifest = reslice(folder, read_stages(args.plan), str(args.plan), progress=print)
    if args.verify:
        check = check_against_whole(manifest, folder)
        print(check.describe().replace("verify", "chain vs whole model.tflite:", 1))
        if not check.ok:
            raise CutError(f"{folder}: the sliced chain differs from {manifest.whole_model.file}"  # type: ignore
                           f" by more than {check.tolerance:g}")
        manifest = replace(manifest, extra={"chain_vs_whole": {"max_relative_difference": check.differences,
                                                               "tolerance": check.tolerance, "ok": check.ok}})
    path = write_manifest(manifest, folder)
    print(f"wrote {len(manifest.stages)} sub-models and {path} in {time.perf_counter() - started:.2f} s")
    return 0
