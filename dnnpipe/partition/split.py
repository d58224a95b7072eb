"""Write one TFLite sub-model per stage of a plan, and the manifest that describes them.

The whole model is converted once and every stage is sliced out of it (dnnpipe.slicing); converting
each stage on its own remains for graphs whose cuts cannot be mapped, chosen automatically and reported.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..jsonio import size_text
from ..manifest import Manifest, StageSpec, TensorSpec, WholeModel, sha256_file
from ..slicing.chain import all_tensor_values, random_inputs
from ..slicing.cuts import mapped_cut_table, match_tensors, signature_keys
from ..slicing.flatbuffer import op_graph, read_model
from ..slicing.plan import CutError, inner_cuts
from ..slicing.slicer import WHOLE_FILE, check_against_whole, remove_stale_stages, slice_plan, store_whole_model
from .convert import convert_stage, stage_model
from .graph import UnitGraph

Progress = Callable[[str], None]
SLICING_MODES = ("auto", "require", "never")  # slice, else convert per stage / slice or fail / per stage only
# Largest difference (relative to max(1, |value|)) at which a TFLite tensor is taken to be a Keras tensor.
MATCH_TOLERANCE = {"none": 1e-4, "float16": 1e-2, "int8": 0.1}


def split_model(graph: UnitGraph, keras_tensors: dict[str, Any], stages: Sequence[Sequence[int]], folder: Path,
                model_name: str, quantize: str = "none",
                calibration: Optional[dict[str, np.ndarray]] = None,
                progress: Progress = print, slicing: str = "auto") -> Manifest:
    """Write folder/sub_model_K.tflite for every stage; returns the manifest (not yet written).

    slicing "auto" converts the whole model once and slices every stage from it, falling back (and saying
    why) to converting each stage when the graph cannot be mapped or the plan ends a stage inside a fused
    group; "require" fails instead; "never" converts each stage.
    """
    if slicing not in SLICING_MODES:
        raise ValueError(f"slicing must be one of {SLICING_MODES}, got {slicing!r}")
    folder.mkdir(parents=True, exist_ok=True)
    keys = signature_keys(t.name for t in graph.tensors)
    if slicing != "never":
        try:
            return slice_from_whole(graph, keras_tensors, stages, folder, model_name, quantize, calibration, keys,
                                    progress)
        except CutError as e:
            if slicing == "require":
                raise
            (folder / WHOLE_FILE).unlink(missing_ok=True)
            progress(f"cannot slice the whole model ({e}); converting each stage instead")
    return convert_stages(graph, keras_tensors, stages, folder, model_name, quantize, calibration, keys, progress)


def whole_model_flatbuffer(graph: UnitGraph, keras_tensors: dict[str, Any], keys: dict[str, str], quantize: str,
                           calibration: Optional[dict[str, np.ndarray]]) -> bytes:
    """The whole model converted once; int8 is calibrated once on the model inputs, with int8 I/O."""
    inputs, outputs = graph.crossing(0), graph.crossing(graph.U)
    representative = None
    if quantize == "int8":
        if calibration is None:
            raise CutError("--quantize int8 needs --calibration-data")
        representative = lambda: ({keys[t.name]: calibration[t.name][i:i + 1] for t in inputs}  # noqa: E731
                                  for i in range(len(calibration[inputs[0].name])))
    return convert_stage(stage_model(keras_tensors, inputs, outputs), inputs, outputs, keys, quantize,
                         representative, integer_io=True)


def keras_cut_table(graph: UnitGraph, keras_tensors: dict[str, Any], keys: dict[str, str], flatbuffer: bytes,
                    quantize: str, samples: int = 1) -> dict[int, tuple[TensorSpec, ...]]:
    """The legal cuts of the Keras units in the converted whole model, mapped by values (not names).

    One random sample is enough: tensors of one shape that agree on every element of a random input are
    the same function (and the chain is checked against the whole model and Keras afterwards anyway).
    """
    flat = op_graph(read_model(flatbuffer))
    specs = [wire_spec(t, keys) for t in graph.crossing(0)]
    inputs = random_inputs(specs, samples)
    computed = [t.name for t in graph.tensors if t.producer > 0]
    reference = {**inputs, **tensor_values(keras_tensors, [t.name for t in graph.crossing(0)], computed, inputs)}
    by_key = dict(zip(flat.signature_inputs, flat.inputs))  # the whole model's own inputs, by signature key
    if set(by_key) != {spec.key for spec in specs}:
        raise CutError(f"the converted model's inputs {sorted(by_key)} are not the model's "
                       f"{sorted(spec.key for spec in specs)}")
    feeds = []
    for i in range(samples):
        feed = {}
        for spec in specs:
            value = inputs[spec.name][i:i + 1]
            quantized = flat.tensors[by_key[spec.key]]
            if quantized.scale and quantized.dtype in ("int8", "uint8"):
                info = np.iinfo(quantized.dtype)
                value = np.clip(np.round(value / quantized.scale + quantized.zero_point), info.min, info.max)
            feed[spec.key] = value.astype(quantized.dtype)
        feeds.append(feed)
    values = all_tensor_values(flatbuffer, [t.index for t in flat.tensors if not t.constant], feeds)
    matches = match_tensors(reference, values, flat, MATCH_TOLERANCE[quantize])
    matches.update({spec.name: by_key[spec.key] for spec in specs})  # inputs are known, not matched by value
    crossings = {j: tuple(wire_spec(t, keys) for t in graph.crossing(j)) for j in range(graph.U + 1)}
    return mapped_cut_table(crossings, matches, flat)


def legal_cuts(graph: UnitGraph, keras_tensors: dict[str, Any], quantize: str = "none",
               calibration: Optional[dict[str, np.ndarray]] = None) -> list[int]:
    """model_config.cuts for a Keras model: the k in 1..U-1 after which a sliced stage may end."""
    keys = signature_keys(t.name for t in graph.tensors)
    flatbuffer = whole_model_flatbuffer(graph, keras_tensors, keys, quantize, calibration)
    return inner_cuts(keras_cut_table(graph, keras_tensors, keys, flatbuffer, quantize), graph.U)


def slice_from_whole(graph: UnitGraph, keras_tensors: dict[str, Any], stages: Sequence[Sequence[int]], folder: Path,
                     model_name: str, quantize: str, calibration: Optional[dict[str, np.ndarray]],
                     keys: dict[str, str], progress: Progress) -> Manifest:
    started = time.perf_counter()
    flatbuffer = whole_model_flatbuffer(graph, keras_tensors, keys, quantize, calibration)
    progress(f"converted the whole model once in {time.perf_counter() - started:.1f} s "
             f"({len(flatbuffer) / 1e6:.2f} MB)")
    return slice_converted(graph, keras_tensors, flatbuffer, stages, folder, model_name, quantize, keys, progress)


def slice_converted(graph: UnitGraph, keras_tensors: dict[str, Any], flatbuffer: bytes,
                    stages: Sequence[Sequence[int]], folder: Path, model_name: str, quantize: str,
                    keys: dict[str, str], progress: Progress) -> Manifest:
    """Map the units onto the converted whole model, store it, cut every stage, check the chain against it."""
    started = time.perf_counter()
    table = keras_cut_table(graph, keras_tensors, keys, flatbuffer, quantize)
    progress(f"{len(table) - 2} of {graph.U - 1} cuts exist in the whole model (mapped in "
             f"{time.perf_counter() - started:.1f} s)")
    name, digest = store_whole_model(flatbuffer, folder)
    manifest = slice_plan(read_model(flatbuffer), WholeModel(name, digest, table), graph.U, stages, folder,
                          model_name, quantize, "the plan", progress=progress)
    check = check_against_whole(manifest, folder)
    progress(check.describe().replace("verify", "chain vs whole model.tflite:", 1))
    if not check.ok:
        raise CutError(f"the sliced chain differs from the whole model ({check.describe()})")
    return manifest


def convert_stages(graph: UnitGraph, keras_tensors: dict[str, Any], stages: Sequence[Sequence[int]], folder: Path,
                   model_name: str, quantize: str, calibration: Optional[dict[str, np.ndarray]],
                   keys: dict[str, str], progress: Progress) -> Manifest:
    """Convert every stage on its own (each int8 stage calibrated on its own inputs, float I/O).

    `calibration` holds the model inputs' samples; each stage's own inputs are computed from them here."""
    if calibration is not None:
        names = sorted({t.name for start, _, _ in stages for t in graph.crossing(start - 1)})
        calibration = tensor_values(keras_tensors, [t.name for t in graph.crossing(0)], names, calibration)
    specs = []
    for number, (start, end, device) in enumerate(stages, 1):
        inputs, outputs = graph.crossing(start - 1), graph.crossing(end)
        started = time.perf_counter()
        model = stage_model(keras_tensors, inputs, outputs)
        representative = None
        if calibration is not None:
            representative = lambda inputs=inputs: (  # noqa: E731
                {keys[t.name]: calibration[t.name][i:i + 1] for t in inputs}
                for i in range(len(next(iter(calibration.values())))))
        flatbuffer = convert_stage(model, inputs, outputs, keys, quantize, representative)
        path = folder / f"sub_model_{number}.tflite"
        path.write_bytes(flatbuffer)
        spec = StageSpec(number, int(device), (int(start), int(end)), path.name, sha256_file(path),
                         tuple(wire_spec(t, keys) for t in inputs), tuple(wire_spec(t, keys) for t in outputs))
        specs.append(spec)
        out_bytes = sum(t.nbytes for t in spec.outputs)
        progress(f"stage {number}/{len(stages)}: units {start}-{end} on device {device}: {len(inputs)} in, "
                 f"{len(outputs)} out ({size_text(out_bytes)}/inference), {len(flatbuffer) / 1e6:.2f} MB, "
                 f"converted in {time.perf_counter() - started:.1f} s")
    remove_stale_stages(folder, len(stages))
    return Manifest(model_name, graph.U, quantize, tuple(specs))


def wire_spec(tensor, keys: dict[str, str]) -> TensorSpec:
    """How a graph tensor travels: its name, signature key, batch-1 shape and dtype."""
    if any(d is None for d in tensor.shape[1:]):
        raise CutError(f"tensor {tensor.name!r} has an unknown dimension: {tensor.shape}")
    return TensorSpec(tensor.name, keys[tensor.name], (1, *(int(d) for d in tensor.shape[1:])),
                      np.dtype(tensor.dtype).name)


def tensor_values(keras_tensors: dict[str, Any], input_names: Sequence[str], names: Sequence[str],
                  inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Values of named graph tensors for a batch of model inputs, by name."""
    from ..tfenv import import_tensorflow

    _, keras = import_tensorflow()
    probe = keras.Model([keras_tensors[n] for n in input_names], [keras_tensors[n] for n in names])
    feed = [inputs[n] for n in input_names]
    if len(feed[0]) <= 4:  # a few samples: one eager call, no tracing (seconds for big models)
        values = probe(feed, training=False)
    else:
        values = probe.predict(feed if len(feed) > 1 else feed[0], verbose=0, batch_size=16)
    values = values if isinstance(values, (list, tuple)) else [values]
    return {n: np.asarray(v) for n, v in zip(names, values)}
