"""The OIP codec on bytes: requests parsed and checked against the manifest's tensors, responses built."""

import json

import numpy as np
import pytest

from dnnpipe.manifest import TensorSpec
from dnnpipe.service.codec import ModelTensors, RequestError, build_infer_response, model_metadata, parse_infer

IMAGE = TensorSpec("image", "image", (1, 2, 3), "float32")
TOKENS = TensorSpec("tokens", "tokens", (1, 4), "int32")
LOGITS = TensorSpec("logits", "logits", (1, 2), "float32")
CODES = TensorSpec("codes", "codes", (1, 3), "int8", quantization=(0.5, 1))
INPUTS, OUTPUTS = (IMAGE, TOKENS), (LOGITS, CODES)
MODEL = ModelTensors(INPUTS, OUTPUTS)


def tensor(spec_name, datatype, array, binary=False):
    item = {"name": spec_name, "datatype": datatype, "shape": list(array.shape)}
    if binary:
        item["parameters"] = {"binary_data_size": array.nbytes}
    else:
        item["data"] = array.ravel().tolist()
    return item


def body(inputs, blobs=(), **extra):
    header = json.dumps({"inputs": inputs, **extra}).encode()
    return header + b"".join(blobs), (str(len(header)) if blobs else None)


def test_json_and_binary_inputs_become_rows_in_manifest_order():
    image = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    tokens = np.arange(8, dtype=np.int32).reshape(2, 4)
    data, length = body([tensor("tokens", "INT32", tokens), tensor("image", "FP32", image, binary=True)],
                        [image.tobytes()], id="r1")
    request = parse_infer(data, length, MODEL, max_batch=4)
    assert request.id == "r1" and request.batch == 2
    rows = request.rows()
    np.testing.assert_array_equal(rows[1][0], image[1])
    np.testing.assert_array_equal(rows[1][1], tokens[1])
    assert rows[0][1].dtype == np.int32
    assert [(r.spec.name, r.binary) for r in request.outputs] == [("logits", False), ("codes", False)]


@pytest.mark.parametrize("change, fragment", [
    (lambda d: b"{not json", "not valid JSON"),
    (lambda d: d.replace(b'"FP32"', b'"FP16"'), "must be datatype FP32"),
    (lambda d: d.replace(b"[1, 2, 3]", b"[1, 3, 2]"), "must have shape [-1, 2, 3]"),
    (lambda d: d.replace(b'"image"', b'"picture"'), "unknown input 'picture'"),
    (lambda d: d.replace(b"[0.0, 1.0", b"[0.5, 1.0").replace(b'"INT32", "shape": [1, 4], "data": [0',
                                                             b'"INT32", "shape": [1, 4], "data": [0.5'),
     "whole numbers"),
    (lambda d: d.replace(b"[1, 4]", b"[2, 4]"), "must hold 8 numbers"),
    (lambda d: d.replace(b'"inputs"', b'"inputz"'), "inputs must be a list"),
])
def test_bad_requests_say_what_is_wrong(change, fragment):
    image, tokens = np.zeros((1, 2, 3), np.float32), np.zeros((1, 4), np.int32)
    data, _ = body([tensor("image", "FP32", image), tensor("tokens", "INT32", tokens)])
    with pytest.raises(RequestError, match=None) as caught:
        parse_infer(change(data), None, MODEL, max_batch=4)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_missing_input_batch_limit_and_binary_size_checked():
    image = np.zeros((5, 2, 3), np.float32)
    data, _ = body([tensor("image", "FP32", image)])
    with pytest.raises(RequestError, match="missing input 'tokens'"):
        parse_infer(data, None, MODEL, max_batch=8)
    tokens = np.zeros((5, 4), np.int32)
    data, _ = body([tensor("image", "FP32", image), tensor("tokens", "INT32", tokens)])
    with pytest.raises(RequestError, match="batch size must be 1..4, got 5"):
        parse_infer(data, None, MODEL, max_batch=4)
    data, length = body([tensor("image", "FP32", image[:1], binary=True), tensor("tokens", "INT32", tokens[:1])],
                        [image[:1].tobytes()[:-4]])
    with pytest.raises(RequestError, match="binary_data_size must be 24"):
        parse_infer(data.replace(b'"binary_data_size": 24', b'"binary_data_size": 20'), length, MODEL, 4)
    with pytest.raises(RequestError, match="binary data ends after 20 of 24 bytes"):
        parse_infer(data, length, MODEL, 4)
    with pytest.raises(RequestError, match="Inference-Header-Content-Length 9999"):
        parse_infer(data, "9999", MODEL, 4)


def test_response_json_and_binary_outputs_as_requested():
    image, tokens = np.zeros((2, 2, 3), np.float32), np.zeros((2, 4), np.int32)
    outputs = [{"name": "codes", "parameters": {"binary_data": True}}, {"name": "logits"}]
    data, _ = body([tensor("image", "FP32", image), tensor("tokens", "INT32", tokens)], outputs=outputs, id="x")
    request = parse_infer(data, None, MODEL, max_batch=4)
    results = [[np.array([[1.5, -2.0]], np.float32), np.array([0.5, 1.0, 1.5], np.float32)],
               [np.array([3.0, 4.0], np.float32), np.array([2.0, 2.5, 3.0], np.float32)]]
    payload, length = build_infer_response("m", request, results)
    assert length is not None
    header = json.loads(payload[:length])
    assert header["id"] == "x" and header["model_name"] == "m"
    codes, logits = header["outputs"]
    assert codes == {"name": "codes", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}}
    np.testing.assert_array_equal(np.frombuffer(payload[length:], "<f4").reshape(2, 3),
                                  [[0.5, 1.0, 1.5], [2.0, 2.5, 3.0]])
    assert logits == {"name": "logits", "datatype": "FP32", "shape": [2, 2], "data": [1.5, -2.0, 3.0, 4.0]}


def test_metadata_has_a_batch_dimension_and_real_valued_quantized_tensors():
    meta = model_metadata("m", INPUTS, OUTPUTS)
    assert meta["inputs"][0] == {"name": "image", "datatype": "FP32", "shape": [-1, 2, 3]}
    assert meta["outputs"][1] == {"name": "codes", "datatype": "FP32", "shape": [-1, 3]}


def test_compressed_bodies_inflate_within_the_limit():
    import gzip
    import zlib

    from dnnpipe.service.codec import decode_body

    data = b'{"inputs": []}' * 10
    assert decode_body(gzip.compress(data), "gzip", 1000) == data
    assert decode_body(zlib.compress(data), "Deflate", 1000) == data
    assert decode_body(data, "", 10) == data  # not encoded: the size was checked by Content-Length
    with pytest.raises(RequestError, match="inflates to over the limit of 100 bytes") as caught:
        decode_body(gzip.compress(b"0" * 10**6), "gzip", 100)
    assert caught.value.status == 413
    with pytest.raises(RequestError, match="not supported") as caught:
        decode_body(data, "br", 1000)
    assert caught.value.status == 415
    with pytest.raises(RequestError, match="not valid gzip data"):
        decode_body(data, "gzip", 1000)
    with pytest.raises(RequestError, match="truncated gzip data"):
        decode_body(gzip.compress(data)[:-12], "gzip", 1000)


def test_deeply_nested_json_is_a_400_not_a_recursion_error():
    with pytest.raises(RequestError, match="nested too deeply") as caught:
        parse_infer(b"[" * 200_000 + b"]" * 200_000, None, MODEL, max_batch=4)
    assert caught.value.status == 400


@pytest.mark.parametrize("binary", [False, True])
def test_a_huge_batch_dimension_is_refused_before_counting(binary):
    """[2**62, 2, 3] would wrap the element count to 0 (and reshape raise): the batch bound comes first."""
    item = {"name": "image", "datatype": "FP32", "shape": [2**62, 2, 3]}
    item.update({"parameters": {"binary_data_size": 0}} if binary else {"data": []})
    data = json.dumps({"inputs": [item]}).encode()
    with pytest.raises(RequestError, match=r"batch size must be 1..4, got 4611686018427387904"):
        parse_infer(data, str(len(data)) if binary else None, MODEL, max_batch=4)


@pytest.mark.parametrize("binary", [False, True])
def test_a_value_a_quantized_input_cannot_hold_is_a_400_naming_it(binary):
    quantized = TensorSpec("q", "q", (1, 3), "int8", quantization=(0.5, 1))
    good, bad = np.array([[1.0, -64.5, 63.0]], np.float32), np.array([[1.0, 100.0, 2.0]], np.float32)
    data, length = body([tensor("q", "FP32", good, binary)], [good.tobytes()] if binary else [])
    assert parse_infer(data, length, ModelTensors((quantized,), OUTPUTS), max_batch=4).batch == 1
    data, length = body([tensor("q", "FP32", bad, binary)], [bad.tobytes()] if binary else [])
    with pytest.raises(RequestError, match=r"input 'q' holds the value 100, outside .* -64.5 to 63") as caught:
        parse_infer(data, length, ModelTensors((quantized,), OUTPUTS), max_batch=4)
    assert caught.value.status == 400
