"""Reading a .tflite flatbuffer and cutting a sub-model out of it, with ai-edge-litert's schema object API.

A sub-model keeps the whole model's operators between two cuts, in the whole model's order, takes the
tensors crossing the first cut and returns those crossing the second, and holds only the buffers its
operators read: no TensorFlow, no conversion, so any plan is cut in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from .plan import CutError

SIGNATURE = "serving_default"
BUFFER_ALIGNMENT = 16  # what the converter uses; kernels may read weights with aligned loads
DTYPES = {getattr(schema.TensorType, name): name.lower() for name in
          ("FLOAT32", "FLOAT16", "INT32", "UINT8", "INT64", "BOOL", "INT16", "INT8", "FLOAT64", "UINT64", "UINT32",
           "UINT16", "COMPLEX64", "COMPLEX128")}


@dataclass(frozen=True)
class FlatTensor:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy name, or the schema's type name for types numpy lacks
    constant: bool  # has data in a buffer: weights, not activations
    scale: float = 0.0  # per-tensor quantization (0 when not quantized)
    zero_point: int = 0


@dataclass(frozen=True)
class OpGraph:
    """Subgraph 0 reduced to what cutting needs; plain data, testable without files."""

    ops: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # (inputs, outputs) per operator, execution order
    op_names: tuple[str, ...]  # each operator's builtin (or custom) name
    tensors: tuple[FlatTensor, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    signature_inputs: tuple[str, ...]  # keys of the model's signature, in the subgraph's input order
    signature_outputs: tuple[str, ...]

    def producers(self) -> dict[int, int]:
        return {t: k for k, (_, outs) in enumerate(self.ops) for t in outs}

    def closure(self, outputs: Sequence[int], inputs: Sequence[int]) -> list[int]:
        """The operators that compute `outputs` from `inputs` (and constants), in execution order.

        Raises CutError naming the first activation needed that is neither produced nor given.
        """
        producer, given, needed = self.producers(), set(inputs), set()
        stack = [t for t in outputs if t not in given]
        seen: set[int] = set()
        while stack:
            t = stack.pop()
            if t in seen or t < 0:
                continue
            seen.add(t)
            if t in producer:
                k = producer[t]
                if k not in needed:
                    needed.add(k)
                    stack.extend(x for x in self.ops[k][0] if x not in given)
            elif not self.tensors[t].constant:
                raise CutError(f"tensor {self.tensors[t].name!r} is needed but neither computed in the stage nor "
                                 f"among its inputs {[self.tensors[x].name for x in inputs]}")
        return sorted(needed)


def read_model(source: Path | bytes) -> schema.ModelT:
    """The whole flatbuffer as objects (weights as NumPy views, so this takes milliseconds)."""
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        raise CutError(f"{e.filename}: cannot read the TFLite model ({e.strerror})") from None
    where = "model bytes" if isinstance(source, bytes) else str(source)
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise CutError(f"{where}: not a TFLite flatbuffer (no TFL3 identifier)")
    try:
        model = schema.ModelT.InitFromPackedBuf(data, 0)
    except Exception as e:  # a damaged flatbuffer fails with many types
        raise CutError(f"{where}: damaged TFLite flatbuffer ({type(e).__name__})") from None
    if not model.subgraphs or any((b.offset or 0) > 1 for b in model.buffers or []):
        raise CutError(f"{where}: no subgraph, or weights stored outside the flatbuffer (not supported)")
    return model


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def op_graph(model: schema.ModelT) -> OpGraph:
    """Subgraph 0 as plain data; a flatbuffer whose indices point nowhere is refused (files are untrusted)."""
    try:
        graph = _op_graph(model)
    except (IndexError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CutError(f"damaged TFLite model: {type(e).__name__} while reading its operators and tensors") from None
    for ins, outs in graph.ops:
        if any(not 0 <= t < len(graph.tensors) for t in (*ins, *outs)):
            raise CutError("damaged TFLite model: an operator refers to a tensor that does not exist")
    if any(not 0 <= t < len(graph.tensors) for t in (*graph.inputs, *graph.outputs)):
        raise CutError("damaged TFLite model: its inputs or outputs refer to a tensor that does not exist")
    return graph


def _op_graph(model: schema.ModelT) -> OpGraph:
    subgraph = model.subgraphs[0]
    tensors = []
    for i, t in enumerate(subgraph.tensors):
        buffer = model.buffers[t.buffer] if t.buffer else None
        q = t.quantization
        scale = float(q.scale[0]) if q is not None and q.scale is not None and len(q.scale) == 1 else 0.0
        zero = int(q.zeroPoint[0]) if scale and q.zeroPoint is not None and len(q.zeroPoint) else 0
        tensors.append(FlatTensor(i, _text(t.name), tuple(int(d) for d in (t.shape if t.shape is not None else ())),
                                  DTYPES.get(t.type, f"type{t.type}"),
                                  buffer is not None and buffer.data is not None and len(buffer.data) > 0,
                                  scale, zero))
    names = []
    for op in subgraph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        names.append(_text(code.customCode) if builtin == schema.BuiltinOperator.CUSTOM else
                     next((k for k, v in vars(schema.BuiltinOperator).items() if v == builtin), str(builtin)))
    ops = tuple((tuple(int(x) for x in op.inputs if x >= 0) if op.inputs is not None else (),
                 tuple(int(x) for x in op.outputs) if op.outputs is not None else ())
                for op in subgraph.operators)
    inputs = tuple(int(x) for x in subgraph.inputs)
    outputs = tuple(int(x) for x in subgraph.outputs)
    keys_in, keys_out = _signature_keys(model, inputs, outputs, tensors)
    return OpGraph(ops, tuple(names), tuple(tensors), inputs, outputs, keys_in, keys_out)


def _signature_keys(model, inputs, outputs, tensors) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The signature's key of every input and output, or the tensor's name when there is no signature."""
    by_index_in: dict[int, str] = {}
    by_index_out: dict[int, str] = {}
    for signature in model.signatureDefs or []:
        if signature.subgraphIndex == 0:
            by_index_in = {m.tensorIndex: _text(m.name) for m in signature.inputs or []}
            by_index_out = {m.tensorIndex: _text(m.name) for m in signature.outputs or []}
            break
    return (tuple(by_index_in.get(t, tensors[t].name) for t in inputs),
            tuple(by_index_out.get(t, tensors[t].name) for t in outputs))


class _AlignedBuffer(schema.BufferT):
    """A buffer packed on a 16-byte boundary, as the converter writes them (CreateNumpyVector aligns to 1)."""

    def Pack(self, builder):
        data = None
        if self.data is not None and len(self.data):
            raw = np.ascontiguousarray(self.data, dtype=np.uint8).tobytes()
            builder.StartVector(1, len(raw), BUFFER_ALIGNMENT)
            builder.head = builder.head - len(raw)
            builder.Bytes[builder.head:builder.head + len(raw)] = raw
            data = builder.EndVector()
        schema.BufferStart(builder)
        if data is not None:
            schema.BufferAddData(builder, data)
        return schema.BufferEnd(builder)


def cut_submodel(model: schema.ModelT, inputs: Sequence[tuple[int, str]], outputs: Sequence[tuple[int, str]],
                 graph: OpGraph | None = None) -> bytes:
    """The sub-model computing `outputs` from `inputs`, each (tensor index in subgraph 0, signature key).

    Keeps the operators the outputs need (in the whole model's order), the tensors they touch and only
    the buffers those tensors read; one signature, fed and read by key. A tensor may be both input and
    output (it passes through the stage).
    """
    if len(model.subgraphs) > 1:
        raise CutError(f"the model has {len(model.subgraphs)} subgraphs (control flow); only one can be cut")
    graph = graph or op_graph(model)
    source = model.subgraphs[0]
    kept_ops = graph.closure([t for t, _ in outputs], [t for t, _ in inputs])
    used: dict[int, int] = {}

    def new_index(t: int) -> int:
        if t < 0:
            return t
        if t not in used:
            used[t] = len(used)
        return used[t]

    for t, _ in inputs:
        new_index(t)
    operators = []
    for k in kept_ops:
        op = source.operators[k]
        copy = schema.OperatorT()
        copy.__dict__.update(op.__dict__)
        copy.inputs = [new_index(int(x)) for x in op.inputs] if op.inputs is not None else None
        copy.outputs = [new_index(int(x)) for x in op.outputs]
        if op.intermediates is not None:
            copy.intermediates = [new_index(int(x)) for x in op.intermediates]
        operators.append(copy)
    for t, _ in outputs:
        new_index(t)

    buffers: dict[int, int] = {0: 0}  # buffer 0 is the schema's empty sentinel

    def new_buffer(b: int) -> int:
        if b not in buffers:
            buffers[b] = len(buffers)
        return buffers[b]

    tensors = []
    for t in sorted(used, key=used.get):  # type: ignore[arg-type]
        copy = schema.TensorT()
        copy.__dict__.update(source.tensors[t].__dict__)
        copy.buffer = new_buffer(source.tensors[t].buffer)
        tensors.append(copy)
    subgraphs = [model.subgraphs[0].__class__()]
    subgraphs[0].__dict__.update(source.__dict__)
    subgraphs[0].tensors, subgraphs[0].operators = tensors, operators
    subgraphs[0].inputs = [used[t] for t, _ in inputs]
    subgraphs[0].outputs = [used[t] for t, _ in outputs]
    metadata = []
    for entry in model.metadata or []:
        copy = schema.MetadataT()
        copy.name, copy.buffer = entry.name, new_buffer(entry.buffer)
        metadata.append(copy)

    result = schema.ModelT()
    result.version, result.description, result.operatorCodes = model.version, model.description, model.operatorCodes
    result.subgraphs, result.metadata = subgraphs, metadata
    result.buffers = [_aligned(model.buffers[b]) for b in sorted(buffers, key=buffers.get)]  # type: ignore[arg-type]
    result.signatureDefs = [_signature(inputs, outputs, used)]
    return pack(result, sum(len(b.data) for b in result.buffers if b.data is not None))


def _aligned(buffer: schema.BufferT) -> _AlignedBuffer:
    copy = _AlignedBuffer()
    copy.data = buffer.data
    return copy


def _signature(inputs, outputs, used: dict[int, int]) -> schema.SignatureDefT:
    signature = schema.SignatureDefT()
    signature.signatureKey, signature.subgraphIndex = SIGNATURE, 0
    signature.inputs, signature.outputs = [], []
    for side, items in ((signature.inputs, inputs), (signature.outputs, outputs)):
        for t, key in items:
            entry = schema.TensorMapT()
            entry.name, entry.tensorIndex = key, used[t]
            side.append(entry)
    return signature


def pack(model: schema.ModelT, weight_bytes: int = 0) -> bytes:
    builder = flatbuffers.Builder(weight_bytes + (1 << 20))  # sized up front: growing copies the whole buffer
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
