"""Cutting every stage of a plan from the stored whole model, and checking the chain against it."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from ai_edge_litert import schema_py_generated as schema

from ..jsonio import size_text
from ..manifest import Manifest, StageSpec, WholeModel, read_manifest, sha256_file
from .chain import Verification, differences, random_inputs, run_chain, run_whole
from .flatbuffer import OpGraph, cut_submodel, op_graph, read_model
from .plan import CutError, check_cuts, check_stages

WHOLE_FILE = "model.tflite"
# The chain runs the whole model's kernels on the same values, so it is bit-exact on CPU; a delegate that
# fuses operators across a cut (XNNPACK fuses an activation into the operator before it) may round once
# differently at a cut, hence a tolerance a little above float32 rounding rather than zero.
CHAIN_TOLERANCE = 1e-6

Progress = Callable[[str], None]


def store_whole_model(flatbuffer: bytes, folder: Path) -> tuple[str, str]:
    """Write the whole model beside the manifest; its file name and sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / WHOLE_FILE
    path.write_bytes(flatbuffer)
    return path.name, sha256_file(path)


def slice_plan(model: schema.ModelT, whole: WholeModel, units: int, stages: Sequence[Sequence[int]], folder: Path,
               model_name: str, quantize: str, source: str, graph: Optional[OpGraph] = None,
               progress: Optional[Progress] = None) -> Manifest:
    """Cut folder/sub_model_K.tflite for every stage from the whole model; the manifest (not yet written).

    Refuses a plan whose stage ends where the whole model has no tensor (whole.cuts), naming stage and unit.
    """
    check_stages(units, stages, source)
    check_cuts(stages, whole.cuts, source)
    graph = graph or op_graph(model)
    folder.mkdir(parents=True, exist_ok=True)
    flatbuffers = []  # every stage is cut before any file is replaced, so a failure leaves the old plan whole
    for number, (start, end, device) in enumerate(stages, 1):
        started = time.perf_counter()
        inputs, outputs = whole.cuts[start - 1], whole.cuts[end]
        flatbuffers.append(cut_submodel(model, [(t.tensor, t.key) for t in inputs],  # type: ignore[misc]
                                        [(t.tensor, t.key) for t in outputs], graph))  # type: ignore[misc]
        if progress:
            progress(f"stage {number}/{len(stages)}: units {start}-{end} on device {device}: {len(inputs)} in, "
                     f"{len(outputs)} out ({size_text(sum(t.nbytes for t in outputs))}/inference), "
                     f"{len(flatbuffers[-1]) / 1e6:.2f} MB, cut in {(time.perf_counter() - started) * 1000:.0f} ms")
    specs = []
    for number, ((start, end, device), flatbuffer) in enumerate(zip(stages, flatbuffers), 1):
        path = folder / f"sub_model_{number}.tflite"
        partial = path.with_suffix(".tflite.partial")
        partial.write_bytes(flatbuffer)
        partial.replace(path)
        specs.append(StageSpec(number, int(device), (int(start), int(end)), path.name,
                               hashlib.sha256(flatbuffer).hexdigest(), whole.cuts[start - 1], whole.cuts[end]))
    remove_stale_stages(folder, len(stages))
    return Manifest(model_name, units, quantize, tuple(specs), whole_model=whole)


def remove_stale_stages(folder: Path, stages: int) -> None:
    """Sub-models of an earlier plan with more stages."""
    for stale in folder.glob("sub_model_*.tflite"):
        number = stale.stem.rsplit("_", 1)[-1]
        if number.isdigit() and int(number) > stages:
            stale.unlink()


def check_against_whole(manifest: Manifest, folder: Path, samples: int = 2,
                        tolerance: float = CHAIN_TOLERANCE) -> Verification:
    """The chain of sliced stages against the whole model.tflite on the same random inputs."""
    assert manifest.whole_model is not None
    inputs = random_inputs(manifest.inputs, samples)
    expected = run_whole(manifest.whole_model, folder, manifest.units, inputs)
    return Verification(differences(run_chain(manifest, folder, inputs), expected), tolerance)


def reslice(folder: Path, stages: Sequence[Sequence[int]], source: str,
            progress: Optional[Progress] = None) -> Manifest:
    """A new plan for an already partitioned model: cut from folder/model.tflite by its manifest."""
    manifest = read_manifest(folder)
    whole = manifest.whole_model
    if whole is None:
        raise CutError(f"{folder / 'manifest.json'}: no whole model recorded (it was partitioned stage by stage); "
                       f"partition it again to slice new plans")
    if Path(whole.file).name != whole.file or not whole.file.endswith(".tflite"):
        raise CutError(f"{folder / 'manifest.json'}: whole_model.file must be a .tflite file name beside the "
                       f"manifest, got {whole.file!r}")
    path = folder / whole.file
    if sha256_file(path) != whole.sha256:
        raise CutError(f"{path}: sha256 differs from the manifest's whole_model.sha256 (file changed)")
    model = read_model(path)
    graph = op_graph(model)
    check_table(whole, graph, folder / "manifest.json")
    return slice_plan(model, whole, manifest.units, stages, folder, manifest.model_name, manifest.quantize, source,
                      graph, progress)


def check_table(whole: WholeModel, graph: OpGraph, source: Path) -> None:
    """The manifest's cut tensors must be tensors of the whole model, of the shape and type it says."""
    for j, specs in whole.cuts.items():
        for spec in specs:
            index = spec.tensor
            if index is None or not 0 <= index < len(graph.tensors):
                raise CutError(f"{source}: whole_model cut {j}: tensor {spec.name!r} has index {index}, outside "
                               f"0..{len(graph.tensors) - 1} of {whole.file}")
            t = graph.tensors[index]
            if (1, *t.shape[1:]) != spec.shape or t.dtype != spec.dtype or t.constant:
                raise CutError(f"{source}: whole_model cut {j}: tensor {spec.name!r} is {spec.dtype}{list(spec.shape)} "
                               f"but tensor {index} of {whole.file} is {t.dtype}{list(t.shape)}"
                               f"{' (a weight)' if t.constant else ''}")
