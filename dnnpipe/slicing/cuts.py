"""Legal cuts of a TFLite model: which tensors cross the cut after each unit, when such tensors exist.

Two kinds of units. A .tflite file alone has its operators as units (in execution order, which is a
topological order, so every cut exists). A Keras model has its layers as units, and the converter fuses
some of them (Conv2D + BatchNormalization + ReLU become one operator): the cut after a layer inside a fused
group has no tensor to cut at. Which Keras tensor is which TFLite tensor is decided numerically: the same
inputs run through both, and a Keras tensor maps to the TFLite tensor of its shape whose values match.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from ..manifest import TensorSpec
from .flatbuffer import OpGraph
from .plan import CutError


def signature_keys(names: Iterable[str]) -> dict[str, str]:
    """A stable, valid signature key for every tensor name (TensorFlow restricts the characters)."""
    keys: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        key = re.sub(r"[^A-Za-z0-9_]", "_", name)
        key = key if key[:1].isalpha() else f"t_{key}"
        base, n = key, 1
        while key in used:
            n += 1
            key = f"{base}_{n}"
        keys[name], used = key, used | {key}
    return keys


def operator_crossings(graph: OpGraph) -> dict[int, tuple[int, ...]]:
    """Units are operators: the activations crossing the cut after operator j, j = 0..L, in production order."""
    L = len(graph.ops)
    produced = {t: 0 for t in graph.inputs}
    last_read: dict[int, int] = {}
    for k, (inputs, outputs) in enumerate(graph.ops, 1):
        for t in inputs:
            last_read[t] = k
        for t in outputs:
            produced.setdefault(t, k)
    for t in graph.outputs:
        last_read[t] = L + 1
    order = [t for t in produced if not graph.tensors[t].constant]
    table = {j: tuple(t for t in order if produced[t] <= j < last_read.get(t, -1)) for j in range(1, L)}
    return {0: graph.inputs, **table, L: graph.outputs}


def operator_names(graph: OpGraph) -> dict[int, str]:
    """Names for the activations of a .tflite model: signature keys at its ends, the tensor's own name
    (its last fused part) inside, made unique with the tensor index."""
    names = dict(zip(graph.inputs, graph.signature_inputs)) | dict(zip(graph.outputs, graph.signature_outputs))
    used = set(names.values())
    for t in graph.tensors:
        if t.index not in names and not t.constant:
            name = t.name.split(";")[-1] or f"tensor_{t.index}"
            name = name if name not in used else f"{name}#{t.index}"
            names[t.index], used = name, used | {name}
    return names


def tensor_spec(graph: OpGraph, index: int, name: str, key: str) -> TensorSpec:
    t = graph.tensors[index]
    if t.dtype.startswith("type"):
        raise CutError(f"tensor {t.name!r} has a type NumPy cannot carry ({t.dtype}); it cannot cross a cut")
    quantization = (t.scale, t.zero_point) if t.scale and t.dtype in ("int8", "uint8") else None
    return TensorSpec(name, key, (1, *t.shape[1:]) if t.shape else (), t.dtype, index, quantization)


def operator_cut_table(graph: OpGraph) -> dict[int, tuple[TensorSpec, ...]]:
    """Every cut of a .tflite model whose units are its operators, with named tensors."""
    names = operator_names(graph)
    crossings = operator_crossings(graph)
    keys = signature_keys(names[t] for t in sorted({t for ts in crossings.values() for t in ts}))
    return {j: tuple(tensor_spec(graph, t, names[t], keys[names[t]]) for t in ts) for j, ts in crossings.items()}


def dequantized(graph: OpGraph, index: int, value: np.ndarray) -> np.ndarray:
    t = graph.tensors[index]
    value = value.astype(np.float64)
    return (value - t.zero_point) * t.scale if t.scale else value


def match_tensors(reference: Mapping[str, np.ndarray], values: Mapping[int, np.ndarray], graph: OpGraph,
                  tolerance: float) -> dict[str, int]:
    """Each reference (Keras) tensor's TFLite tensor: same shape, values within tolerance, the closest.

    The difference is max |a - b| / max(1, max |a|) over all samples; int8 tensors are dequantized first.
    Tensors with no match (inside a fused group) are left out.
    """
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, value in values.items():
        by_shape.setdefault(tuple(value.shape), []).append(index)
    matches = {}
    for name, ref in reference.items():
        ref = np.asarray(ref, dtype=np.float64)
        scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
        best: Optional[tuple[float, int]] = None
        for index in by_shape.get(tuple(ref.shape), []):
            diff = float(np.abs(dequantized(graph, index, values[index]) - ref).max(initial=0.0)) / scale
            if diff <= tolerance and (best is None or diff < best[0]):
                best = (diff, index)
        if best is not None:
            matches[name] = best[1]
    return matches


def mapped_cut_table(crossings: Mapping[int, Sequence[TensorSpec]], matches: Mapping[str, int],
                     graph: OpGraph) -> dict[int, tuple[TensorSpec, ...]]:
    """The legal cuts of units mapped to a TFLite graph, each with its tensors (names and keys kept).

    A cut is legal when every tensor crossing it has a distinct TFLite tensor, the operators from the
    previous legal cut compute them from that cut's tensors alone, and the rest of the model runs from them
    alone; cut 0 and cut U must be legal. (The converter may compute a tensor twice: a BatchNormalization
    folded into the convolution after it, its output still computed for a later Add. The cut after the
    BatchNormalization then has a tensor, but the convolution reads what comes before it.)
    """
    candidates = {}
    for j, specs in crossings.items():
        if all(s.name in matches for s in specs) and len({matches[s.name] for s in specs}) == len(specs):
            candidates[j] = tuple(tensor_spec(graph, matches[s.name], s.name, s.key) for s in specs)
    U = max(crossings)
    for end in (0, U):
        if end not in candidates:
            missing = [s.name for s in crossings[end] if s.name not in matches]
            raise CutError(f"the TFLite model has no tensor matching {missing or [s.name for s in crossings[end]]} "
                           f"(the model's {'inputs' if end == 0 else 'outputs'})")
    outputs = _indices(candidates[U])
    table = {0: candidates[0]}
    previous = 0
    for j in sorted(candidates)[1:]:
        tensors = _indices(candidates[j])
        try:
            graph.closure(tensors, _indices(table[previous]))
            graph.closure(outputs, tensors)
        except CutError:
            if j == U:
                raise
            continue
        table[j], previous = candidates[j], j
    return table


def _indices(specs: Sequence[TensorSpec]) -> list[int]:
    """The TFLite tensors of mapped specs (tensor_spec always sets them)."""
    return [t.tensor for t in specs if t.tensor is not None]
