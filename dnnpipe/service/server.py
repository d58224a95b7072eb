"""The HTTP front door: OIP v2 routes on a thread per connection (stdlib ThreadingHTTPServer), each connection
with read deadlines so a client that trickles bytes gets a 408 and slows no one else."""

from __future__ import annotations

import email.utils
import http.client
import json
import re
import socket
import ssl
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, ContextManager, Optional, Protocol, Sequence

from ..manifest import TensorSpec
from . import codec
from .feed import Refused
from .metrics import CONTENT_TYPE, ServiceMetrics
from .options import ServiceOptions, bearer_ok

PHRASES = {status.value: status.phrase for status in HTTPStatus}
MODEL_ROUTE = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?")
CONTENT_LENGTH = re.compile(r"[0-9]{1,19}")  # ASCII digits only: str.isdigit also takes '²'
HEADER_LINES = 100  # a request's header lines at most (the standard library's bound too), else 431
LINE_BYTES = 65536  # one request or header line at most, else 414 or 431
ONCE = frozenset({"content-length", "transfer-encoding", "content-encoding", "authorization",
                  codec.HEADER_LENGTH.lower()})  # given twice, which one counts is a guess: a 400
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110's token: methods and header names
KEEP_BUFFER = 4 << 20  # a connection keeps its body buffer for its next request up to this size (256 idle
# connections hold at most 1 GiB; EfficientNetV2B0's input is 602 KB)
ONE_WRITE = 64 << 10  # an answer up to this size goes out with its headers in one write


class FrontDoorBackend(Protocol):
    """What every front door (this HTTP one, grpcserver's) asks of the service behind it (service.Service), so
    neither imports the service."""

    @property
    def options(self) -> ServiceOptions: ...

    @property
    def inputs(self) -> Sequence[TensorSpec]: ...

    @property
    def outputs(self) -> Sequence[TensorSpec]: ...

    @property
    def version(self) -> str: ...

    @property
    def token(self) -> Optional[str]: ...

    @property
    def metrics(self) -> ServiceMetrics: ...

    @property
    def ready(self) -> bool: ...

    def request(self) -> ContextManager[None]: ...


class Backend(FrontDoorBackend, Protocol):
    """What the HTTP handler asks besides."""

    @property
    def draining(self) -> bool: ...

    def infer(self, handler: "Handler") -> None: ...


class Deadlines:
    """One thread that cuts the read side of connections whose request did not arrive in time: their next
    read ends, the handler answers 408 and closes (the write side stays open for it)."""

    def __init__(self) -> None:
        self._watched: dict[Handler, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="read-deadlines", daemon=True).start()

    def watch(self, handler: "Handler", seconds: float) -> None:
        with self._lock:
            self._watched[handler] = time.monotonic() + seconds

    def unwatch(self, handler: "Handler") -> None:
        with self._lock:
            self._watched.pop(handler, None)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            now = time.monotonic()
            with self._lock:
                late = [h for h, deadline in self._watched.items() if deadline <= now]
                for handler in late:
                    del self._watched[handler]
            for handler in late:
                handler.expired = True
                try:  # the plain socket's shutdown: SSLSocket.shutdown would drop the TLS state we write with
                    socket.socket.shutdown(handler.connection, socket.SHUT_RD)
                except OSError:
                    pass


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never blocks exit; the service waits for in-flight requests itself
    request_queue_size = 128

    def __init__(self, host: str, port: int, service: Backend, tls: Optional[ssl.SSLContext]):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.service, self.tls = service, tls
        self.deadlines = Deadlines()
        self.connections, self._count_lock = 0, threading.Lock()
        self._date = (0, "")
        super().__init__((host, port), Handler)
        self.deadlines.start()  # only once listening: a failed bind leaves no thread behind

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread for the connection, or at once a 503 and close when max_connections are open (idle
        connections cannot exhaust the threads)."""
        with self._count_lock:
            full = self.connections >= self.service.options.max_connections
            if not full:
                self.connections += 1
        if not full:
            return super().process_request(request, client_address)
        if not isinstance(request, ssl.SSLSocket):  # no handshake done: a TLS client just sees the close
            try:
                request.setblocking(False)
                request.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                             b"Retry-After: 1\r\nConnection: close\r\nContent-Length: 39\r\n\r\n"
                             b'{"error": "too many open connections"}\n')
            except OSError:
                pass
        self.shutdown_request(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count_lock:
                self.connections -= 1

    def date(self) -> str:
        """The Date header's value, formatted once a second (not once a response)."""
        second, text = self._date
        now = int(time.time())
        if now != second:
            text = email.utils.formatdate(now, usegmt=True)
            self._date = (now, text)
        return text

    def get_request(self) -> tuple[Any, Any]:
        sock, address = self.socket.accept()
        if self.tls is not None:  # the handshake runs on the connection's own thread, under its deadline
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def server_close(self) -> None:
        super().server_close()
        self.deadlines.stop()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "dnnpipe"
    disable_nagle_algorithm = True  # headers and body are two writes: Nagle + delayed ACK would add 40 ms
    server: Server
    expired = False  # the request did not arrive within the read timeout
    handshake_failed = False
    body_read = False
    sent = 0  # the status of the answer to the request being handled, 0 before (or without) one
    on_answer: Optional[Callable[[int], None]] = None  # told the status before the answer is written
    buffer: Optional[bytearray] = None  # the connection's body buffer, reused request after request
    lent: Optional[bytearray] = None  # the buffer holding the current request's body, until body_done()
    expect_continue = False  # the client waits for 100 Continue before its body

    def finish(self) -> None:
        """The connection is closed: drop what it held now, not when the cyclic collector next runs."""
        self.buffer = self.lent = None
        self.on_answer = None
        super().finish()

    def setup(self) -> None:
        super().setup()
        options = self.server.service.options
        self.connection.settimeout(options.idle_timeout)
        if isinstance(self.connection, ssl.SSLSocket):
            self.server.deadlines.watch(self, options.read_timeout)
            try:
                self.connection.do_handshake()
            except (OSError, ssl.SSLError):
                self.close_connection = True
                self.handshake_failed = True
            finally:
                self.server.deadlines.unwatch(self)

    def handle(self) -> None:
        if not self.handshake_failed:
            super().handle()

    def handle_one_request(self) -> None:
        """The stdlib's, with a deadline on the whole request once its first byte arrived."""
        self.close_connection = True
        try:
            # an idle kept-alive connection may wait idle_timeout for its next request's first byte
            if not self.rfile.peek(1):  # type: ignore[attr-defined]
                return
        except (OSError, ValueError):
            return
        self.arrived = time.monotonic()
        self.body_read, self.sent, self.on_answer = False, 0, None
        with self.server.service.request():
            self.handle_arrived()

    def handle_arrived(self) -> None:
        self.server.deadlines.watch(self, self.server.service.options.read_timeout)
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if self.expired:
                return self.too_slow()
            if len(self.raw_requestline) > 65536:
                return self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG, "request line longer than 64 KiB")
            if not self.raw_requestline:
                return
            self.close_connection = False
            if not self.parse_request():
                return self.too_slow() if self.expired and not self.sent else None
            if self.server.service.draining:  # answered, then closed: nothing new on this connection
                self.close_connection = True
            if self.expired:
                return self.too_slow()
            method = getattr(self, f"do_{self.command}", None)
            if method is None:
                return self.send_error(HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command} not allowed")
            method()
            self.wfile.flush()
        except (TimeoutError, ConnectionError, ssl.SSLError):
            self.close_connection = True
        finally:
            self.server.deadlines.unwatch(self)

    def parse_request(self) -> bool:
        """The request line and headers (HTTP/1.0 and 1.1). The standard library's own runs every request's
        headers through the email package: a fifth of the front door's time for a 600 KB request."""
        self.command, self.request_version, self.close_connection = "", self.default_request_version, True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split(" ")
        if len(words) != 3 or not TOKEN.fullmatch(words[0]):
            self.send_error(400, f"bad request line {self.requestline[:200]!r}")
            return False
        command, path, version = words
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            self.send_error(505 if version.startswith("HTTP/") else 400,
                            f"HTTP version {version[:20]!r} is not served (HTTP/1.0, HTTP/1.1)")
            return False
        self.command, self.path, self.request_version = command, path, version
        headers = self.read_headers()
        if headers is None:
            return False
        self.headers = headers
        connection = headers.get("Connection", "").lower()
        self.close_connection = connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive")
        if command != "POST" and (headers.get("Transfer-Encoding") is not None or
                                  headers.get("Content-Length", "0") != "0"):
            # never read, the body would be taken for the next request on this connection (smuggling)
            self.close_connection = True
            self.send_error(400, f"a {command[:20]} request takes no body")
            return False
        # 100 Continue only once the token and the length passed (read_body), so a refused body is never sent
        self.expect_continue = headers.get("Expect", "").lower() == "100-continue" and version == "HTTP/1.1"
        return True

    def read_headers(self) -> Optional[http.client.HTTPMessage]:
        """The header lines up to the blank one; None after a 4xx was sent (or when the read was cut: 408)."""
        headers, seen = http.client.HTTPMessage(), set()
        for _ in range(HEADER_LINES + 1):
            line = self.rfile.readline(LINE_BYTES + 1)
            if self.expired:
                return None
            if len(line) > LINE_BYTES:
                self.send_error(431, "a header line is longer than 64 KiB")
                return None
            if line in (b"\r\n", b"\n", b""):
                return headers
            name, colon, value = str(line, "iso-8859-1").rstrip("\r\n").partition(":")
            if not colon or not TOKEN.fullmatch(name) or "\r" in value or "\x00" in value:
                self.send_error(400, f"malformed header line {line[:100]!r}")
                return None
            key = name.lower()
            if key in seen and key in ONCE:
                self.send_error(400, f"header {name[:100]} given twice")
                return None
            seen.add(key)
            headers[name] = value.strip()
        self.send_error(431, f"more than {HEADER_LINES} header lines")
        return None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        pass  # the metrics count requests; a line per request would flood a served pipeline's log

    # Answers

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """Every error as JSON {"error": one line} (the OIP's form), also the stdlib's own."""
        self.reply(int(code), codec.error_body(message or HTTPStatus(code).phrase))

    def reply(self, code: int, body: bytes, content_type: str = "application/json",
              headers: Optional[dict[str, str]] = None) -> None:
        if self.expired or code in (408, 411, 413, 414, 431) or (code == 400 and self.command != "GET") or \
                (code >= 400 and self.command != "GET" and not self.body_read):
            self.close_connection = True  # the rest of the request may still be on the wire
        self.sent = code
        if self.on_answer is not None:  # counted before written: a client holding its answer sees it counted
            self.on_answer(code)
        lines = [f"HTTP/1.1 {code} {PHRASES.get(code, '')}\r\nServer: dnnpipe\r\nDate: {self.server.date()}\r\n"
                 f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in (headers or {}).items()]
        if self.close_connection:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("iso-8859-1")
        if self.command == "HEAD":
            self.wfile.write(head)
        elif len(body) <= ONE_WRITE:  # one write: one segment for a small answer
            self.wfile.write(head + body)
        else:
            self.wfile.write(head)
            self.wfile.write(body)

    def reply_json(self, value: Any) -> None:
        self.reply(200, json.dumps(value).encode())

    def too_slow(self) -> None:
        self.close_connection = True
        seconds = self.server.service.options.read_timeout
        self.reply(408, codec.error_body(f"the request did not arrive within {seconds:g} s"))

    # Routes

    def do_GET(self) -> None:
        service, path = self.server.service, self.path.split("?", 1)[0]
        if path == "/v2/health/live":
            return self.reply(200, b"")
        if path == "/v2/health/ready":
            return self.readiness()
        if not self.authorized():
            return
        if path == "/metrics":
            return self.reply(200, service.metrics.exposition(), CONTENT_TYPE)
        if path == "/v2":
            return self.reply_json(codec.server_metadata(service.version))
        route = self.model_route(path)
        if route == "":
            return self.reply_json(codec.model_metadata(service.options.model_name, service.inputs,
                                                        service.outputs))
        if route == "/ready":
            return self.readiness()
        if route is not None:
            self.send_error(405, f"{path} takes POST")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if not self.authorized():
            return
        route = self.model_route(path)
        if route is None:
            return
        if route != "/infer":
            return self.send_error(405, f"{path} takes GET")
        self.server.service.infer(self)

    def readiness(self) -> None:
        """The OIP's health answer: the status is the answer (200 true, 4xx false), the body empty."""
        self.reply(200 if self.server.service.ready else 400, b"")

    def authorized(self) -> bool:
        if bearer_ok(self.server.service.token, self.headers.get("Authorization", "")):
            return True
        self.close_connection = True
        self.reply(401, codec.error_body("missing or wrong bearer token (Authorization: Bearer <token>)"),
                   headers={"WWW-Authenticate": "Bearer"})
        return False

    def model_route(self, path: str) -> Optional[str]:
        """The part after /v2/models/NAME[/versions/1] ('' for metadata), or None after a 404 was sent."""
        match = MODEL_ROUTE.fullmatch(path)
        if match is None:
            self.send_error(404, f"no such endpoint {path[:200]!r}")
            return None
        name, version = match[1], match[2]
        if name != self.server.service.options.model_name or version not in (None, "1"):
            self.send_error(404, f"unknown model {name!r}" + (f" version {version!r}" if version else ""))
            return None
        return match[3] or ""

    def read_body(self) -> Optional[codec.Buffer]:
        """The request body by Content-Length, or None after a 4xx was sent. Read into the connection's buffer
        (no allocation, no copy per request), lent until `body_done`: the body's tensors are views of it."""
        if self.headers.get("Transfer-Encoding") is not None:
            self.send_error(411, "chunked bodies are not accepted: send Content-Length")
            return None
        length = self.headers.get("Content-Length")
        if length is None:
            self.send_error(411, "Content-Length is required")
            return None
        if not CONTENT_LENGTH.fullmatch(length):
            self.send_error(400, f"Content-Length must be a whole number, got {length[:40]!r}")
            return None
        limit = self.server.service.options.max_body_bytes
        if int(length) > limit:
            self.send_error(413, f"body of {length} bytes is over the limit of {limit} bytes")
            return None
        size = int(length)
        if self.expect_continue:
            self.send_response_only(HTTPStatus.CONTINUE)
            self.end_headers()
        buffer = self.buffer if self.buffer is not None and len(self.buffer) >= size else bytearray(size)
        self.buffer, self.lent = None, buffer
        body = memoryview(buffer)[:size]
        got = 0
        while got < size:
            count = self.rfile.readinto(body[got:])
            if not count:
                break
            got += count
        if self.expired:
            self.too_slow()
            return None
        if got < size:
            self.close_connection = True
            return None
        self.server.deadlines.unwatch(self)
        self.body_read = True
        try:
            return codec.decode_body(body, self.headers.get("Content-Encoding", ""), limit)
        except codec.RequestError as e:
            self.send_error(e.status, str(e))
            return None

    def body_done(self) -> None:
        """The request's body is referenced no more (its inputs were delivered, or never queued): the next
        request may read into its buffer. Without this call the buffer is dropped, never overwritten."""
        if self.lent is not None and len(self.lent) <= KEEP_BUFFER:
            self.buffer = self.lent
        self.lent = None

    def refuse(self, error: Refused) -> None:
        self.reply(503, codec.error_body(str(error)), headers={"Retry-After": "1"})


__all__ = ["Handler", "Server", "Refused", "FrontDoorBackend"]
