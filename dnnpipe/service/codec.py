"""The Open Inference Protocol (KServe v2) on bytes: infer requests parsed and checked against the manifest's
tensors, responses and metadata built. Pure: no sockets, no threads, testable on bytes.

A tensor's batch dimension is -1: a request of batch b carries b inputs of the pipeline. An int8 pipeline's ends
are quantized on the wire but the user sees real numbers, so such a tensor is FP32 here (docs/service.md).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..errors import DnnpipeError
from ..manifest import TensorSpec
from ..runtime.dataio import quantize

HEADER_LENGTH = "Inference-Header-Content-Length"
DATATYPES = {"bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "int16": "INT16", "int32": "INT32",
             "int64": "INT64", "float16": "FP16", "float32": "FP32", "float64": "FP64"}
NUMPY_OF = {datatype: np.dtype(name) for name, datatype in DATATYPES.items()}
Buffer = Union[bytes, bytearray, memoryview]  # a body: bytes, or a view of the connection's reused buffer


class RequestError(DnnpipeError):
    """A request the client got wrong: answered with `status` and a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def datatype(spec: TensorSpec) -> str:
    """The OIP datatype a client sends or reads for a manifest tensor (real numbers for a quantized one)."""
    return "FP32" if spec.quantization is not None else DATATYPES[spec.dtype]


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": datatype(spec), "shape": [-1, *spec.shape[1:]]}


def model_metadata(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> dict[str, Any]:
    return {"name": name, "versions": ["1"], "platform": "dnnpipe",
            "inputs": [tensor_metadata(s) for s in inputs], "outputs": [tensor_metadata(s) for s in outputs]}


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "dnnpipe", "version": version, "extensions": ["binary_tensor_data"]}


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


@dataclass(frozen=True)
class Wire:
    """A manifest tensor as the OIP carries it, derived once per model (a request re-checks none of it): its
    datatype, the dtype of its values and of its little-endian binary data, its shape after the batch dimension."""

    spec: TensorSpec
    datatype: str
    dtype: np.dtype
    little: np.dtype
    tail: tuple[int, ...]
    row_count: int  # values in one row (one input of the pipeline)

    @classmethod
    def of(cls, spec: TensorSpec) -> "Wire":
        kind = datatype(spec)
        dtype = NUMPY_OF[kind]
        tail = tuple(int(d) for d in spec.shape[1:])
        return cls(spec, kind, dtype, dtype.newbyteorder("<"), tail, int(np.prod(tail, dtype=np.int64)))


class ModelTensors:
    """A model's inputs and outputs as the codec checks and builds them, made once when the service starts."""

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]):
        self.inputs = tuple(Wire.of(spec) for spec in inputs)
        self.outputs = tuple(Wire.of(spec) for spec in outputs)
        self.input_by_name = {wire.spec.name: wire for wire in self.inputs}
        self.output_by_name = {wire.spec.name: (j, wire) for j, wire in enumerate(self.outputs)}
        self.every_output = {binary: [Requested(j, wire, binary) for j, wire in enumerate(self.outputs)]
                             for binary in (False, True)}


@dataclass(frozen=True)
class Requested:
    """An output the client asked for (its place among the model's outputs), and whether it wants it as binary
    data after the JSON header."""

    index: int
    wire: Wire
    binary: bool

    @property
    def spec(self) -> TensorSpec:
        return self.wire.spec


@dataclass(frozen=True)
class InferRequest:
    id: Optional[str]
    batch: int
    inputs: list[np.ndarray]  # one per manifest input, in manifest order, shape (batch, *spec.shape[1:])
    outputs: list[Requested]

    def rows(self) -> list[list[np.ndarray]]:
        """The pipeline's b inputs: row i of every tensor, without the batch dimension."""
        return [[tensor[i] for tensor in self.inputs] for i in range(self.batch)]


def decode_body(body: Buffer, encoding: str, limit: int) -> Buffer:
    """A body as sent with `Content-Encoding` (gzip, deflate: tritonclient's request compression), inflated to
    at most `limit` bytes (a small body must not expand without bound)."""
    kind = encoding.strip().lower()
    if kind in ("", "identity"):
        return body
    if kind not in ("gzip", "deflate"):
        raise RequestError(f"Content-Encoding {encoding[:40]!r} is not supported (gzip, deflate)", 415)
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if kind == "gzip" else zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise RequestError(f"body is not valid {kind} data ({e})") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise RequestError(f"body inflates to over the limit of {limit} bytes", 413)
    if not inflater.eof:
        raise RequestError(f"body is truncated {kind} data")
    return data


def parse_infer(body: Buffer, header_length: Optional[str], model: ModelTensors, max_batch: int) -> InferRequest:
    """An infer request's body (JSON, then binary tensors when `Inference-Header-Content-Length` is set),
    checked against the model's tensors; every fault is a RequestError naming the tensor or field. Binary
    tensors are views of `body`, not copies: it must stay unchanged while the request's inputs are queued."""
    header, binary = _split(body, header_length)
    try:
        request = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"request body is not valid JSON ({e})") from None
    except RecursionError:
        raise RequestError("request body is JSON nested too deeply") from None
    if not isinstance(request, dict):
        raise RequestError("request body must be a JSON object")
    identifier = request.get("id")
    if identifier is not None and not isinstance(identifier, str):
        raise RequestError(f"id must be a string, got {identifier!r}")
    items = request.get("inputs")
    if not isinstance(items, list):
        raise RequestError("inputs must be a list of tensors")
    by_name = model.input_by_name
    given: dict[str, np.ndarray] = {}
    offset = 0
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RequestError(f"inputs[{i}] must be an object with a name")
        name = item["name"]
        if name not in by_name:
            raise RequestError(f"unknown input {name!r}: the model takes {', '.join(by_name)}")
        if name in given:
            raise RequestError(f"input {name!r} given twice")
        given[name], offset = _tensor(item, by_name[name], binary, offset, max_batch)
    if offset != len(binary):
        raise RequestError(f"{len(binary) - offset} bytes of binary data after the last tensor")
    parameters = _parameters(request, "request")
    return gathered(identifier, given, model, max_batch,
                    requested(request.get("outputs"), model, bool(parameters.get("binary_data_output"))))


def gathered(identifier: Optional[str], given: dict[str, np.ndarray], model: ModelTensors, max_batch: int,
             outputs: list[Requested]) -> InferRequest:
    """A request from its checked input tensors by name (from REST or gRPC): every input there, one batch size."""
    missing = [wire.spec.name for wire in model.inputs if wire.spec.name not in given]
    if missing:
        raise RequestError(f"missing input {', '.join(map(repr, missing))}")
    batches = {name: array.shape[0] for name, array in given.items()}
    batch = next(iter(batches.values()))
    if len(set(batches.values())) != 1:
        raise RequestError(f"inputs disagree on the batch size: {batches}")
    if not 1 <= batch <= max_batch:
        raise RequestError(f"batch size must be 1..{max_batch}, got {batch}")
    return InferRequest(identifier, batch, [given[wire.spec.name] for wire in model.inputs], outputs)


def _split(body: Buffer, header_length: Optional[str]) -> tuple[bytes, memoryview]:
    if header_length is None:
        return bytes(body), memoryview(b"")
    try:
        length = int(header_length)
    except ValueError:
        raise RequestError(f"{HEADER_LENGTH} must be a whole number, got {header_length!r}") from None
    if not 0 < length <= len(body):
        raise RequestError(f"{HEADER_LENGTH} {length} is outside the body's {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:length]), view[length:]  # tensors are read from the body in place


def _parameters(item: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = item.get("parameters", {})
    if not isinstance(parameters, dict):
        raise RequestError(f"{where}.parameters must be an object")
    return parameters


def check_header(wire: Wire, given_datatype: Any, shape: Any, max_batch: int) -> int:
    """An input tensor's datatype and shape against the model's; its element count. The batch bound first, so
    the count cannot overflow."""
    name, expected = wire.spec.name, wire.datatype
    if given_datatype != expected:
        raise RequestError(f"input {name!r} must be datatype {expected}, got {given_datatype!r}")
    if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise RequestError(f"input {name!r}: shape must be a list of whole numbers, got {shape!r}")
    if len(shape) != len(wire.tail) + 1 or tuple(shape[1:]) != wire.tail:
        raise RequestError(f"input {name!r} must have shape {[-1, *wire.tail]}, got {shape}")
    batch = shape[0]
    if not 1 <= batch <= max_batch:
        raise RequestError(f"batch size must be 1..{max_batch}, got {batch}")
    return batch * wire.row_count


def _tensor(item: dict[str, Any], wire: Wire, binary: memoryview, offset: int,
            max_batch: int) -> tuple[np.ndarray, int]:
    """One input tensor, checked."""
    name, expected, shape = wire.spec.name, wire.datatype, item.get("shape")
    count = check_header(wire, item.get("datatype"), shape, max_batch)
    size = _parameters(item, f"input {name!r}").get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size != count * wire.dtype.itemsize:
            raise RequestError(f"input {name!r}: binary_data_size must be {count * wire.dtype.itemsize} for shape "
                               f"{shape} {expected}, got {size!r}")
        if offset + size > len(binary):
            raise RequestError(f"input {name!r}: binary data ends after {len(binary) - offset} of {size} bytes")
        array = np.frombuffer(binary, dtype=wire.little, count=count, offset=offset)
        return in_range(wire.spec, array.astype(wire.dtype, copy=False).reshape(shape)), offset + size
    if "data" not in item:
        raise RequestError(f"input {name!r} has neither data nor parameters.binary_data_size")
    try:
        array = np.asarray(item["data"])
    except ValueError:
        raise RequestError(f"input {name!r}: data is a ragged list") from None
    if array.size != count or array.dtype.kind not in "biuf":
        raise RequestError(f"input {name!r}: data must hold {count} numbers for shape {shape}, "
                           f"got {array.size} of kind {array.dtype.name}")
    if array.dtype.kind == "f" and wire.dtype.kind in "biu":
        raise RequestError(f"input {name!r}: data must be whole numbers for {expected}")
    return in_range(wire.spec, array.astype(wire.dtype).reshape(shape)), offset


def in_range(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """A quantized input's real numbers must fit its integer type: the client's mistake, answered 400 here,
    not found in the pipeline where it would fail the whole batch."""
    if spec.quantization is not None:
        try:
            quantize(spec, array, f"input {spec.name!r}")
        except DnnpipeError as e:
            raise RequestError(str(e)) from None
    return array


def requested(items: Any, model: ModelTensors, binary_default: bool) -> list[Requested]:
    if items is None:
        return model.every_output[binary_default]
    if not isinstance(items, list) or not items:
        raise RequestError("outputs must be a non-empty list")
    by_name = model.output_by_name
    requested = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RequestError(f"outputs[{i}] must be an object with a name")
        if item["name"] not in by_name:
            raise RequestError(f"unknown output {item['name']!r}: the model returns {', '.join(by_name)}")
        binary = _parameters(item, f"output {item['name']!r}").get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise RequestError(f"output {item['name']!r}: parameters.binary_data must be true or false")
        requested.append(Requested(*by_name[item["name"]], binary))
    return requested


def stack(wanted: Requested, results: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """One requested output of every input of the batch, stacked: (batch, *shape after the batch dimension)."""
    wire, j = wanted.wire, wanted.index
    rows = [np.asarray(row[j], dtype=wire.dtype).reshape(wire.tail) for row in results]
    return rows[0][np.newaxis] if len(rows) == 1 else np.stack(rows)


def build_infer_response(model: str, request: InferRequest,
                         results: Sequence[Sequence[np.ndarray]]) -> tuple[bytes, Optional[int]]:
    """The response body for `results` (one list of outputs, in manifest order, per input of the batch), and
    the JSON header's length when binary tensors follow it (the `Inference-Header-Content-Length` header)."""
    tensors, blobs = [], []
    for wanted in request.outputs:
        wire = wanted.wire
        stacked = stack(wanted, results)
        entry: dict[str, Any] = {"name": wire.spec.name, "datatype": wire.datatype, "shape": list(stacked.shape)}
        if wanted.binary:
            blob = np.ascontiguousarray(stacked, dtype=wire.little).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = stacked.ravel().tolist()
        tensors.append(entry)
    response: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": tensors}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
