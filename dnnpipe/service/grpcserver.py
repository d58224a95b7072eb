"""The Open Inference Protocol's gRPC side (`inference.GRPCInferenceService`: KServe v2's gRPC API, as Triton
ships it): a second front door over the same Service as the REST one. The stubs are tritonclient's generated
`service_pb2`/`service_pb2_grpc` (no hand-written protobuf); this module, grpcio and tritonclient are loaded only
when `--grpc` is given. Health, metadata and ModelInfer are served; every other RPC answers UNIMPLEMENTED (the
generated servicer's own default)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, NoReturn, Optional, Protocol, Sequence

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from ..errors import DnnpipeError
from ..manifest import TensorSpec
from . import codec
from .feed import Outcome, Ticket
from .options import bearer_ok
from .server import FrontDoorBackend

# an HTTP-equivalent status (what Service.compute and the codec say) as the gRPC status a client sees
CODES = {499: grpc.StatusCode.CANCELLED, 400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
         500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
# the InferTensorContents field of each datatype; FP16 has none (raw contents only)
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents"}


class GrpcBackend(FrontDoorBackend, Protocol):
    """What the gRPC front door asks besides (service.Service is one)."""

    @property
    def tensors(self) -> codec.ModelTensors: ...

    def compute(self, request: codec.InferRequest, arrived: float, client_deadline: Optional[float] = None,
                watch: Optional[Callable[[Ticket], object]] = None) -> Outcome: ...


# The codec: protobuf messages <-> checked tensors (pure: no server, no threads)

def _parameter(parameters: Any, key: str) -> Any:
    """A request parameter's value (bool, int or string), None when absent."""
    if key not in parameters:
        return None
    value = parameters[key]
    kind = value.WhichOneof("parameter_choice")
    return getattr(value, kind) if kind else None


def parse_request(request: Any, model: codec.ModelTensors, max_batch: int) -> codec.InferRequest:
    """A ModelInferRequest checked against the model: each input from its typed `contents` or from
    `raw_input_contents` (little-endian, one entry per input, in the inputs' order); a RequestError names the
    tensor or field."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise codec.RequestError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    given: dict[str, np.ndarray] = {}
    for i, item in enumerate(request.inputs):
        wire = model.input_by_name.get(item.name)
        if wire is None:
            raise codec.RequestError(f"unknown input {item.name!r}: the model takes {', '.join(model.input_by_name)}")
        if item.name in given:
            raise codec.RequestError(f"input {item.name!r} given twice")
        shape = [int(d) for d in item.shape]
        count = codec.check_header(wire, item.datatype, shape, max_batch)
        given[item.name] = codec.in_range(wire.spec, _values(item, wire, raw[i] if raw else None, count)
                                          .reshape(shape))
    wanted = codec.requested([_output(o) for o in request.outputs] or None, model,
                             _parameter(request.parameters, "binary_data_output") is not False)
    # raw unless asked otherwise; all outputs one way (the protocol's rule), and FP16 has no typed field
    raw_out = any(w.binary or w.wire.datatype not in CONTENTS for w in wanted)
    wanted = [codec.Requested(w.index, w.wire, raw_out) for w in wanted]
    return codec.gathered(request.id or None, given, model, max_batch, wanted)


def _output(item: Any) -> dict[str, Any]:
    """A requested output as the REST codec reads one: its name, and its `binary_data` parameter if given."""
    binary = _parameter(item.parameters, "binary_data")
    return {"name": item.name, "parameters": {} if binary is None else {"binary_data": binary}}


def _values(item: Any, wire: codec.Wire, raw: Optional[bytes], count: int) -> np.ndarray:
    name = wire.spec.name
    field = CONTENTS.get(wire.datatype)
    typed = getattr(item.contents, field) if field is not None else ()
    if raw is not None:
        if len(typed):
            raise codec.RequestError(f"input {name!r} has both contents and raw_input_contents")
        size = count * wire.dtype.itemsize
        if len(raw) != size:
            raise codec.RequestError(f"input {name!r}: raw_input_contents must be {size} bytes for its shape "
                                     f"{wire.datatype}, got {len(raw)}")
        return np.frombuffer(raw, dtype=wire.little, count=count).astype(wire.dtype, copy=False)
    if field is None:
        raise codec.RequestError(f"input {name!r}: {wire.datatype} data must come as raw_input_contents")
    if len(typed) != count:
        raise codec.RequestError(f"input {name!r}: contents.{field} must hold {count} values for its shape, "
                                 f"got {len(typed)}")
    values = np.asarray(typed)
    if wire.dtype.kind in "iu" and values.size:
        limits = np.iinfo(wire.dtype)
        if values.min() < limits.min or values.max() > limits.max:
            raise codec.RequestError(f"input {name!r}: a value is outside {wire.datatype}'s range "
                                     f"{limits.min}..{limits.max}")
    return values.astype(wire.dtype)


def build_response(model_name: str, request: codec.InferRequest,
                   results: Sequence[Sequence[np.ndarray]]) -> Any:
    """The ModelInferResponse: each requested output as raw little-endian bytes or typed contents."""
    response = pb.ModelInferResponse(model_name=model_name, model_version="1", id=request.id or "")
    for wanted in request.outputs:
        wire, stacked = wanted.wire, codec.stack(wanted, results)
        tensor = response.outputs.add(name=wire.spec.name, datatype=wire.datatype, shape=list(stacked.shape))
        if wanted.binary:
            response.raw_output_contents.append(np.ascontiguousarray(stacked, dtype=wire.little).tobytes())
        else:
            getattr(tensor.contents, CONTENTS[wire.datatype]).extend(stacked.ravel().tolist())
    return response


def tensor_metadata(spec: TensorSpec) -> Any:
    meta = codec.tensor_metadata(spec)
    return pb.ModelMetadataResponse.TensorMetadata(name=meta["name"], datatype=meta["datatype"], shape=meta["shape"])


# The front door

def _abort(context: grpc.ServicerContext, status: int, message: str, full: bool = False) -> NoReturn:
    code = grpc.StatusCode.RESOURCE_EXHAUSTED if full else CODES.get(status, grpc.StatusCode.UNKNOWN)
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    """The RPCs served; the base class answers every other one UNIMPLEMENTED."""

    def __init__(self, service: GrpcBackend):
        self.service = service

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 (the protocol's names)
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.service.ready)

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return pb.ModelReadyResponse(ready=self._known(request.name, request.version) and self.service.ready)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._authorize(context)
        return pb.ServerMetadataResponse(**codec.server_metadata(self.service.version))

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._authorize(context)
        self._check_model(context, request.name, request.version)
        return pb.ModelMetadataResponse(name=self.service.options.model_name, versions=["1"], platform="dnnpipe",
                                        inputs=[tensor_metadata(s) for s in self.service.inputs],
                                        outputs=[tensor_metadata(s) for s in self.service.outputs])

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Counted in dnnpipe_requests_total once past the token and the model's name, as REST's infer."""
        arrived = time.monotonic()
        self._authorize(context)
        self._check_model(context, request.model_name, request.model_version)
        with self.service.request():
            try:
                outcome, response = self._infer(request, context, arrived)
            except Exception as e:  # a fault of ours: INTERNAL with one line, not grpcio's UNKNOWN and a traceback
                outcome = Outcome(500, f"internal error: {type(e).__name__}: {e}".splitlines()[0][:300])
        self.service.metrics.answered(self.service.options.model_name, outcome.status, time.monotonic() - arrived)
        if outcome.error is not None:
            _abort(context, outcome.status, outcome.error, outcome.full)
        return response

    def _infer(self, request: Any, context: grpc.ServicerContext, arrived: float) -> tuple[Outcome, Any]:
        """The outcome (an HTTP-equivalent status, as the metrics count it) and the response when it is 200."""
        service = self.service
        try:
            parsed = parse_request(request, service.tensors, service.options.max_batch)
        except codec.RequestError as e:
            return Outcome(e.status, str(e)), None
        remaining = context.time_remaining()
        outcome = service.compute(parsed, arrived, None if remaining is None else time.monotonic() + remaining,
                                  watch=lambda ticket: context.add_callback(
                                      lambda: ticket.expire(499, "the client cancelled the call")))
        if outcome.error is not None:
            return outcome, None
        try:
            return outcome, build_response(service.options.model_name, parsed, outcome.results)
        except (ValueError, TypeError) as e:
            return Outcome(500, f"the pipeline's result does not fit the model's outputs ({e})"), None

    def _authorization(self, context: grpc.ServicerContext) -> str:
        for key, value in context.invocation_metadata():
            if key == "authorization":
                return value if isinstance(value, str) else ""
        return ""

    def _authorize(self, context: grpc.ServicerContext) -> None:
        if not bearer_ok(self.service.token, self._authorization(context)):
            _abort(context, 401, "missing or wrong bearer token (metadata authorization: Bearer <token>)")

    def _known(self, name: str, version: str) -> bool:
        return name == self.service.options.model_name and version in ("", "1")

    def _check_model(self, context: grpc.ServicerContext, name: str, version: str) -> None:
        if not self._known(name, version):
            _abort(context, 404, f"unknown model {name!r}" + (f" version {version!r}" if version else ""))


class GrpcFront:
    """The gRPC server, listening from construction (so its port is known): a thread per call in flight, at
    most max_connections calls at once (beyond: RESOURCE_EXHAUSTED from grpc itself), messages up to
    max_body_bytes (beyond: RESOURCE_EXHAUSTED)."""

    def __init__(self, service: GrpcBackend, host: str, port: int, tls: Optional[tuple[bytes, bytes]]):
        options = service.options
        self.executor = ThreadPoolExecutor(max_workers=options.max_connections, thread_name_prefix="grpc")
        self.server = grpc.server(self.executor, maximum_concurrent_rpcs=options.max_connections, options=[
            ("grpc.max_receive_message_length", options.max_body_bytes),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not shared with another server
        ])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(service), self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if tls is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
        except RuntimeError as e:  # grpcio raises on a failed bind (older ones returned 0)
            self.port, reason = 0, str(e)
        else:
            reason = "the address is in use or not this machine's"
        if not self.port:
            self.executor.shutdown(wait=False)
            raise DnnpipeError(f"--grpc {host}:{port}: cannot listen ({reason})")
        self._stopped: Optional[Any] = None

    def start(self) -> None:
        self.server.start()

    def stop(self, grace: float) -> None:
        """No new calls at once (UNAVAILABLE); calls in flight have `grace` seconds to answer. A later call with
        a shorter grace cuts it short (grpc's own rule)."""
        self._stopped = self.server.stop(grace)

    def wait_stopped(self, timeout: float) -> None:
        if self._stopped is not None:
            self._stopped.wait(timeout)
        self.executor.shutdown(wait=False)
