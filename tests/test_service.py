"""The inference service end to end: real TFLite models, real sockets, tritonclient (a client nobody here wrote)
and raw HTTP for what no polite client sends; every result checked against the Keras model."""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import ssl
import subprocess
import threading
import time

import h5py
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

import models
from dnnpipe.errors import ConfigError, DnnpipeError
from dnnpipe.service.backend import SingleDevice
from dnnpipe.service.options import ServiceOptions
from dnnpipe.service.service import Service
from dnnpipe.service.options import read_token
from serve_setup import make_served


_built: dict = {}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A partitioned example model with its whole model.tflite, its data rows and the Keras model's outputs
    (built once per session, also for test_service_cli)."""
    if "tiny" not in _built:
        served = make_served(tmp_path_factory.mktemp("tiny"), [1.0, 1.0], input_size=16, rows=6, repeats=2)
        with h5py.File(served.data) as f:
            images = f["images"][:]
        (name, expected), = served.expected.items()
        _built["tiny"] = served.parts / served.name, images, name, expected
    return _built["tiny"]


@pytest.fixture(scope="module")
def two_in_two_out(tmp_path_factory):
    """A two-input, two-output model cut into two stages (no whole model.tflite: the backend chains them)."""
    from dnnpipe.partition.graph import analyse, as_functional
    from dnnpipe.partition.partitioner import partition_keras_model

    model = as_functional(models.two_in_two_out())
    units = analyse(model)[0].U
    folder = tmp_path_factory.mktemp("multi")
    partition_keras_model(model, [[1, 3, 1], [4, units, 2]], folder, "multi", "test plan")
    rng = np.random.default_rng(3)
    features, patch = rng.random((3, 6), np.float32), rng.random((3, 4, 4, 1), np.float32)
    main, aux = (np.asarray(t) for t in model([features, patch], training=False))
    return folder, features, patch, main, aux


@contextlib.contextmanager
def serving(folder, gate: threading.Event | None = None, **options):
    """A running service on a free loopback port; `gate` holds the pipeline back until it is set."""
    backend = SingleDevice(folder)
    manifest = backend.manifest

    def run(feed, events):
        if gate is not None:
            gate.wait(30)
        backend(feed, events)

    service = Service(ServiceOptions(model_name=options.pop("model_name", "m"), port=0, **options),
                      manifest.inputs, manifest.outputs)
    service.start(run)
    try:
        yield service
    finally:
        if gate is not None:
            gate.set()
        assert service.drain()


def client(service, **kwargs):
    return triton.InferenceServerClient(f"127.0.0.1:{service.port}", network_timeout=30, **kwargs)


def wait_ready(service):
    deadline = time.monotonic() + 20
    while not service.ready:
        assert time.monotonic() < deadline, "the service never became ready"
        time.sleep(0.02)


def raw(service, method, path, body=b"", headers=None, context=None):
    """One request over a fresh connection: (status, headers, body)."""
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", service.port, timeout=30, context=context)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def image_input(images, binary):
    tensor = triton.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


def input_name(folder):
    return SingleDevice(folder).manifest.inputs[0].name


def test_metadata_and_health_with_tritonclient(tiny):
    folder, images, output, _ = tiny
    with serving(folder, model_name="tiny") as service:
        c = client(service)
        wait_ready(service)
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("tiny")
        assert not c.is_model_ready("other")
        assert "binary_tensor_data" in c.get_server_metadata()["extensions"]
        meta = c.get_model_metadata("tiny")
        assert meta["inputs"] == [{"name": input_name(folder), "datatype": "FP32", "shape": [-1, *images.shape[1:]]}]
        assert [t["name"] for t in meta["outputs"]] == [output]
        with pytest.raises(InferenceServerException, match="unknown model 'other'"):
            c.get_model_metadata("other")
        c.close()


@pytest.mark.parametrize("binary", [False, True])
def test_infer_a_batch_matches_the_model(tiny, binary):
    folder, images, output, expected = tiny
    with serving(folder, model_name="tiny") as service:
        c = client(service)
        tensor = triton.InferInput(input_name(folder), list(images[:4].shape), "FP32")
        tensor.set_data_from_numpy(images[:4], binary_data=binary)
        result = c.infer("tiny", [tensor], outputs=[triton.InferRequestedOutput(output, binary_data=binary)],
                         request_id="batch-4")
        assert result.get_response()["id"] == "batch-4"
        np.testing.assert_allclose(result.as_numpy(output), expected[:4], rtol=1e-4, atol=1e-4)
        c.close()


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_compressed_requests(tiny, compression):
    folder, images, output, expected = tiny
    with serving(folder, model_name="tiny") as service:
        c = client(service)
        result = c.infer("tiny", [image_input_named(folder, images[:2])], request_compression_algorithm=compression)
        np.testing.assert_allclose(result.as_numpy(output), expected[:2], rtol=1e-4, atol=1e-4)
        c.close()


def test_two_inputs_two_outputs_by_name_and_in_any_order(two_in_two_out):
    folder, features, patch, main, aux = two_in_two_out
    with serving(folder, model_name="multi") as service:
        c = client(service)
        a = triton.InferInput("patch", list(patch.shape), "FP32")
        a.set_data_from_numpy(patch, binary_data=True)
        b = triton.InferInput("features", list(features.shape), "FP32")
        b.set_data_from_numpy(features, binary_data=False)
        outputs = [triton.InferRequestedOutput("aux_out", binary_data=False),
                   triton.InferRequestedOutput("main_out", binary_data=True)]
        result = c.infer("multi", [a, b], outputs=outputs)
        np.testing.assert_allclose(result.as_numpy("main_out"), main, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(result.as_numpy("aux_out"), aux, rtol=1e-4, atol=1e-5)
        c.close()


def test_16_clients_each_answered_once_and_right(tiny):
    folder, images, output, expected = tiny
    errors: list = []
    with serving(folder, model_name="tiny") as service:
        def work(worker):
            c = client(service)
            for i in range(6):
                row = (worker + i) % len(images)
                try:
                    result = c.infer("tiny", [image_input_named(folder, images[row:row + 1])])
                    np.testing.assert_allclose(result.as_numpy(output)[0], expected[row], rtol=1e-4, atol=1e-4)
                except Exception as e:  # collected: an assertion in a thread would be lost
                    errors.append(e)
            c.close()

        threads = [threading.Thread(target=work, args=(w,)) for w in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        metrics = raw(service, "GET", "/metrics")[2].decode()
    assert not errors, errors[:3]
    assert 'dnnpipe_requests_total{code="200",model="tiny"} 96.0' in metrics
    for name in ("dnnpipe_request_duration_seconds_bucket", "dnnpipe_queue_depth", "dnnpipe_inflight",
                 "dnnpipe_replans_total", "dnnpipe_recovery_seconds", 'dnnpipe_stage_seconds{device="1",stage="1"}',
                 "dnnpipe_devices_up 1.0"):
        assert name in metrics, name


def image_input_named(folder, images):
    tensor = triton.InferInput(input_name(folder), list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=True)
    return tensor


def test_malformed_requests_get_a_4xx_with_one_line(tiny):
    folder, images, _, _ = tiny
    name = input_name(folder)
    good = {"inputs": [{"name": name, "datatype": "FP32", "shape": [1, *images.shape[1:]],
                        "data": images[0].ravel().tolist()}]}
    wrong_shape = {"inputs": [{**good["inputs"][0], "shape": [1, 3]}]}
    wrong_type = {"inputs": [{**good["inputs"][0], "datatype": "INT8"}]}
    with serving(folder, model_name="tiny", max_body_bytes=1 << 16) as service:
        for path, body, status, fragment in [
                ("/v2/models/tiny/infer", b"{", 400, "not valid JSON"),
                ("/v2/models/tiny/infer", json.dumps(wrong_shape).encode(), 400, "must have shape"),
                ("/v2/models/tiny/infer", json.dumps(wrong_type).encode(), 400, "must be datatype FP32"),
                ("/v2/models/nope/infer", json.dumps(good).encode(), 404, "unknown model 'nope'"),
                ("/v2/models/tiny/infer", b"x" * (1 << 17), 413, "over the limit"),
                ("/v2/nothing", b"", 404, "no such endpoint")]:
            got, _, answer = raw(service, "POST", path, body, {"Content-Type": "application/json"})
            assert got == status, (path, answer)
            message = json.loads(answer)["error"]
            assert fragment in message and "\n" not in message
        got, _, answer = raw(service, "POST", "/v2/models/tiny/infer", json.dumps(good).encode())
        assert got == 200 and json.loads(answer)["outputs"][0]["shape"][0] == 1
        # refused before its body was read: the connection closes, so the body is never taken for a request
        got, headers, _ = raw(service, "POST", "/v2/models/nope/infer", json.dumps(good).encode())
        assert got == 404 and headers.get("Connection") == "close"
        connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
        for _ in range(2):  # a good request leaves the connection open for the next
            connection.request("POST", "/v2/models/tiny/infer", body=json.dumps(good).encode())
            response = connection.getresponse()
            assert response.status == 200 and response.getheader("Connection") is None
            response.read()
        connection.close()


def test_a_trickling_client_gets_408_and_slows_no_one(tiny):
    folder, images, output, expected = tiny
    with serving(folder, model_name="tiny", read_timeout=1.0) as service:
        slow = socket.create_connection(("127.0.0.1", service.port), timeout=30)
        slow.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        c = client(service)
        for row in range(3):  # served while the trickler holds its connection
            result = c.infer("tiny", [image_input_named(folder, images[row:row + 1])])
            np.testing.assert_allclose(result.as_numpy(output)[0], expected[row], rtol=1e-4, atol=1e-4)
        c.close()
        answer = b""
        try:
            for _ in range(100):  # a byte every 0.1 s until the service answers
                if select.select([slow], [], [], 0.1)[0]:
                    break
                slow.sendall(b" ")
        except OSError:
            pass
        while chunk := slow.recv(4096):
            answer += chunk
        slow.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"did not arrive within 1 s" in answer


def test_token_required_except_for_health(tiny, tmp_path):
    folder, images, output, expected = tiny
    (tmp_path / "token").write_text("s3cret-token\n")
    with serving(folder, model_name="tiny", token_file=tmp_path / "token") as service:
        assert raw(service, "GET", "/v2/health/live")[0] == 200
        assert raw(service, "GET", "/v2/models/tiny")[0] == 401
        status, headers, body = raw(service, "GET", "/v2/models/tiny", headers={"Authorization": "Bearer wrong"})
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer" and b"bearer token" in body
        c = client(service)
        with pytest.raises(InferenceServerException, match="bearer token"):
            c.infer("tiny", [image_input_named(folder, images[:1])])
        c.close()
        c = client(service)
        result = c.infer("tiny", [image_input_named(folder, images[:1])],
                         headers={"Authorization": "Bearer s3cret-token"})
        np.testing.assert_allclose(result.as_numpy(output)[0], expected[0], rtol=1e-4, atol=1e-4)
        c.close()


def test_a_public_address_needs_a_token_or_insecure(tmp_path):
    with pytest.raises(ConfigError, match="not a loopback address"):
        read_token(ServiceOptions(model_name="m", host="0.0.0.0"))
    assert read_token(ServiceOptions(model_name="m", host="0.0.0.0", insecure=True)) is None
    assert read_token(ServiceOptions(model_name="m", host="::1")) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty: the token must be one word"):
        read_token(ServiceOptions(model_name="m", token_file=tmp_path / "empty"))


def test_https_with_a_self_signed_certificate(tiny, tmp_path):
    folder, images, _, expected = tiny
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True, timeout=60)
    with serving(folder, model_name="tiny", tls_cert=cert, tls_key=key) as service:
        assert service.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        body = json.dumps({"inputs": [{"name": input_name(folder), "datatype": "FP32",
                                       "shape": [1, *images.shape[1:]], "data": images[1].ravel().tolist()}]})
        status, _, answer = raw(service, "POST", "/v2/models/tiny/infer", body.encode(), context=context)
        assert status == 200
        got = np.array(json.loads(answer)["outputs"][0]["data"], np.float32)
        np.testing.assert_allclose(got, expected[1].ravel(), rtol=1e-4, atol=1e-4)
        with pytest.raises(ssl.SSLError):  # a client that does not trust the certificate
            raw(service, "GET", "/v2/health/live", context=ssl.create_default_context())
        with pytest.raises((ConnectionError, http.client.BadStatusLine)):  # plain HTTP to an HTTPS port
            raw(service, "GET", "/v2/health/live")


def test_overload_gets_503_and_a_late_answer_504(tiny):
    folder, images, output, expected = tiny
    gate = threading.Event()
    body = json.dumps({"inputs": [{"name": input_name(folder), "datatype": "FP32", "shape": [1, *images.shape[1:]],
                                   "data": images[2].ravel().tolist()}]}).encode()
    with serving(folder, gate, model_name="tiny", queue_size=2, request_timeout=1.5) as service:
        answers: list = []
        waiting = [threading.Thread(target=lambda: answers.append(raw(service, "POST", "/v2/models/tiny/infer",
                                                                      body))) for _ in range(2)]
        for t in waiting:
            t.start()
        deadline = time.monotonic() + 10
        while service.feed.depth < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, headers, answer = raw(service, "POST", "/v2/models/tiny/infer", body)
        assert status == 503 and headers["Retry-After"] == "1" and b"queue is full" in answer
        assert not service.ready  # the held pipeline never said it was up
        assert raw(service, "GET", "/v2/health/ready")[:3:2] == (400, b"")
        assert raw(service, "GET", "/v2/models/tiny/ready")[0] == 400
        for t in waiting:
            t.join(30)
        assert [a[0] for a in answers] == [504, 504]
        assert b"request timeout of 1.5 s" in answers[0][2]
        gate.set()  # the pipeline starts; the expired inputs are computed and dropped, new ones served
        wait_ready(service)
        assert raw(service, "GET", "/v2/health/ready")[0] == 200
        deadline = time.monotonic() + 30
        while service.feed.depth + service.feed.inflight > 0:  # the expired inputs still hold the queue
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, _, answer = raw(service, "POST", "/v2/models/tiny/infer", body)
        assert status == 200
        np.testing.assert_allclose(json.loads(answer)["outputs"][0]["data"], expected[2].ravel(), rtol=1e-4,
                                   atol=1e-4)


def test_a_drain_that_cannot_finish_answers_503_in_time(tiny):
    folder, images, _, _ = tiny
    backend = SingleDevice(folder)
    gate = threading.Event()

    def stuck(feed, events):  # a pipeline that never takes an input until released
        gate.wait(30)
        backend(feed, events)

    service = Service(ServiceOptions(model_name="tiny", port=0, drain_timeout=1.0), backend.manifest.inputs,
                      backend.manifest.outputs)
    service.start(stuck)
    body = json.dumps({"inputs": [{"name": input_name(folder), "datatype": "FP32", "shape": [1, *images.shape[1:]],
                                   "data": images[0].ravel().tolist()}]}).encode()
    answers: list = []
    waiting = threading.Thread(target=lambda: answers.append(raw(service, "POST", "/v2/models/tiny/infer", body)))
    waiting.start()
    deadline = time.monotonic() + 10
    while service.feed.depth < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert service.drain() is False
    waiting.join(30)
    gate.set()
    assert answers[0][0] == 503 and b"shutting down" in answers[0][2]
    with pytest.raises(OSError):  # no longer listening
        socket.create_connection(("127.0.0.1", service.port), timeout=5)


def test_idle_connections_cannot_take_every_thread(tiny):
    folder = tiny[0]
    with serving(folder, model_name="tiny", max_connections=2) as service:
        idle = [socket.create_connection(("127.0.0.1", service.port), timeout=30) for _ in range(2)]
        deadline = time.monotonic() + 10
        while service.server.connections < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, headers, body = raw(service, "GET", "/v2/health/live")
        assert status == 503 and headers["Retry-After"] == "1" and b"too many open connections" in body
        idle[0].close()
        while service.server.connections > 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert raw(service, "GET", "/v2/health/live")[0] == 200
        idle[1].close()


def test_a_service_never_started_closes_at_once(tiny):
    backend = SingleDevice(tiny[0])
    service = Service(ServiceOptions(model_name="tiny", port=0), backend.manifest.inputs, backend.manifest.outputs)
    done = threading.Thread(target=service.drain)
    done.start()
    done.join(15)
    assert not done.is_alive()


def test_connections_send_without_nagle_delay(tiny):
    """A response is two writes (headers, body): with Nagle's algorithm a lone request waited for the client's
    delayed ACK (40 ms)."""
    from dnnpipe.service.server import Handler

    seen = []

    class Watched(Handler):
        def setup(self):
            super().setup()
            seen.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    with serving(tiny[0], model_name="tiny") as service:
        service.server.RequestHandlerClass = Watched
        assert raw(service, "GET", "/v2/health/live")[0] == 200
    assert seen and seen[0] != 0


def test_a_non_ascii_digit_content_length_is_a_400(tiny):
    """'²' passes str.isdigit but not int(): it was a traceback in the handler and no answer."""
    with serving(tiny[0], model_name="tiny") as service, \
            socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
        sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n")
        answer = sock.makefile("rb").read()
    status, _, body = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 400 Bad Request", answer
    assert b"Content-Length must be a whole number" in body


def test_after_the_pipeline_stops_requests_get_503_at_once(tiny):
    """Not a 504 after the request timeout: the stopped pipeline's feed refuses new requests."""
    backend = SingleDevice(tiny[0])
    service = Service(ServiceOptions(model_name="tiny", port=0, request_timeout=20), backend.manifest.inputs,
                      backend.manifest.outputs)

    def broken(feed, events):
        raise RuntimeError("the plan has no devices")

    service.start(broken)
    try:
        assert service.pipeline_done.wait(20)
        images = tiny[1][:1]
        body = json.dumps({"inputs": [{"name": input_name(tiny[0]), "datatype": "FP32", "shape": list(images.shape),
                                       "data": images.ravel().tolist()}]}).encode()
        status, headers, answer = raw(service, "POST", "/v2/models/tiny/infer", body)
        assert status == 503 and headers.get("Retry-After") == "1", answer
    finally:
        service.close()


def test_a_result_that_breaks_the_answer_is_a_500_with_one_line(tiny):
    """A fault of the service's own (here a pipeline delivering a mapping, not a list of arrays) is answered."""
    backend = SingleDevice(tiny[0])
    service = Service(ServiceOptions(model_name="tiny", port=0), backend.manifest.inputs, backend.manifest.outputs)

    def wrong(feed, events):
        events.ready(True)
        index = 0
        while not feed.exhausted(index):
            if feed.wait_input(index, 0.1) is not None:
                feed.deliver(index, {"not": "a list"})
                index += 1

    service.start(wrong)
    try:
        images = tiny[1][:1]
        body = json.dumps({"inputs": [{"name": input_name(tiny[0]), "datatype": "FP32", "shape": list(images.shape),
                                       "data": images.ravel().tolist()}]}).encode()
        status, _, answer = raw(service, "POST", "/v2/models/tiny/infer", body)
        message = json.loads(answer)["error"]
        assert status == 500 and message.startswith("internal error: KeyError") and "\n" not in message
    finally:
        assert service.drain()


def test_a_failed_bind_starts_no_deadline_thread(tiny, monkeypatch):
    started = []

    class Recorded(threading.Thread):
        def start(self):
            started.append(self.name)
            super().start()

    backend = SingleDevice(tiny[0])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(threading, "Thread", Recorded)
        with pytest.raises(DnnpipeError, match="cannot listen"):
            Service(ServiceOptions(model_name="tiny", port=taken.getsockname()[1]), backend.manifest.inputs,
                    backend.manifest.outputs)
    assert "read-deadlines" not in started


def test_the_package_loads_nothing_and_the_server_imports_no_service():
    """An empty __init__ (it loaded the interpreter and prometheus_client), and server.py depends on a Protocol
    of what its handler calls, not on service.py (they imported each other)."""
    import sys

    code = ("import sys, dnnpipe.service; loaded = set(sys.modules); import dnnpipe.service.server; "
            "print(sorted(m for m in loaded if m.startswith(('prometheus_client', 'dnnpipe.interpreter', "
            "'dnnpipe.service.')))); print('dnnpipe.service.service' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.split("\n")[:2] == ["[]", "False"], result.stdout


def test_an_answer_is_counted_before_the_client_has_it(tiny):
    """The counter moved after the answer was written: a client could read /metrics without its request (the
    16-client test saw 95 of 96 under load). A handler slow after writing widens that gap."""
    from dnnpipe.service.server import Handler

    class SlowAfterWriting(Handler):
        def reply(self, *args, **kwargs):
            super().reply(*args, **kwargs)
            self.wfile.flush()
            time.sleep(1.0)

    folder, images = tiny[0], tiny[1][:1]
    body = json.dumps({"inputs": [{"name": input_name(folder), "datatype": "FP32", "shape": list(images.shape),
                                   "data": images.ravel().tolist()}]}).encode()
    with serving(folder, model_name="tiny") as service:
        service.server.RequestHandlerClass = SlowAfterWriting
        wait_ready(service)
        assert raw(service, "POST", "/v2/models/tiny/infer", body)[0] == 200
        metrics = raw(service, "GET", "/metrics")[2].decode()
    assert 'dnnpipe_requests_total{code="200",model="tiny"} 1.0' in metrics
    assert "dnnpipe_request_read_seconds_count 1.0" in metrics  # the first byte to the last, once per request


def binary_body(name, rows):
    """An infer request with the binary tensor extension: (body, headers)."""
    data = np.ascontiguousarray(rows, "<f4").tobytes()
    header = json.dumps({"inputs": [{"name": name, "datatype": "FP32", "shape": list(rows.shape),
                                     "parameters": {"binary_data_size": len(data)}}]}).encode()
    return header + data, {"Inference-Header-Content-Length": str(len(header)),
                           "Content-Type": "application/octet-stream"}


def test_one_connection_reads_every_body_into_one_buffer_and_answers_each_right(tiny):
    """The body is read into the connection's buffer (no allocation per request): bodies of other sizes one
    after the other on one kept-alive connection, each answered with its own rows' results."""
    from dnnpipe.service.server import Handler

    reused = []

    class Watched(Handler):
        def read_body(self):
            before = self.buffer
            body = super().read_body()
            reused.append(before is not None and self.lent is before)
            return body

    folder, images, output, expected = tiny
    with serving(folder, model_name="tiny") as service:
        service.server.RequestHandlerClass = Watched
        c = client(service)
        for rows in ([0, 1], [2], [3, 4, 5], [1], [5, 0]):
            tensor = triton.InferInput(input_name(folder), [len(rows), *images.shape[1:]], "FP32")
            tensor.set_data_from_numpy(images[rows], binary_data=True)
            result = c.infer("tiny", [tensor], outputs=[triton.InferRequestedOutput(output, binary_data=True)])
            np.testing.assert_allclose(result.as_numpy(output), expected[rows], rtol=1e-4, atol=1e-4)
        c.close()
    assert reused == [False, True, False, True, True]  # a larger body needs a larger buffer once


def test_an_expired_requests_queued_inputs_are_not_overwritten_by_the_next_body(tiny):
    """A 504 leaves the request's inputs queued (views of the body): the connection's next body must go to a
    new buffer, or the pipeline would compute the expired input from the next request's bytes."""
    folder, images, output, expected = tiny
    backend = SingleDevice(folder)
    gate, seen = threading.Event(), {}

    class Recording:
        def __init__(self, feed):
            self.feed = feed

        def wait_input(self, index, timeout):
            row = self.feed.wait_input(index, timeout)
            if row is not None:
                seen.setdefault(index, np.array(row[0]))
            return row

        def __getattr__(self, name):
            return getattr(self.feed, name)

    def run(feed, events):
        gate.wait(30)
        backend(Recording(feed), events)

    service = Service(ServiceOptions(model_name="tiny", port=0, request_timeout=1.0), backend.manifest.inputs,
                      backend.manifest.outputs)
    service.start(run)
    connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    try:
        body, headers = binary_body(input_name(folder), images[2:3])
        connection.request("POST", "/v2/models/tiny/infer", body=body, headers=headers)
        response = connection.getresponse()
        assert response.status == 504, response.read()
        response.read()
        body, headers = binary_body(input_name(folder), images[4:5])
        connection.request("POST", "/v2/models/tiny/infer", body=body, headers=headers)
        deadline = time.monotonic() + 10
        while service.feed.depth < 2:  # the second body is read and queued behind the expired input
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gate.set()
        response = connection.getresponse()
        answer = response.read()
        assert response.status == 200, answer
        header_length = int(response.getheader("Inference-Header-Content-Length") or len(answer))
        got = np.frombuffer(answer[header_length:], "<f4") if header_length < len(answer) else \
            np.array(json.loads(answer)["outputs"][0]["data"], np.float32)
        np.testing.assert_allclose(got, expected[4].ravel(), rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(seen[0], images[2])  # the expired input as its client sent it
        np.testing.assert_array_equal(seen[1], images[4])
    finally:
        connection.close()
        assert service.drain()


def exchange(service, data: bytes) -> bytes:
    """Raw bytes to the service, everything it answers until it closes."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
        sock.sendall(data)
        return sock.makefile("rb").read()


@pytest.mark.parametrize("request_bytes, status, fragment", [
    (b"POST /v2/models/tiny/infer HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 20\r\n\r\n{}",
     b"400 Bad Request", b"Content-Length given twice"),
    (b"GET /v2 HTTP/1.1\r\nHost x\r\n\r\n", b"400 Bad Request", b"malformed header line"),
    (b"GET /v2 HTTP/1.1\r\n Host: x\r\n\r\n", b"400 Bad Request", b"malformed header line"),
    (b"GET /v2 HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", b"431 Request Header Fields Too Large",
     b"more than 100 header lines"),
    (b"GET /v2 HTTP/1.1\r\nX-A: " + b"b" * 70000 + b"\r\n\r\n", b"431 Request Header Fields Too Large",
     b"longer than 64 KiB"),
    (b"GET /v2 HTTP/2.0\r\n\r\n", b"505 HTTP Version Not Supported", b"HTTP version 'HTTP/2.0'"),
    (b"GET /v2\r\n\r\n", b"400 Bad Request", b"bad request line"),
    (b"GET\xa0/v2\xa0HTTP/1.1\r\n\r\n", b"400 Bad Request", b"bad request line"),
    (b"GET /v2 HTTP/1.1\r\nX-A: b\rc\r\n\r\n", b"400 Bad Request", b"malformed header line"),
    (b"GET /v2 HTTP/1.1\r\nX-A: b\x00\r\n\r\n", b"400 Bad Request", b"malformed header line"),
    (b"GET /v2 HTTP/1.1\r\nX(A): b\r\n\r\n", b"400 Bad Request", b"malformed header line"),
    # a body on a GET, never read, would be taken for the connection's next request (smuggling)
    (b"GET /v2/health/live HTTP/1.1\r\nContent-Length: 41\r\n\r\nGET /v2/health/live HTTP/1.1\r\nX: y\r\n\r\n",
     b"400 Bad Request", b"takes no body"),
    (b"GET /v2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"400 Bad Request", b"takes no body"),
    (b"POST /v2/models/tiny/infer HTTP/1.1\r\nTransfer-Encoding:\r\nContent-Length: 2\r\n\r\n{}",
     b"411 Length Required", b"chunked bodies are not accepted"),
])
def test_a_malformed_request_line_or_header_gets_a_4xx_and_a_close(tiny, request_bytes, status, fragment):
    with serving(tiny[0], model_name="tiny") as service:
        answer = exchange(service, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status) and b"Connection: close" in head, answer[:300]
    assert fragment in body and body.count(b"\n") == 0, body


def test_expect_100_continue_and_http_1_0(tiny):
    """curl sends `Expect: 100-continue` before a large body; an HTTP/1.0 client gets its answer and a close."""
    folder, images, output, expected = tiny
    body, headers = binary_body(input_name(folder), images[1:2])
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
    with serving(folder, model_name="tiny") as service:
        wait_ready(service)
        with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
            sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nExpect: 100-continue\r\n" + head +
                         f"Content-Length: {len(body)}\r\n\r\n".encode())
            reader = sock.makefile("rb")
            assert reader.readline() == b"HTTP/1.1 100 Continue\r\n" and reader.readline() == b"\r\n"
            sock.sendall(body)
            assert reader.readline().startswith(b"HTTP/1.1 200 OK")
        with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:  # too big: no 100
            sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nExpect: 100-continue\r\n"
                         b"Content-Length: 999999999999\r\n\r\n")
            assert sock.makefile("rb").readline().startswith(b"HTTP/1.1 413")
        answer = exchange(service, b"GET /v2 HTTP/1.0\r\n\r\n")  # ends: the service closed the connection
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["name"] == "dnnpipe"


def test_a_closed_connection_lets_go_of_its_body_buffer(tiny):
    """The handler's answer callback made a cycle: a closed connection's buffer (up to 4 MiB, or a lent body of
    up to the body limit) waited for the cyclic collector. Now it goes when the connection closes."""
    import gc
    import weakref

    from dnnpipe.service.server import Handler

    folder, images, output, expected = tiny
    handlers: list = []
    original = Handler.setup

    def setup(self):
        handlers.append(weakref.ref(self))
        original(self)

    gc.disable()
    try:
        with serving(folder, model_name="tiny") as service:
            wait_ready(service)
            Handler.setup = setup
            try:
                body, headers = binary_body(input_name(folder), images[1:2])
                connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
                connection.request("POST", "/v2/models/tiny/infer", body=body, headers={**headers,
                                                                                       "Connection": "close"})
                response = connection.getresponse()
                assert response.status == 200, response.read()
                response.read()
                connection.close()
            finally:
                Handler.setup = original
            deadline = time.monotonic() + 10
            while any(ref() is not None for ref in handlers) and time.monotonic() < deadline:
                time.sleep(0.05)
            alive = [ref() for ref in handlers if ref() is not None]
            assert handlers and not [h for h in alive if h.buffer is not None or h.lent is not None]
    finally:
        gc.enable()


def test_the_heap_is_frozen_once_the_pipeline_is_up(tiny, monkeypatch):
    """A full collection in serve walked everything its start built while every answer waited (60-210 ms
    pauses under the benchmark's load): run_service moves it out of the collector's reach once, when ready."""
    from dnnpipe.service import service as module

    frozen, up = [], threading.Event()
    monkeypatch.setattr(module, "freeze", lambda: frozen.append(up.is_set()))
    backend = SingleDevice(tiny[0])

    def pipeline(feed, events):
        time.sleep(0.5)  # not yet up: nothing is frozen
        assert not frozen
        up.set()
        events.ready(True)
        deadline = time.monotonic() + 10
        while not frozen and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # still up: frozen once only

    with pytest.raises(DnnpipeError, match="the pipeline stopped: it returned while serving"):
        module.run_service(ServiceOptions(model_name="tiny", port=0), pipeline, backend.manifest.inputs,
                           backend.manifest.outputs, echo=lambda line: None)
    assert frozen == [True]
