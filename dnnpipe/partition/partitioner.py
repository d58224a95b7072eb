"""The partitioner's job as a library call: load the model, plan (or read a plan), split, verify, write."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from ..config import Config, load_config
from ..errors import DnnpipeError
from ..jsonio import write_json
from ..layout import config_paths
from ..manifest import QUANTIZE, Manifest, write_manifest
from ..keygen import create_link_secrets
from ..planfile import format_plan, read_stages, write_plan
from ..planner import Plan, plan
from ..slicing.chain import Verification
from ..slicing.plan import CutError, check_stages, with_cuts
from ..slicing.tflite_model import partition_tflite, tflite_units
from .graph import analyse
from .load import find_any_model, load_keras_model
from .split import split_model
from .verify import TOLERANCE, verify

Echo = Callable[[str], None]


@dataclass(frozen=True)
class PartitionOptions:
    """What model_partitioner.py is asked to do; `check` refuses a bad combination before any work."""

    config: Path
    model_name: str
    model_path: Optional[Path] = None
    output_dir: Optional[Path] = None
    algorithm: Optional[str] = None
    plan_only: bool = False
    plan: Optional[Path] = None
    verify: bool = True
    tolerance: Optional[float] = None
    quantize: str = "none"
    calibration_data: Optional[Path] = None
    custom_objects: Optional[Path] = None  # a Python file defining the model's custom layers

    def check(self) -> None:
        if self.quantize not in QUANTIZE:
            raise DnnpipeError(f"quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.plan_only:
            return
        if self.model_path is None or self.output_dir is None:
            raise DnnpipeError("--model-path and --output-dir are needed to partition a model "
                               "(or give --plan-only to only plan)")
        if self.quantize == "int8" and self.calibration_data is None:
            raise DnnpipeError("--quantize int8 needs --calibration-data FILE.h5 (dataset 'images')")
        if self.calibration_data is not None and not self.calibration_data.is_file():
            raise DnnpipeError(f"{self.calibration_data}: calibration data file not found")
        if self.plan is not None and not self.plan.is_file():
            raise DnnpipeError(f"{self.plan}: plan file not found")
        if self.tolerance is not None and not self.tolerance > 0:
            raise DnnpipeError(f"--tolerance must be > 0, got {self.tolerance}")


@dataclass(frozen=True)
class PartitionResult:
    plan: Optional[Plan]  # None when the stages came from an existing plan file
    plan_file: Optional[Path]  # where the new plan was written
    manifest: Optional[Manifest]  # None with plan_only
    folder: Optional[Path]


def read_calibration(path: Path, input_names: list[str], limit: int = 200):
    """HDF5 calibration samples: dataset 'images' for a one-input model, else one dataset per input name."""
    import h5py
    import numpy as np

    try:
        with h5py.File(path, "r") as f:
            names = {n: ("images" if len(input_names) == 1 and "images" in f else n) for n in input_names}
            missing = [d for d in names.values() if d not in f]
            if missing:
                raise DnnpipeError(f"{path}: no dataset {missing[0]!r} (have: {', '.join(f.keys())})")
            return {n: np.asarray(f[d][:limit]) for n, d in names.items()}
    except OSError as e:
        raise DnnpipeError(f"{path}: cannot read HDF5 calibration data ({e})") from None


def partition_keras_model(model, stages, folder: Path, model_name: str, source: str, quantize: str = "none",
                          calibration_inputs=None, tolerance: Optional[float] = None,
                          verify_chain: bool = True, echo: Echo = print,
                          slicing: str = "auto") -> tuple[Manifest, Optional[Verification]]:
    """Split a (functional) Keras model by plan stages into folder; verify the chain unless told not to.

    slicing "auto" converts the whole model once and slices every stage from it (falling back, and saying
    so, to one conversion per stage where a cut has no tensor); "never" converts stage by stage."""
    graph, keras_tensors = analyse(model)
    check_stages(graph.U, stages, source)
    calibration = None
    if quantize == "int8":
        if calibration_inputs is None:
            raise DnnpipeError("--quantize int8 needs --calibration-data FILE.h5 (dataset 'images')")
        calibration = calibration_inputs  # the model's inputs: split_model derives what else it needs
    started = time.perf_counter()
    manifest = split_model(graph, keras_tensors, stages, folder, model_name, quantize, calibration, progress=echo,
                           slicing=slicing)
    manifest = replace(manifest, extra={"conversion_seconds": round(time.perf_counter() - started, 3)})
    write_manifest(manifest, folder)  # written before verifying, so a failed chain can be inspected
    create_link_secrets(folder)  # stages authenticate (and, by default, encrypt) their links with them
    if not verify_chain:
        return manifest, None
    tolerance = tolerance if tolerance is not None else TOLERANCE[quantize]
    check = verify(model, manifest, folder, tolerance)
    echo(check.describe())
    manifest = replace(manifest, extra={**manifest.extra, "verification": {
        "max_relative_difference": check.differences, "tolerance": tolerance, "ok": check.ok}})
    write_manifest(manifest, folder)
    if not check.ok:
        raise CutError(f"{folder}: the sub-model chain differs from the Keras model by more than "
                             f"{tolerance:g} (see above); sub-models kept for inspection")
    return manifest, check


def plan_model(options: PartitionOptions, echo: Echo = print, config: Optional[Config] = None) -> tuple[Plan, Path]:
    """Plan the config's model (the file, or `config` when already read) and write pipeline_plan.json beside it."""
    config_file, plan_file = config_paths(options.config, options.model_name)
    result = plan(config if config is not None else config_file, options.algorithm)
    write_plan(result, plan_file)
    echo(format_plan(result))
    echo(f"wrote {plan_file}")
    return result, plan_file


def partition(options: PartitionOptions, echo: Echo = print) -> PartitionResult:
    """The paper's step 1: plan (or read a plan), then cut the model into verified sub-models."""
    options.check()
    if options.plan_only:
        return PartitionResult(*plan_model(options, echo), None, None)
    assert options.model_path is not None and options.output_dir is not None  # check() made sure
    started = time.perf_counter()
    model_file = find_any_model(options.model_path, options.model_name)
    if model_file.suffix == ".tflite":
        return _partition_tflite(options, model_file, started, echo)
    model = load_keras_model(model_file, options.custom_objects)
    graph, _ = analyse(model)
    echo(f"{model_file}: {graph.U} units, inputs {[t.name for t in graph.crossing(0)]}, "
         f"outputs {list(graph.outputs)}")
    calibration_inputs = None
    if options.calibration_data is not None:
        calibration_inputs = read_calibration(options.calibration_data, [t.name for t in graph.crossing(0)])
    new_plan, plan_file, stages, source = _stages(options, graph.U, str(model_file), echo)
    folder = options.output_dir / options.model_name
    manifest, _ = partition_keras_model(model, stages, folder, options.model_name, source, options.quantize,
                                        calibration_inputs, options.tolerance, options.verify, echo)
    if options.plan is None and manifest.whole_model is not None:
        _record_cuts(config_paths(options.config, options.model_name)[0], manifest.whole_model.cuts, echo)
    echo(f"wrote {len(manifest.stages)} sub-models and {folder / 'manifest.json'} in "
         f"{time.perf_counter() - started:.1f} s (conversion {manifest.extra['conversion_seconds']:.1f} s)")
    return PartitionResult(new_plan, plan_file, manifest, folder)


def _stages(options: PartitionOptions, units: int, model: str,
            echo: Echo) -> tuple[Optional[Plan], Optional[Path], list[list[int]], str]:
    """The stages to cut: from --plan, or a new plan of the config (whose U must be the model's)."""
    if options.plan is not None:
        return None, None, read_stages(options.plan), str(options.plan)
    config_file = config_paths(options.config, options.model_name)[0]
    config = load_config(config_file)
    if config.profile.U != units:
        raise CutError(f"{config_file}: model_config.U = {config.profile.U} but {model} has {units} units")
    new_plan, plan_file = plan_model(options, echo, config)
    return new_plan, plan_file, new_plan.stages, str(plan_file)


def _record_cuts(config_file: Path, cuts, echo: Echo) -> None:
    """Write the model's legal cuts into its config, so the next plan cuts only where slicing can."""
    data = json.loads(config_file.read_text())
    updated = with_cuts(data, cuts)
    if updated != data:
        write_json(config_file, updated)
        echo(f"wrote model_config.cuts ({len(updated['model_config'].get('cuts', []))} legal cuts) to {config_file}")


def _partition_tflite(options: PartitionOptions, model_file: Path, started: float, echo: Echo) -> PartitionResult:
    """A .tflite file as the model: its operators are the units, every cut exists, nothing is converted."""
    assert options.output_dir is not None
    units = len(tflite_units(model_file))
    echo(f"{model_file}: {units} units (its operators)")
    new_plan, plan_file, stages, source = _stages(options, units, str(model_file), echo)
    folder = options.output_dir / options.model_name
    manifest, _ = partition_tflite(model_file, stages, folder, options.model_name, source, options.verify, echo)
    create_link_secrets(folder)
    echo(f"wrote {len(manifest.stages)} sub-models and {folder / 'manifest.json'} in "
         f"{time.perf_counter() - started:.1f} s")
    return PartitionResult(new_plan, plan_file, manifest, folder)
