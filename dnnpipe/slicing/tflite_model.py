"""A .tflite file as the model: its operators are the units; profile it, partition it, without Keras.

For users who only have a .tflite file (a model zoo file, an int8 model made elsewhere): every cut between
two operators exists, since the file's execution order is a topological order.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..manifest import Manifest, TensorSpec, WholeModel, sha256_file, write_manifest
from .chain import Verification
from .cuts import operator_crossings, operator_cut_table
from .flatbuffer import OpGraph, cut_submodel, op_graph, read_model
from .plan import CutError
from .slicer import WHOLE_FILE, check_against_whole, slice_plan

MIB = float(1 << 20)


def find_tflite(model_path: Path, model_name: str) -> Optional[Path]:
    """NAME.tflite in the folder (or the .tflite file itself): the model when there is no Keras file."""
    if model_path.is_file():
        return model_path if model_path.suffix == ".tflite" else None
    candidate = model_path / f"{model_name}.tflite"
    return candidate if candidate.is_file() else None


def tflite_units(path: Path) -> list[str]:
    """One name per unit (operator), in execution order: its kind and the tensor it produces."""
    graph = op_graph(read_model(path))
    return [f"{kind}:{graph.tensors[outs[0]].name.split(';')[-1] if outs else ''}"
            for kind, (_, outs) in zip(graph.op_names, graph.ops)]


def quantization_of(graph: OpGraph) -> str:
    """What the file is, in --quantize's words: int8 activations, float16 weights, or plain float."""
    if any(t.dtype in ("int8", "uint8") and not t.constant for t in graph.tensors):
        return "int8"
    return "float16" if any(t.dtype == "float16" and t.constant for t in graph.tensors) else "none"


def partition_tflite(model_file: Path, stages: Sequence[Sequence[int]], folder: Path, model_name: str,
                     source: str = "plan", verify_chain: bool = True,
                     progress: Optional[Callable[[str], None]] = print) -> tuple[Manifest, Optional[Verification]]:
    """Cut a .tflite file by plan stages (units = operators) into folder, beside a copy of the whole model."""
    model = read_model(model_file)
    graph = op_graph(model)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / WHOLE_FILE
    if Path(model_file).resolve() != target.resolve():
        shutil.copyfile(model_file, target)
    whole = WholeModel(WHOLE_FILE, sha256_file(target), operator_cut_table(graph))
    manifest = slice_plan(model, whole, len(graph.ops), stages, folder, model_name, quantization_of(graph), source,
                          graph, progress)
    write_manifest(manifest, folder)
    if not verify_chain:
        return manifest, None
    check = check_against_whole(manifest, folder)
    if progress:
        progress(check.describe().replace("verify", "chain vs whole model.tflite:", 1))
    if not check.ok:
        raise CutError(f"{folder}: the sliced chain differs from {model_file} ({check.describe()})")
    return manifest, check


def _cost_inputs(graph: OpGraph, k: int) -> list[int]:
    inputs, _ = graph.ops[k]
    return list(dict.fromkeys(t for t in inputs if not graph.tensors[t].constant))


def profile_tflite(path: Path, repeats: int = 30, warmup: int = 5, num_threads: Optional[int] = None,
                   progress: Optional[Callable[[str], None]] = None):
    """E per unit (operator) and R from its buffers and tensors, as dnnpipe.profile.ModelProfile.

    Each operator is cut into a one-operator sub-model and timed with the interpreter the runtime uses
    (invoke only, inputs in place); an empty sub-model (one tensor passed through) gives the fixed cost
    removed from each, as the Keras profiler does with its probe signature.
    """
    from ..interpreter import load_interpreter
    from ..profile.profiler import ModelProfile, UnitCost, time_invoke
    from .chain import random_inputs

    model = read_model(path)
    graph = op_graph(model)
    say = progress or (lambda _: None)

    def timed(flatbuffer: bytes, specs: list[TensorSpec]) -> float:
        runner = load_interpreter(flatbuffer, num_threads).get_signature_runner()
        values = random_inputs(specs, 1)
        return time_invoke(runner, {s.key: values[s.name] for s in specs}, repeats, warmup)

    def spec(t: int) -> TensorSpec:
        tensor = graph.tensors[t]
        return TensorSpec(f"t{t}", f"t{t}", (1, *tensor.shape[1:]) if tensor.shape else (), tensor.dtype, t)

    first = graph.inputs[0]
    probe = timed(cut_submodel(model, [(first, f"t{first}")], [(first, f"t{first}")], graph), [spec(first)])
    whole_specs = [spec(t) for t in graph.inputs]
    whole = timed(cut_submodel(model, [(t, f"t{t}") for t in graph.inputs], [(t, f"t{t}") for t in graph.outputs],
                               graph), whole_specs)
    counted: set[int] = set()
    units = []
    names = tflite_units(path)
    for k, (inputs, outputs) in enumerate(graph.ops):
        feeds = _cost_inputs(graph, k)
        flatbuffer = cut_submodel(model, [(t, f"t{t}") for t in feeds], [(t, f"t{t}") for t in outputs], graph)
        ms = max(0.0, timed(flatbuffer, [spec(t) for t in feeds]) - probe)
        weights = sum(_bytes(graph, t) for t in dict.fromkeys(inputs) if graph.tensors[t].constant and t not in counted)
        counted.update(inputs)
        produced = sum(_bytes(graph, t) for t in outputs)
        units.append(UnitCost(names[k], ms, weights / MIB, produced / MIB))
        if (k + 1) % 10 == 0 or k + 1 == len(graph.ops):
            say(f"timed {k + 1}/{len(graph.ops)} units")
    crossings = operator_crossings(graph)
    cut_bytes = tuple(sum(_bytes(graph, t) for t in crossings[j]) for j in range(len(graph.ops) + 1))
    return ModelProfile(tuple(units), whole, probe, cut_bytes)


def _bytes(graph: OpGraph, t: int) -> int:
    tensor = graph.tensors[t]
    if tensor.dtype.startswith("type"):
        return 0
    return int(np.prod(tensor.shape, dtype=np.int64)) * np.dtype(tensor.dtype).itemsize


def tflite_config(profile, devices: dict) -> dict:
    """The config for a .tflite model: every cut exists, so model_config.cuts is left out (all cuts)."""
    from ..profile.profiler import config_from

    return config_from(profile, devices)
