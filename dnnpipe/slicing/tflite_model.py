"""A .tflite file as the model: its operators are the units; partition it without Keras (dnnpipe.profile.tflite
times it).

For users who only have a .tflite file (a model zoo file, an int8 model made elsewhere): every cut between
two operators exists, since the file's execution order is a topological order.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..manifest import Manifest, WholeModel, sha256_file, write_manifest
from .chain import Verification
from .cuts import operator_cut_table
from .flatbuffer import OpGraph, op_graph, read_model
from .plan import CutError
from .slicer import WHOLE_FILE, check_against_whole, slice_plan


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
