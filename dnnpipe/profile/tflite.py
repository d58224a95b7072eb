"""Profiling a .tflite file whose operators are the units, with the interpreter the runtime uses: no TensorFlow."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..interpreter import load_interpreter
from ..manifest import TensorSpec
from ..slicing.chain import random_inputs
from ..slicing.cuts import operator_crossings
from ..slicing.flatbuffer import OpGraph, cut_submodel, op_graph, read_model
from ..slicing.tflite_model import tflite_units
from .costs import MIB, ModelProfile, UnitCost, time_invoke


def _cost_inputs(graph: OpGraph, k: int) -> list[int]:
    inputs, _ = graph.ops[k]
    return list(dict.fromkeys(t for t in inputs if not graph.tensors[t].constant))


def profile_tflite(path: Path, repeats: int = 30, warmup: int = 5, num_threads: Optional[int] = None,
                   progress: Optional[Callable[[str], None]] = None) -> ModelProfile:
    """E per unit (operator) and R from its buffers and tensors.

    Each operator is cut into a one-operator sub-model and timed with the interpreter the runtime uses
    (invoke only, inputs in place); an empty sub-model (one tensor passed through) gives the fixed cost
    removed from each, as the Keras profiler does with its probe signature.
    """
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
