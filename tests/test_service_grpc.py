"""The OIP's gRPC side end to end: real TFLite models, a real gRPC server and tritonclient.grpc (a client nobody
here wrote); every result checked against the Keras model."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from dnnpipe.errors import ConfigError, DnnpipeError
from dnnpipe.service.backend import SingleDevice
from dnnpipe.service.options import ServiceOptions, read_token
from dnnpipe.service.service import Service
from test_service import input_name, serving, tiny, two_in_two_out, wait_ready  # noqa: F401 (fixtures)

GRPC = {"grpc_host": "127.0.0.1", "grpc_port": 0, "http": False}


def client(service, **kwargs):
    return tgrpc.InferenceServerClient(service.grpc_target, **kwargs)


def image(folder, images, binary=True):
    tensor = tgrpc.InferInput(input_name(folder), list(images.shape), "FP32")
    if binary:
        tensor.set_data_from_numpy(images)  # raw_input_contents
    else:  # typed contents: fp32_contents
        tensor._get_tensor().contents.fp32_contents.extend(images.ravel().tolist())
    return tensor


def status_of(excinfo) -> str:
    return str(excinfo.value.status())


def test_metadata_and_health(tiny):  # noqa: F811
    folder, images, output, _ = tiny
    with serving(folder, model_name="tiny", **GRPC) as service:
        assert service.server is None  # the gRPC front door alone
        c = client(service)
        wait_ready(service)
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("tiny")
        assert c.is_model_ready("tiny", "1") and not c.is_model_ready("other")
        assert c.get_server_metadata().name == "dnnpipe"
        assert "binary_tensor_data" in c.get_server_metadata().extensions
        meta = c.get_model_metadata("tiny", as_json=True)
        assert meta["inputs"] == [{"name": input_name(folder), "datatype": "FP32",
                                   "shape": [str(d) for d in [-1, *images.shape[1:]]]}]  # int64 as JSON strings
        assert [t["name"] for t in meta["outputs"]] == [output] and meta["versions"] == ["1"]
        with pytest.raises(InferenceServerException, match="unknown model 'other'") as excinfo:
            c.get_model_metadata("other")
        assert status_of(excinfo) == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as excinfo:  # served by tritonclient's stubs, not by us
            c.get_model_repository_index()
        assert status_of(excinfo) == "StatusCode.UNIMPLEMENTED"
        c.close()


@pytest.mark.parametrize("binary", [False, True])
def test_infer_a_batch_typed_or_raw_matches_the_model(tiny, binary):  # noqa: F811
    folder, images, output, expected = tiny
    with serving(folder, model_name="tiny", **GRPC) as service:
        c = client(service)
        wanted = tgrpc.InferRequestedOutput(output)
        if not binary:  # typed contents asked for as in REST (tritonclient reserves binary_data_output)
            wanted._get_tensor().parameters["binary_data"].bool_param = False
        result = c.infer("tiny", [image(folder, images[:4], binary)], request_id="batch-4", outputs=[wanted])
        response = result.get_response()
        assert response.id == "batch-4" and response.model_name == "tiny"
        assert bool(response.raw_output_contents) == binary  # raw unless the client asks for typed contents
        got = result.as_numpy(output) if binary else \
            np.array(response.outputs[0].contents.fp32_contents).reshape(response.outputs[0].shape)  # as_numpy
        np.testing.assert_allclose(got, expected[:4], rtol=1e-4, atol=1e-4)  # reads no typed contents but bytes
        c.close()


def test_two_inputs_two_outputs_by_name_and_in_any_order(two_in_two_out):  # noqa: F811
    folder, features, patch, main, aux = two_in_two_out
    with serving(folder, model_name="multi", **GRPC) as service:
        c = client(service)
        a = tgrpc.InferInput("patch", list(patch.shape), "FP32")
        a.set_data_from_numpy(patch)
        b = tgrpc.InferInput("features", list(features.shape), "FP32")
        b.set_data_from_numpy(features)
        result = c.infer("multi", [a, b], outputs=[tgrpc.InferRequestedOutput("aux_out"),
                                                    tgrpc.InferRequestedOutput("main_out")])
        assert [o.name for o in result.get_response().outputs] == ["aux_out", "main_out"]
        np.testing.assert_allclose(result.as_numpy("main_out"), main, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(result.as_numpy("aux_out"), aux, rtol=1e-4, atol=1e-5)
        only = c.infer("multi", [a, b], outputs=[tgrpc.InferRequestedOutput("main_out")])
        assert only.as_numpy("aux_out") is None
        np.testing.assert_allclose(only.as_numpy("main_out"), main, rtol=1e-4, atol=1e-5)
        c.close()


def test_bad_requests_are_invalid_argument_with_one_line(tiny):  # noqa: F811
    folder, images, _, _ = tiny
    name = input_name(folder)
    wrong_type = tgrpc.InferInput(name, [1, *images.shape[1:]], "INT32")
    wrong_type.set_data_from_numpy(images[:1].astype(np.int32))
    wrong_shape = tgrpc.InferInput(name, [1, 3], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 3), np.float32))
    short = image(folder, images[:1], binary=False)
    short._get_tensor().contents.fp32_contents.pop()
    unknown = tgrpc.InferInput("nope", [1, *images.shape[1:]], "FP32")
    unknown.set_data_from_numpy(images[:1])
    cases = [(wrong_type, "must be datatype FP32, got 'INT32'"), (wrong_shape, "must have shape"),
             (short, "must hold"), (unknown, "unknown input 'nope'")]
    with serving(folder, model_name="tiny", **GRPC) as service:
        c = client(service)
        for tensor, message in cases:
            with pytest.raises(InferenceServerException, match=message) as excinfo:
                c.infer("tiny", [tensor])
            assert status_of(excinfo) == "StatusCode.INVALID_ARGUMENT"
            assert "\n" not in excinfo.value.message()
        with pytest.raises(InferenceServerException, match="unknown model 'other'") as excinfo:
            c.infer("other", [image(folder, images[:1])])
        assert status_of(excinfo) == "StatusCode.NOT_FOUND"
        c.close()
        metrics = service.metrics.exposition().decode()
        assert 'dnnpipe_requests_total{code="400",model="tiny"} 4.0' in metrics  # the unknown model: not counted


def test_a_message_over_the_body_limit_is_refused(tiny):  # noqa: F811
    folder, images, _, _ = tiny
    with serving(folder, model_name="tiny", max_body_bytes=1024, **GRPC) as service:
        c = client(service)
        with pytest.raises(InferenceServerException) as excinfo:
            c.infer("tiny", [image(folder, np.repeat(images[:1], 8, axis=0))])
        assert status_of(excinfo) == "StatusCode.RESOURCE_EXHAUSTED"
        c.close()


def test_overload_is_resource_exhausted_and_deadlines_are_deadline_exceeded(tiny):  # noqa: F811
    folder, images, output, expected = tiny
    gate = threading.Event()
    with serving(folder, gate, model_name="tiny", queue_size=2, request_timeout=1.5, **GRPC) as service:
        answers: list = []

        def wait_one():
            c = client(service)
            try:
                c.infer("tiny", [image(folder, images[2:3])])
                answers.append("ok")
            except InferenceServerException as e:
                answers.append((str(e.status()), e.message()))
            c.close()

        waiting = [threading.Thread(target=wait_one) for _ in range(2)]
        for t in waiting:
            t.start()
        deadline = time.monotonic() + 10
        while service.feed.depth < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        c = client(service)
        with pytest.raises(InferenceServerException, match="queue is full") as excinfo:
            c.infer("tiny", [image(folder, images[2:3])])
        assert status_of(excinfo) == "StatusCode.RESOURCE_EXHAUSTED"
        assert not c.is_server_ready() and not c.is_model_ready("tiny")  # the held pipeline never said it was up
        for t in waiting:
            t.join(30)
        assert [a[0] for a in answers] == ["StatusCode.DEADLINE_EXCEEDED"] * 2, answers
        assert "request timeout of 1.5 s" in answers[0][1]
        gate.set()
        wait_ready(service)
        deadline = time.monotonic() + 30
        while service.feed.depth + service.feed.inflight > 0:  # the expired inputs still hold the queue
            assert time.monotonic() < deadline
            time.sleep(0.01)
        result = c.infer("tiny", [image(folder, images[2:3])])
        np.testing.assert_allclose(result.as_numpy(output)[0], expected[2], rtol=1e-4, atol=1e-4)
        c.close()
        metrics = service.metrics.exposition().decode()
    for line in ('code="503",model="tiny"} 1.0', 'code="504",model="tiny"} 2.0', 'code="200",model="tiny"} 1.0'):
        assert f"dnnpipe_requests_total{{{line}" in metrics, metrics


def test_the_clients_own_deadline_is_honoured(tiny):  # noqa: F811
    folder, images, _, _ = tiny
    gate = threading.Event()
    with serving(folder, gate, model_name="tiny", request_timeout=30, **GRPC) as service:
        c = client(service)
        with pytest.raises(InferenceServerException) as excinfo:
            c.infer("tiny", [image(folder, images[:1])], client_timeout=0.5)
        assert status_of(excinfo) == "StatusCode.DEADLINE_EXCEEDED"
        deadline = time.monotonic() + 10  # the server gave up too: its 504 is counted, no thread left waiting
        while 'code="504"' not in service.metrics.exposition().decode():
            assert time.monotonic() < deadline, "the server kept waiting past the client's deadline"
            time.sleep(0.05)
        c.close()


def test_a_cancelled_call_stops_waiting(tiny):  # noqa: F811
    """A call the client cancels (no deadline) is given up at once, not held until the request timeout."""
    folder, images, _, _ = tiny
    gate = threading.Event()
    with serving(folder, gate, model_name="tiny", request_timeout=60, **GRPC) as service:
        c = client(service)
        answers: list = []
        call = c.async_infer("tiny", [image(folder, images[:1])], lambda result, error: answers.append(error))
        deadline = time.monotonic() + 10
        while service.feed.depth < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        call.cancel()
        deadline = time.monotonic() + 10
        while 'code="499"' not in service.metrics.exposition().decode():
            assert time.monotonic() < deadline, "the server kept waiting for a cancelled call"
            time.sleep(0.05)
        c.close()


def test_a_fault_of_the_service_is_internal_with_one_line(tiny, monkeypatch):  # noqa: F811
    folder, images, _, _ = tiny
    with serving(folder, model_name="tiny", **GRPC) as service:
        def broken(*args, **kwargs):
            raise RuntimeError("a bug\nwith a second line")

        monkeypatch.setattr(service, "compute", broken)
        c = client(service)
        with pytest.raises(InferenceServerException, match="internal error: RuntimeError: a bug") as excinfo:
            c.infer("tiny", [image(folder, images[:1])])
        assert status_of(excinfo) == "StatusCode.INTERNAL" and "second line" not in excinfo.value.message()
        c.close()


def test_token_required_except_for_health(tiny, tmp_path):  # noqa: F811
    folder, images, output, expected = tiny
    (tmp_path / "token").write_text("s3cret-token\n")
    with serving(folder, model_name="tiny", token_file=tmp_path / "token", **GRPC) as service:
        c = client(service)
        wait_ready(service)
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("tiny")
        for headers in (None, {"authorization": "Bearer wrong"}):
            with pytest.raises(InferenceServerException, match="bearer token") as excinfo:
                c.infer("tiny", [image(folder, images[:1])], headers=headers)
            assert status_of(excinfo) == "StatusCode.UNAUTHENTICATED"
            with pytest.raises(InferenceServerException, match="bearer token"):
                c.get_model_metadata("tiny", headers=headers)
        result = c.infer("tiny", [image(folder, images[:1])], headers={"authorization": "Bearer s3cret-token"})
        np.testing.assert_allclose(result.as_numpy(output)[0], expected[0], rtol=1e-4, atol=1e-4)
        assert c.get_server_metadata(headers={"authorization": "Bearer s3cret-token"}).name == "dnnpipe"
        c.close()


def test_a_public_grpc_address_needs_a_token_or_insecure():
    with pytest.raises(ConfigError, match="--grpc 0.0.0.0:9000 is not a loopback address"):
        read_token(ServiceOptions(model_name="m", grpc_host="0.0.0.0", grpc_port=9000))
    assert read_token(ServiceOptions(model_name="m", grpc_host="0.0.0.0", insecure=True)) is None


def test_tls_with_a_self_signed_certificate(tiny, tmp_path):  # noqa: F811
    folder, images, output, expected = tiny
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True, timeout=60)
    with serving(folder, model_name="tiny", tls_cert=cert, tls_key=key, **GRPC) as service:
        c = client(service, ssl=True, root_certificates=str(cert))
        result = c.infer("tiny", [image(folder, images[1:2])])
        np.testing.assert_allclose(result.as_numpy(output)[0], expected[1], rtol=1e-4, atol=1e-4)
        c.close()
        plain = client(service)  # plaintext to a TLS port
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=5)
        plain.close()


def test_rest_and_grpc_side_by_side_share_one_queue_and_one_count(tiny):  # noqa: F811
    import tritonclient.http as thttp

    folder, images, output, expected = tiny
    with serving(folder, model_name="tiny", grpc_host="127.0.0.1", grpc_port=0) as service:
        g = client(service)
        h = thttp.InferenceServerClient(f"127.0.0.1:{service.port}", network_timeout=30)
        tensor = thttp.InferInput(input_name(folder), [1, *images.shape[1:]], "FP32")
        tensor.set_data_from_numpy(images[3:4], binary_data=True)
        for result in (g.infer("tiny", [image(folder, images[3:4])]), h.infer("tiny", [tensor])):
            np.testing.assert_allclose(result.as_numpy(output)[0], expected[3], rtol=1e-4, atol=1e-4)
        g.close()
        h.close()
        assert 'dnnpipe_requests_total{code="200",model="tiny"} 2.0' in service.metrics.exposition().decode()


def test_drain_answers_a_call_in_flight_and_refuses_new_ones(tiny):  # noqa: F811
    folder, images, output, expected = tiny
    gate = threading.Event()
    with serving(folder, gate, model_name="tiny", **GRPC) as service:
        answers: list = []

        def one():
            c = client(service)
            answers.append(c.infer("tiny", [image(folder, images[4:5])]).as_numpy(output))
            c.close()

        caller = threading.Thread(target=one)
        caller.start()
        deadline = time.monotonic() + 10
        while service.feed.depth < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        drained: list = []
        drainer = threading.Thread(target=lambda: drained.append(service.drain()))
        drainer.start()
        while not service.draining:
            time.sleep(0.01)
        late = client(service)
        with pytest.raises(InferenceServerException) as excinfo:
            late.infer("tiny", [image(folder, images[:1])], client_timeout=10)
        assert status_of(excinfo) == "StatusCode.UNAVAILABLE"
        late.close()
        gate.set()
        caller.join(30)
        drainer.join(30)
        assert drained == [True]
        np.testing.assert_allclose(answers[0][0], expected[4], rtol=1e-4, atol=1e-4)


def test_a_taken_port_is_one_line(tiny):  # noqa: F811
    import socket

    folder = tiny[0]
    backend = SingleDevice(folder)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(DnnpipeError, match=r"--grpc 127.0.0.1:\d+: cannot listen"):
            Service(ServiceOptions(model_name="tiny", http=False, grpc_host="127.0.0.1",
                                   grpc_port=taken.getsockname()[1]), backend.manifest.inputs,
                    backend.manifest.outputs)


def test_rest_alone_never_loads_grpc():
    code = ("import sys; from dnnpipe.service.service import Service; from dnnpipe.service import command; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google', 'tritonclient')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_typed_contents_check_ranges_and_raw_fp16():
    """The codec alone (no server): an INT8 value out of range, an FP16 input without raw contents."""
    from dnnpipe.manifest import TensorSpec
    from dnnpipe.service import codec
    from dnnpipe.service.grpcserver import parse_request

    model = codec.ModelTensors([TensorSpec("a", "a", (1, 2), "int8"), TensorSpec("h", "h", (1, 2), "float16")],
                               [TensorSpec("o", "o", (1, 2), "float16")])
    request = pb.ModelInferRequest(model_name="m")
    a = request.inputs.add(name="a", datatype="INT8", shape=[1, 2])
    a.contents.int_contents.extend([1, 300])
    h = request.inputs.add(name="h", datatype="FP16", shape=[1, 2])
    with pytest.raises(codec.RequestError, match="outside INT8's range"):
        parse_request(request, model, 4)
    a.contents.int_contents[1] = -3
    with pytest.raises(codec.RequestError, match="FP16 data must come as raw_input_contents"):
        parse_request(request, model, 4)
    del h
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[np.int8([1, -3]).tobytes(),
                                                                       np.float16([0.5, 2]).tobytes()])
    request.inputs.add(name="a", datatype="INT8", shape=[1, 2])
    request.inputs.add(name="h", datatype="FP16", shape=[1, 2])
    request.parameters["binary_data_output"].bool_param = False
    parsed = parse_request(request, model, 4)
    np.testing.assert_array_equal(parsed.inputs[0], [[1, -3]])
    np.testing.assert_array_equal(parsed.inputs[1], np.float16([[0.5, 2]]))
    assert parsed.outputs[0].binary  # FP16 has no typed contents field: raw despite binary_data_output false


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from serve_setup import make_served

    return make_served(tmp_path_factory.mktemp("serve_grpc"), [1.0, 1.0, 1.0])


def test_serve_grpc_on_device_agents_answers_16_threads_once_each(served, tmp_path):
    """`serve --grpc` (beside --http, whose /metrics counts the answers) on three local agents: 16 client threads,
    every request answered once with the model's own result; SIGTERM drains, exit 0, no agent left."""
    import signal
    import urllib.request

    from dnnpipe.manifest import read_manifest
    from dnnpipe.testbed.local import free_ports
    from test_serve import Run, assert_no_orphans
    from test_serve_http import served_images

    registry = served.registry([1, 2, 3], tmp_path / "registry.json")
    http_port, grpc_port = free_ports(2)
    run = Run(["serve", "--device-registry", str(registry), "--model-path", str(served.parts), "--model-name",
               served.name, "--config", str(served.config), "--work-dir", str(tmp_path / "serve_work"),
               "--threshold", "100", "--http", f"127.0.0.1:{http_port}", "--grpc", f"127.0.0.1:{grpc_port}"])
    try:
        c = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        deadline = time.monotonic() + 90
        while True:
            assert run.process.poll() is None, "serve ended:\n" + "\n".join(run.lines)
            try:
                if c.is_server_ready(client_timeout=2):
                    break
            except InferenceServerException:  # not listening yet
                pass
            assert time.monotonic() < deadline, "serve --grpc never became ready:\n" + "\n".join(run.lines)
            time.sleep(0.1)
        manifest = read_manifest(served.parts / served.name)
        images, expected = served_images(served), next(iter(served.expected.values()))
        answers: dict[tuple[int, int], np.ndarray] = {}
        failures: list[str] = []

        def client_thread(t: int) -> None:
            own = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            for r in range(3):
                row = (t + r) % len(expected)
                tensor = tgrpc.InferInput(manifest.inputs[0].name, [1, *images.shape[1:]], "FP32")
                tensor.set_data_from_numpy(images[row:row + 1])
                try:
                    answers[(t, r)] = own.infer(served.name, [tensor], client_timeout=60).as_numpy(
                        manifest.outputs[0].name)
                except InferenceServerException as e:
                    failures.append(f"thread {t} request {r}: {e}")
            own.close()

        threads = [threading.Thread(target=client_thread, args=(t,)) for t in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not failures, failures[:3]
        assert len(answers) == 48
        for (t, r), got in answers.items():
            np.testing.assert_allclose(got.reshape(expected[0].shape), expected[(t + r) % len(expected)],
                                       rtol=1e-4, atol=1e-4)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=30) as response:
            metrics = response.read()
        assert f'dnnpipe_requests_total{{code="200",model="{served.name}"}} 48.0' in metrics.decode()
        c.close()
    finally:
        if run.process.poll() is None:
            run.process.send_signal(signal.SIGTERM)
    code, stdout, stderr = run.wait(30)
    assert code == 0, f"{stdout}\n{stderr}"
    assert "over gRPC on 127.0.0.1:" in stdout and "drained" in stdout, stdout
    assert_no_orphans(served.root)


def test_the_service_command_with_grpc_alone(tiny):  # noqa: F811
    """`python -m dnnpipe service --grpc`: gRPC only (no REST on --http's default port), SIGTERM exits 0."""
    import os
    import re
    import signal

    from helpers import ROOT
    from test_service_cli import read_line

    folder, images, output, expected = tiny
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen([sys.executable, "-m", "dnnpipe", "service", "--model-path", str(folder.parent),
                                "--model-name", folder.name, "--grpc", "127.0.0.1:0"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = read_line(process.stdout, 60)
        match = re.search(r"over gRPC on (127\.0\.0\.1:\d+) \(OIP v2, plaintext\)", line)
        assert match, line
        c = tgrpc.InferenceServerClient(match[1])
        tensor = tgrpc.InferInput(input_name(folder), [1, *images.shape[1:]], "FP32")
        tensor.set_data_from_numpy(images[5:6])
        np.testing.assert_allclose(c.infer(folder.name, [tensor]).as_numpy(output)[0], expected[5], rtol=1e-4,
                                   atol=1e-4)
        c.close()
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "http://" not in line + stdout and "drained" in stdout, stdout
