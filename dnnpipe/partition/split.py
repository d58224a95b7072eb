"""Write one TFLite sub-model per stage of a plan, and the manifest that describes them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..manifest import Manifest, StageSpec, TensorSpec, sha256_file
from .convert import convert_stage, signature_keys, stage_model
from .graph import PartitionError, UnitGraph

Progress = Callable[[str], None]


def check_stages(graph: UnitGraph, stages: Sequence[Sequence[int]], source: str) -> None:
    """The plan's stages must cover units 1..U in order, each on its own device."""
    expected = 1
    for i, (start, end, _) in enumerate(stages):
        if start != expected or end < start:
            raise PartitionError(f"{source}: stage {i + 1} covers units {start}-{end}, expected it to start at "
                                 f"unit {expected}")
        expected = end + 1
    if expected != graph.U + 1:
        raise PartitionError(f"{source}: the plan covers units 1-{expected - 1} but the model has {graph.U} units")
    devices = [d for _, _, d in stages]
    if len(set(devices)) != len(devices):
        raise PartitionError(f"{source}: a device runs two stages: {devices}")


def split_model(graph: UnitGraph, keras_tensors: dict[str, Any], stages: Sequence[Sequence[int]], folder: Path,
                model_name: str, quantize: str = "none",
                calibration: Optional[dict[str, np.ndarray]] = None,
                progress: Progress = print) -> Manifest:
    """Convert every stage into folder/sub_model_K.tflite; returns the manifest (not yet written)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = signature_keys(t.name for t in graph.tensors)
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
        out_kb = sum(t.nbytes for t in spec.outputs) / 1024
        progress(f"stage {number}/{len(stages)}: units {start}-{end} on device {device}: {len(inputs)} in, "
                 f"{len(outputs)} out ({out_kb:.1f} KB/inference), {len(flatbuffer) / 1e6:.2f} MB, "
                 f"converted in {time.perf_counter() - started:.1f} s")
    for stale in folder.glob("sub_model_*.tflite"):
        if stale.stem.rsplit("_", 1)[-1].isdigit() and int(stale.stem.rsplit("_", 1)[-1]) > len(stages):
            stale.unlink()
    return Manifest(model_name, graph.U, quantize, tuple(specs))


def wire_spec(tensor, keys: dict[str, str]) -> TensorSpec:
    """How a graph tensor travels: its name, signature key, batch-1 shape and dtype."""
    if any(d is None for d in tensor.shape[1:]):
        raise PartitionError(f"tensor {tensor.name!r} has an unknown dimension: {tensor.shape}")
    return TensorSpec(tensor.name, keys[tensor.name], (1, *(int(d) for d in tensor.shape[1:])),
                      np.dtype(tensor.dtype).name)


def intermediate_values(model, keras_tensors: dict[str, Any], names: Sequence[str],
                        inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Values of named graph tensors for a batch of model inputs (int8 calibration per stage)."""
    from ..tfenv import import_tensorflow

    _, keras = import_tensorflow()
    probe = keras.Model(model.inputs, [keras_tensors[n] for n in names])
    feed = [inputs[x._keras_history[0].name] for x in model.inputs]
    values = probe.predict(feed if len(feed) > 1 else feed[0], verbose=0, batch_size=16)
    values = values if isinstance(values, list) else [values]
    return {n: np.asarray(v) for n, v in zip(names, values)}
