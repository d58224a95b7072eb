"""Units and cuts of a Keras functional graph.

Unit u is the u-th non-input layer of `model.layers`. The cut after unit j is crossed by every
tensor produced at or before j (model inputs count as produced at 0) that is read after j, and by
every model output produced at or before j. A stage (i..k] takes the tensors crossing cut i and
returns those crossing cut k, which is all any DAG needs: residual adds, concatenations,
squeeze-excite, several inputs and outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..slicing.plan import CutError  # one error for "cannot be cut", sliced or converted


@dataclass(frozen=True)
class GraphTensor:
    name: str  # producing layer's name, with ":i" for its i-th output when it has several
    producer: int  # unit that produces it, 0 for a model input
    last_consumer: int  # last unit that reads it, U + 1 for a model output
    shape: tuple[Any, ...]  # with the batch dimension (None)
    dtype: str
    consumers: tuple[int, ...] = ()  # units that read it

    @property
    def nbytes(self) -> int:
        """Bytes per inference (batch 1)."""
        import numpy as np

        return int(np.prod([int(d) for d in self.shape[1:]], dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class UnitGraph:
    """The model reduced to what partitioning needs; plain data, testable without TensorFlow."""

    units: tuple[str, ...]  # layer names, unit 1 first
    tensors: tuple[GraphTensor, ...]  # model inputs first, then in production order
    outputs: tuple[str, ...]  # model output names, in the model's order

    @property
    def U(self) -> int:
        return len(self.units)

    def crossing(self, j: int) -> list[GraphTensor]:
        """Tensors crossing the cut after unit j, in wire order (cut U: the model's outputs)."""
        if not 0 <= j <= self.U:
            raise ValueError(f"cut {j} outside 0..{self.U}")
        if j == self.U:
            by_name = {t.name: t for t in self.tensors}
            return [by_name[name] for name in self.outputs]
        return [t for t in self.tensors if t.producer <= j < t.last_consumer]

    def cut_bytes(self, j: int) -> int:
        return sum(t.nbytes for t in self.crossing(j))

    def unit_inputs(self, u: int) -> list[GraphTensor]:
        """What unit u reads from outside itself: what running it alone needs."""
        return [t for t in self.tensors if u in t.consumers and t.producer != u]

    def unit_outputs(self, u: int) -> list[GraphTensor]:
        """What unit u produces for later units or as model outputs."""
        return [t for t in self.tensors if t.producer == u and (t.last_consumer > u)]


def as_functional(model):
    """Sequential models become functional ones over the same layers (and weights)."""
    from ..tfenv import import_tensorflow

    _, keras = import_tensorflow()

    if isinstance(model, keras.Sequential):
        if not model.built or not model.inputs:
            raise CutError("the Sequential model has no input shape; build it with keras.Input first")
        inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype,
                             name=model.inputs[0].name.replace(":", "_"))
        x = inputs
        for layer in model.layers:
            x = layer(x)
        return keras.Model(inputs, x, name=model.name)
    return model


def analyse(model) -> tuple[UnitGraph, dict[str, Any]]:
    """The model's units and tensors, and each tensor's KerasTensor by name."""
    from ..tfenv import import_tensorflow

    _, keras = import_tensorflow()

    if not hasattr(model, "_nodes_by_depth"):
        raise CutError(f"model {model.name!r} is a subclassed model; only functional and Sequential "
                             f"models have a graph to cut")
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    unit_of = {id(layer): u for u, layer in enumerate(layers, 1)}
    nodes = [n for depth in sorted(model._nodes_by_depth, reverse=True) for n in model._nodes_by_depth[depth]]
    calls: dict[int, int] = {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
    for layer in layers:
        if calls.get(id(layer), 0) > 1:
            raise CutError(f"layer {layer.name!r} is called {calls[id(layer)]} times in the model; "
                                 f"a shared layer cannot be one unit of a pipeline")

    U = len(layers)
    node_unit = _node_units(nodes, unit_of, U)
    producer: dict[int, int] = {}
    last_consumer: dict[int, int] = {}
    consumers: dict[int, set[int]] = {}
    name_of: dict[int, str] = {}
    keras_tensor: dict[int, Any] = {}
    for x in model.inputs:
        producer[id(x)], name_of[id(x)], keras_tensor[id(x)] = 0, x._keras_history[0].name, x
    for node in nodes:
        op = node.operation
        if isinstance(op, keras.layers.InputLayer):
            continue
        unit = node_unit[id(node)]
        for t in node.input_tensors:
            if id(t) not in producer:
                raise CutError(f"layer {op.name!r} reads a tensor from outside the model graph")
            if producer[id(t)] > unit:
                raise CutError(f"layer {op.name!r} (unit {unit}) reads {name_of[id(t)]!r} from unit "
                                     f"{producer[id(t)]}: model.layers is not in execution order")
            last_consumer[id(t)] = max(last_consumer.get(id(t), 0), unit)
            consumers.setdefault(id(t), set()).add(unit)
        outputs = node.output_tensors
        for k, t in enumerate(outputs):
            producer[id(t)] = unit
            name_of[id(t)] = op.name if len(outputs) == 1 else f"{op.name}:{k}"
            keras_tensor[id(t)] = t
    for t in model.outputs:
        last_consumer[id(t)] = U + 1
    tensors = tuple(GraphTensor(name_of[i], producer[i], last_consumer.get(i, producer[i]),
                                tuple(keras_tensor[i].shape), str(keras_tensor[i].dtype),
                                tuple(sorted(consumers.get(i, ())))) for i in producer)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise CutError("two tensors share a name; give every layer a unique name")
    graph = UnitGraph(tuple(layer.name for layer in layers), tensors, tuple(name_of[id(t)] for t in model.outputs))
    return graph, {name_of[i]: keras_tensor[i] for i in producer}


def _node_units(nodes: list[Any], unit_of: dict[int, int], U: int) -> dict[int, int]:
    """The unit each graph node runs in. Layers are their own unit; an operation that is not a layer
    (a keras.ops call) runs in the unit of the first layer that needs its result, or in the last unit."""
    unit: dict[int, int] = {}
    needed_by: dict[int, int] = {}
    for node in reversed(nodes):
        u = unit_of.get(id(node.operation))
        if u is None:
            u = min([needed_by.get(id(t), U) for t in node.output_tensors] or [U])
        unit[id(node)] = u
        for t in node.input_tensors:
            needed_by[id(t)] = min(needed_by.get(id(t), U), u)
    return unit
