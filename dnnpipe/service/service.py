"""The inference service: the front doors (REST, and gRPC when asked), the live Feed and the metrics around a
pipeline that runs on its own thread. `run_service` is the one entry a command calls; `Service` is the same,
steered by tests. Both front doors run a request through `Service.compute`."""

from __future__ import annotations

import contextlib
import gc
import ssl
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

from ..errors import DnnpipeError
from ..manifest import TensorSpec
from ..feeds import Feed, ServeEvents
from . import codec
from .feed import LiveFeed, Outcome, Refused, Ticket
from .metrics import ServiceMetrics
from .options import ServiceOptions, read_token, tls_context, tls_pair
from .server import Handler, Server

if TYPE_CHECKING:
    from .grpcserver import GrpcFront

RunPipeline = Callable[[Feed, ServeEvents], object]
VERSION = "0.1.0"


class Service:
    """Listening from construction (so the port is known); `start` runs the pipeline, `drain` ends it all."""

    def __init__(self, options: ServiceOptions, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]):
        self.options, self.inputs, self.outputs = options, tuple(inputs), tuple(outputs)
        self.tensors = codec.ModelTensors(inputs, outputs)  # what every request is checked against, made once
        self.version = VERSION
        self.token = read_token(options)
        tls = tls_context(options)
        self.feed = LiveFeed(options.queue_size)
        self.metrics = ServiceMetrics(lambda: self.feed.depth, lambda: self.feed.inflight)
        self.draining = False
        self.pipeline_error: Optional[str] = None
        self.pipeline_done = threading.Event()
        self._started = False
        self._active = 0  # requests between their first byte and their answer
        self._idle = threading.Condition()
        self._serving = False  # serve_forever started: shutdown() waits for it, so only then
        self.server: Optional[Server] = None
        self.grpc: Optional["GrpcFront"] = None
        if options.http:
            try:
                self.server = Server(options.host, options.port, self, tls)
            except OSError as e:
                raise DnnpipeError(f"--http {options.host}:{options.port}: cannot listen ({e.strerror or e})") \
                    from None
        if options.grpc_host is not None:
            from .grpcserver import GrpcFront  # grpcio and tritonclient's stubs only when --grpc is given

            try:
                self.grpc = GrpcFront(self, options.grpc_host, options.grpc_port, tls_pair(options))
            except DnnpipeError:
                self.close()
                raise
        self.scheme = "https" if tls else "http"

    @property
    def port(self) -> int:
        assert self.server is not None, "no --http front door"
        return int(self.server.server_address[1])

    @property
    def grpc_port(self) -> int:
        assert self.grpc is not None, "no --grpc front door"
        return self.grpc.port

    @property
    def grpc_target(self) -> str:
        """HOST:PORT as a gRPC client dials it."""
        host = self.options.grpc_host or ""
        return f"[{host}]:{self.grpc_port}" if ":" in host else f"{host}:{self.grpc_port}"

    @property
    def url(self) -> str:
        host = f"[{self.options.host}]" if ":" in self.options.host else self.options.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def ready(self) -> bool:
        return self.metrics.up and not self.draining and not self.pipeline_done.is_set()

    def start(self, run_pipeline: RunPipeline) -> None:
        if self.server is not None:
            self._serving = True
            threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, name="http",
                             daemon=True).start()
        if self.grpc is not None:
            self.grpc.start()
        self._started = True
        threading.Thread(target=self._pipeline, args=(run_pipeline,), name="pipeline", daemon=True).start()

    def _pipeline(self, run_pipeline: RunPipeline) -> None:
        try:
            run_pipeline(self.feed, self.metrics)
        except Exception as e:  # any failure ends the service with one line; requests get a 503, not a hang
            self.pipeline_error = f"{type(e).__name__}: {e}" if not isinstance(e, DnnpipeError) else str(e)
        finally:
            self.metrics.ready(False)
            self.feed.drain()  # new requests are refused at once (503), not left waiting for a 504
            self.feed.fail_all(503, f"the pipeline stopped{': ' + self.pipeline_error if self.pipeline_error else ''}")
            self.pipeline_done.set()

    def drain(self) -> bool:
        """Not ready at once, no new requests, in-flight ones answered (within drain_timeout), then closed.
        True when everything accepted was answered by the pipeline."""
        self.draining = True
        self.feed.drain()
        self._stop_accepting()  # new connections are refused, not left in the backlog
        if self.server is not None:
            self.server.socket.close()
        if self.grpc is not None:  # new calls get UNAVAILABLE; those in flight run on (counted in _active)
            self.grpc.stop(self.options.drain_timeout)
        deadline = time.monotonic() + self.options.drain_timeout
        with self._idle:
            clean = self._idle.wait_for(lambda: self._active == 0, self.options.drain_timeout)
        if self._started:  # a service never started has no pipeline to wait for
            clean = self.pipeline_done.wait(max(0.0, deadline - time.monotonic())) and clean
        self.close()
        with self._idle:  # requests failed by close() write their 503 before the process may exit
            self._idle.wait_for(lambda: self._active == 0, 1.0)
        return clean

    def close(self) -> None:
        self.draining = True
        self.feed.drain()
        self.feed.fail_all(503, "the service is shutting down")
        self._stop_accepting()
        if self.server is not None:
            self.server.server_close()
        if self.grpc is not None:  # the calls failed above write their UNAVAILABLE within the grace
            self.grpc.stop(1.0)
            self.grpc.wait_stopped(1.5)

    def _stop_accepting(self) -> None:
        if self._serving and self.server is not None:
            self.server.shutdown()
            self._serving = False

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """A request between its first byte and its answer: draining waits for it."""
        with self._idle:
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def infer(self, handler: Handler) -> None:
        handler.on_answer = lambda code: self.metrics.answered(self.options.model_name, code,
                                                               time.monotonic() - handler.arrived)
        try:
            self._infer(handler)
        except (TimeoutError, ConnectionError, ssl.SSLError):
            raise  # the connection is gone: the handler closes it
        except Exception as e:  # a fault of ours: one line with a 500, never a traceback and no answer
            if not handler.sent:
                handler.send_error(500, f"internal error: {type(e).__name__}: {e}".splitlines()[0][:300])
        finally:  # a body not handed back by body_done stays with the feed alone, never reused
            handler.lent, handler.on_answer = None, None

    def compute(self, request: codec.InferRequest, arrived: float, client_deadline: Optional[float] = None,
                watch: Optional[Callable[[Ticket], object]] = None) -> Outcome:
        """Queue a checked request's inputs and wait for their results until the request timeout after
        `arrived` (or the client's own deadline, when earlier): what every front door does between parsing a
        request and answering it. `watch` is given the queued request's ticket (a front door that learns of a
        cancelled call expires it)."""
        if self.draining:
            return Outcome(503, "the service is shutting down", refused=True)
        try:
            ticket = self.feed.submit(request.rows())
        except Refused as e:
            return Outcome(503, str(e), refused=True, full=e.full)
        if watch is not None:
            watch(ticket)
        deadline = arrived + self.options.request_timeout
        if client_deadline is not None and client_deadline < deadline:
            reason = "no result within the client's deadline"
            deadline = client_deadline
        else:
            reason = f"no result within the request timeout of {self.options.request_timeout:g} s"
        if not ticket.wait(deadline - time.monotonic()):
            ticket.expire(504, reason)
        if ticket.error is not None:  # its inputs may still be queued (expired)
            return Outcome(ticket.status, ticket.error)
        return Outcome(200, results=tuple(r for r in ticket.results if r is not None))

    def _infer(self, handler: Handler) -> None:
        """Read, check, queue, wait, answer (the status sent is handler.sent)."""
        body = handler.read_body()
        if body is None:
            return
        self.metrics.received(time.monotonic() - handler.arrived)
        try:
            request = codec.parse_infer(body, handler.headers.get(codec.HEADER_LENGTH), self.tensors,
                                        self.options.max_batch)
        except codec.RequestError as e:
            handler.body_done()
            handler.send_error(e.status, str(e))
            return
        outcome = self.compute(request, handler.arrived)
        if outcome.refused:
            handler.body_done()
            handler.refuse(Refused(outcome.error or ""))
            return
        if outcome.error is not None:  # its inputs may still be queued (expired): the buffer is not reused
            handler.send_error(outcome.status, outcome.error)
            return
        handler.body_done()  # every input was delivered: the feed holds no view of the body any more
        try:
            body, header_length = codec.build_infer_response(self.options.model_name, request,
                                                             list(outcome.results))
        except (ValueError, TypeError) as e:
            handler.send_error(500, f"the pipeline's result does not fit the model's outputs ({e})")
            return
        if header_length is None:
            handler.reply(200, body)
        else:
            handler.reply(200, body, "application/octet-stream", {codec.HEADER_LENGTH: str(header_length)})


def freeze() -> None:
    """Move every object alive now out of the cyclic collector's reach, once the pipeline is up. What the start
    built (the model, the plans, the imports) lives as long as the process; a full collection walked all of it
    while every answer waited: 60 to 210 ms pauses in serve under the benchmark's load (a p99 outlier)."""
    gc.freeze()


def run_service(options: ServiceOptions, run_pipeline: RunPipeline, inputs: Sequence[TensorSpec],
                outputs: Sequence[TensorSpec], echo: Callable[[str], None] = print) -> int:
    """Serve `run_pipeline` over the OIP (REST, gRPC) until SIGTERM/Ctrl-C (drained: exit 0) or the pipeline
    stops (an error).

    The caller turns SIGTERM into KeyboardInterrupt (console.run_command does).
    """
    service = Service(options, inputs, outputs)
    try:
        service.start(run_pipeline)
        if service.server is not None:
            echo(f"serving model {options.model_name!r} on {service.url} (OIP v2; metrics at {service.url}/metrics)")
        if service.grpc is not None:
            echo(f"serving model {options.model_name!r} over gRPC on {service.grpc_target} (OIP v2, "
                 f"{'TLS' if options.tls_cert else 'plaintext'})")
        frozen = False
        while not service.pipeline_done.wait(0.2):
            if service.ready and not frozen:
                freeze()
                frozen = True
    except KeyboardInterrupt:
        echo("draining: not ready, no new requests, answering those in flight")
        try:
            clean = service.drain()
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, every waiting request gets a 503
            service.close()
            clean = False
        echo("drained: every request answered" if clean else "stopped: requests still waiting got a 503")
        return 0
    service.close()
    raise DnnpipeError(f"the pipeline stopped: {service.pipeline_error or 'it returned while serving'}")
