"""The pipeline's ends: what the first stage makes of the user's data, for float and full-int8 models."""

import h5py
import numpy as np
import pytest

import models
from dnnpipe.errors import DnnpipeError
from dnnpipe.manifest import TensorSpec, read_manifest
from dnnpipe.runtime import dataio
from dnnpipe.runtime.dataio import input_datasets, read_inputs, to_real, to_wire
from helpers import assert_clean_error, run_script

INT8 = TensorSpec("image", "image", (1, 2, 2, 1), "int8", quantization=(0.5, -3))
FLOAT = TensorSpec("image", "image", (1, 2, 2, 1), "float32")


def test_int8_data_passes_as_it_is():
    data = np.array([[[-128], [0]], [[5], [127]]], dtype="int8")
    np.testing.assert_array_equal(to_wire(INT8, data), data.reshape(INT8.shape))


def test_real_data_is_quantized_with_the_inputs_scale():
    real = np.array([[[0.0], [1.0]], [[-1.0], [2.25]]], dtype="float32")
    wire = to_wire(INT8, real)
    assert wire.dtype == np.int8 and wire.ravel().tolist() == [-3, -1, -5, 2]  # real / 0.5 - 3, rounded
    np.testing.assert_allclose(to_real(INT8, wire), np.array([0.0, 1.0, -1.0, 2.5]).reshape(INT8.shape))


@pytest.mark.parametrize("value", [100.0, -70.0, np.nan])
def test_real_values_the_int8_input_cannot_hold_are_refused_not_clipped(value):
    real = np.array([[[0.0], [value]], [[0.0], [0.0]]], dtype="float32")
    with pytest.raises(DnnpipeError, match=r"data.h5: dataset 'images' row 3 holds the value .*outside what input "
                                           r"'image' \(int8, scale 0.5, zero point -3\) can hold: -62.5 to 65"):
        to_wire(INT8, real, "data.h5: dataset 'images' row 3")


@pytest.mark.parametrize("dtype", ["uint8", "int16", "int32", "bool"])
def test_other_integer_types_for_an_int8_input_are_refused(dtype):
    with pytest.raises(DnnpipeError, match=f"holds {dtype} data; input 'image' takes int8 \\(already quantized\\) "
                                           f"or real numbers"):
        to_wire(INT8, np.zeros((2, 2, 1), dtype=dtype))


def test_a_float_input_takes_integers_as_numbers():
    assert to_wire(FLOAT, np.full((2, 2, 1), 200, dtype="uint8")).tolist() == [[[[200.0], [200.0]],
                                                                                 [[200.0], [200.0]]]]


def test_the_data_file_is_checked_when_opened(tmp_path):
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["images"] = np.zeros((3, 2, 2, 1), dtype="uint8")
    with pytest.raises(DnnpipeError, match=r"data.h5: dataset 'images' holds uint8 data; input 'image' takes int8"):
        input_datasets(tmp_path / "data.h5", [INT8])
    with h5py.File(tmp_path / "strings.h5", "w") as f:
        f["images"] = np.array([["a", "b"]] * 3, dtype="S1").reshape(3, 2, 1, 1).repeat(2, axis=2)
    with pytest.raises(DnnpipeError, match=r"strings.h5: dataset 'images' holds \|S1 data; input 'image' takes "
                                           r"numbers"):
        input_datasets(tmp_path / "strings.h5", [FLOAT])


@pytest.fixture(scope="module")
def int8_pipeline(tmp_path_factory):
    """A full-int8 .tflite file (int8 inputs and outputs, what a Coral user has) through profile and partition."""
    from dnnpipe.partition.convert import convert_stage
    from dnnpipe.partition.graph import analyse, as_functional
    from dnnpipe.partition.split import wire_spec
    from dnnpipe.slicing.cuts import signature_keys

    root = tmp_path_factory.mktemp("int8")
    model = as_functional(models.residual_cnn())
    graph, _ = analyse(model)
    keys = signature_keys(t.name for t in graph.tensors)
    calibration = np.random.default_rng(0).random((16, 12, 12, 3)).astype("float32")
    flatbuffer = convert_stage(model, graph.crossing(0), graph.crossing(graph.U),
                               {t.name: wire_spec(t, keys).key for t in graph.tensors}, "int8",
                               lambda: ({"image": calibration[i:i + 1]} for i in range(16)), integer_io=True)
    (root / "models").mkdir()
    (root / "models" / "net.tflite").write_bytes(flatbuffer)
    profiled = run_script("dnnpipe", "profile", "--model-path", str(root / "models"), "--model-name", "net",
                          "--config", str(root / "configurations"), "--speeds", "1", "0.5", "0.5", "--memory", "100",
                          "100", "100", "--repeats", "2", "--warmup", "1")
    assert profiled.returncode == 0, profiled.stderr
    parted = run_script("model_partitioner.py", "--model-path", str(root / "models"), "--config",
                        str(root / "configurations"), "--output-dir", str(root / "parts"), "--model-name", "net")
    assert parted.returncode == 0, parted.stderr
    return root


def run_local(root, data, output):
    return run_script("dnnpipe", "run-local", "--model-path", str(root / "parts"), "--model-name", "net",
                      "--data-path", str(data), "--output-path", str(output), "--testbed", "loopback")


def test_int8_data_through_an_int8_pipeline_gives_the_whole_models_outputs(int8_pipeline, tmp_path):
    """Data already in the model's int8 input type reaches the first stage as it is (it was quantized again)."""
    from dnnpipe.slicing.chain import run_whole

    manifest = read_manifest(int8_pipeline / "parts" / "net")
    spec_in, spec_out = manifest.inputs[0], manifest.outputs[0]
    assert len(manifest.stages) > 1 and spec_in.dtype == "int8" and spec_in.quantization is not None
    images = np.random.default_rng(1).integers(-128, 128, (4, 12, 12, 3)).astype("int8")
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["images"] = images
    ran = run_local(int8_pipeline, tmp_path / "data.h5", tmp_path / "out.h5")
    assert ran.returncode == 0, ran.stderr
    expected = [to_real(spec_out, run_whole(manifest.whole_model, int8_pipeline / "parts" / "net", manifest.units,
                                            {spec_in.name: image[None]})[spec_out.name]) for image in images]
    with h5py.File(tmp_path / "out.h5") as f:
        np.testing.assert_array_equal(f[spec_out.name][:], np.concatenate(expected))


def test_uint8_data_for_an_int8_pipeline_is_one_line_naming_the_dataset(int8_pipeline, tmp_path):
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["images"] = np.zeros((2, 12, 12, 3), dtype="uint8")
    ran = run_local(int8_pipeline, tmp_path / "data.h5", tmp_path / "out.h5")
    assert_clean_error(ran, "data.h5: dataset 'images' holds uint8 data; input 'image' takes int8")


def test_the_help_texts_say_how_several_inputs_are_laid_out():
    """Where users look (--help of the runtime, run-local and serve; the README's Running section)."""
    import argparse
    import re

    from dnnpipe.runtime.command import add_stage_arguments
    from dnnpipe.serve.command import add_serve_arguments
    from dnnpipe.testbed.command import add_run_local_arguments
    from helpers import ROOT

    for add in (add_stage_arguments, add_serve_arguments, add_run_local_arguments):
        text = " ".join(add(argparse.ArgumentParser()).format_help().split())
        assert "dataset 'images' for a one-input model, else one dataset per model input named as the input" in text
    running = re.search(r"### Running the pipeline\n(.*?)\n### ", (ROOT / "README.md").read_text(), re.S)
    assert running and "one dataset per input, each named as the input" in " ".join(running.group(1).split())


@pytest.mark.parametrize("block_bytes", [1, 2 * 4 * 4, 1 << 20])  # a row, two rows, every row per HDF5 read
def test_inputs_are_read_a_block_of_rows_at_a_time_and_cycle_in_order(tmp_path, monkeypatch, block_bytes):
    monkeypatch.setattr(dataio, "BLOCK_BYTES", block_bytes)
    data = np.arange(5 * 4, dtype="float32").reshape(5, 2, 2, 1)
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["images"] = data
    rows = [arrays[0] for arrays in read_inputs(tmp_path / "data.h5", [FLOAT], 12)]
    assert len(rows) == 12 and all(row.shape == FLOAT.shape and row.dtype == np.float32 for row in rows)
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(row, data[i % 5].reshape(FLOAT.shape))
    assert len(list(read_inputs(tmp_path / "data.h5", [FLOAT], None))) == 5


def test_a_value_an_int8_input_cannot_hold_is_named_by_its_row_in_a_block(tmp_path):
    real = np.zeros((6, 2, 2, 1), dtype="float32")
    real[4, 1, 0, 0] = 100.0
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["images"] = real
    inputs = read_inputs(tmp_path / "data.h5", [INT8], None)
    with pytest.raises(DnnpipeError, match=r"data.h5: dataset 'images' row 4 holds the value 100"):
        list(inputs)


def test_datasets_of_different_lengths_are_one_line_naming_both(tmp_path):
    """A shorter second dataset came back as a short block and a bare 'cannot reshape' deep in the reader."""
    specs = [TensorSpec(name, name, (1, 2), "float32") for name in ("a", "b")]
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["a"] = np.zeros((5, 2), dtype="float32")
        f["b"] = np.zeros((3, 2), dtype="float32")
    with pytest.raises(DnnpipeError, match=r"data.h5: dataset 'b' has 3 rows, dataset 'a' has 5: one row per"):
        input_datasets(tmp_path / "data.h5", specs)


def test_a_block_is_budgeted_by_the_files_type_and_the_quantizing_temporaries(tmp_path, monkeypatch):
    """float64 data for an int8 input: a block sized by int8 wire bytes held ~30 times that while converted."""
    monkeypatch.setattr(dataio, "BLOCK_BYTES", 4 * 32 * 4)  # four rows' working memory
    seen = []
    original = dataio._wire_rows
    monkeypatch.setattr(dataio, "_wire_rows", lambda path, data, spec, start, n: seen.append(n) or
                        original(path, data, spec, start, n))
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["images"] = np.zeros((10, 2, 2, 1), dtype="float64")
    assert len(list(read_inputs(tmp_path / "data.h5", [INT8], None))) == 10
    assert max(seen) == 4, seen


@pytest.mark.parametrize("block_rows, order", [
    (1, [1, 0, 2, 3, 5, 4, 7, 6, 8]),  # a write per row
    (3, [1, 0, 2, 3, 5, 4, 7, 6, 8]),  # a few blocks
    (4, [0, 2, 4, 6, 1, 3, 5, 7, 8]),  # blocks of rows that are not consecutive: a write per run
    (256, [1, 0, 2, 3, 5, 4, 7, 6, 8]),  # one write at the close
])
def test_results_are_written_a_block_at_a_time_in_sequence_order(tmp_path, monkeypatch, block_rows, order):
    monkeypatch.setattr(dataio, "BLOCK_ROWS", block_rows)
    spec = TensorSpec("scores", "scores", (1, 3), "float32")
    writer = dataio.ResultWriter(tmp_path / "out.h5", [spec])
    buffer = np.empty((1, 3), dtype="float32")
    for sequence in order:
        buffer[:] = sequence  # one buffer reused, as the stage's pool does: the writer keeps its own copy
        writer.write(sequence, [buffer])
    writer.close(complete=True)
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert bool(f.attrs["complete"])
        np.testing.assert_array_equal(f["scores"][:], np.repeat(np.arange(9, dtype="float32")[:, None], 3, axis=1))


def test_a_closed_partial_result_file_keeps_the_rows_it_was_given_and_says_it_is_partial(tmp_path):
    spec = TensorSpec("scores", "scores", (1, 2), "float32")
    writer = dataio.ResultWriter(tmp_path / "out.h5", [spec])
    for sequence in range(3):
        writer.write(sequence, [np.full((1, 2), sequence, dtype="float32")])
    writer.close(complete=False)  # the stream failed after three results: they are written, the file says partial
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert not bool(f.attrs["complete"])
        np.testing.assert_array_equal(f["scores"][:], [[0, 0], [1, 1], [2, 2]])


def test_consecutive_sequences_make_one_run_each():
    assert dataio.consecutive_runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (5, 7), (9, 10)]
    assert dataio.consecutive_runs([4]) == [(4, 5)] and dataio.consecutive_runs([]) == []
    assert dataio.consecutive_runs([0, 2, 4, 6]) == [(0, 1), (2, 3), (4, 5), (6, 7)]


def test_an_int8_pipelines_results_are_kept_as_the_real_numbers_they_are_written_as(tmp_path, monkeypatch):
    monkeypatch.setattr(dataio, "BLOCK_BYTES", 2 * 4 * 4)  # two rows of four float32 values: the stored type counts
    spec = TensorSpec("scores", "scores", (1, 4), "int8", quantization=(0.5, 1))
    writer = dataio.ResultWriter(tmp_path / "out.h5", [spec])
    assert writer._block == 2
    for sequence in range(3):
        writer.write(sequence, [np.full((1, 4), sequence + 1, dtype="int8")])
    writer.close(complete=True)
    with h5py.File(tmp_path / "out.h5", "r") as f:
        np.testing.assert_array_equal(f["scores"][:], [[0.0] * 4, [0.5] * 4, [1.0] * 4])
