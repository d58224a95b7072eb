"""Models as users have them: Keras 2 (tf.keras) H5 files, SavedModel folders, .keras files, custom layers.

tf_keras writes the files and tf.keras's own outputs in a child process (tests/keras2_models.py); each is
partitioned by the paper's command into 3 stages and run as a real 3-process pipeline.
"""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from dnnpipe.errors import DnnpipeError
from dnnpipe.manifest import read_manifest
from dnnpipe.partition.graph import analyse
from dnnpipe.partition.command import main as model_partitioner
from dnnpipe.partition.load import find_model, load_keras_model
from dnnpipe.runtime.stage import RunOptions
from dnnpipe.testbed.local import run_local
from helpers import ROOT, assert_clean_error
from keras2_models import custom_layers_source

pytest.importorskip("tf_keras")

SMALL = ["sequential", "functional", "tf_ops", "custom", "layer_zoo", "attention", "lambda_layer"]
APPLICATIONS = ["mobilenetv2", "resnet50", "efficientnetb0"]
TOLERANCE = 1e-4  # largest absolute difference from tf.keras's outputs


def write_keras2_models(folder, kinds):
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "keras2_models.py"), str(folder), *kinds],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    (folder / "custom_layers.py").write_text(custom_layers_source("keras"))
    return folder


@pytest.fixture(scope="module")
def keras2(tmp_path_factory):
    return write_keras2_models(tmp_path_factory.mktemp("keras2"), SMALL)


@pytest.fixture(scope="module")
def applications(tmp_path_factory):
    return write_keras2_models(tmp_path_factory.mktemp("applications"), APPLICATIONS)


def units_of(folder, kind) -> list[str]:
    return json.loads((folder / f"{kind}.json").read_text())["units"]


def write_config(folder, kind):
    """Three equal devices with room to spare: the optimal plan uses all three when U >= 5."""
    U = len(units_of(folder, kind))
    config = {"device_config": {"N": 3, "C": [1, 1, 1], "M": [1e6] * 3},
              "model_config": {"U": U, "E": [1.0] * U, "R": [0.1] * U}}
    (folder / "configurations" / kind).mkdir(parents=True, exist_ok=True)
    (folder / "configurations" / kind / "config.json").write_text(json.dumps(config))


def papers_command(folder, kind, *extra) -> list[str]:
    write_config(folder, kind)
    return ["--model-path", str(folder), "--config", str(folder / "configurations"),
            "--output-dir", str(folder / "partitioned"), "--model-name", kind, *extra]


def pipeline_difference(folder, kind, tmp_path) -> float:
    """Run the partitioned model as a 3-process pipeline on the tf.keras inputs; largest difference."""
    partitioned = folder / "partitioned" / kind
    manifest = read_manifest(partitioned)
    assert len(manifest.stages) == 3
    assert [s.units for s in manifest.stages][-1][1] == len(units_of(folder, kind))
    run_local(partitioned, folder / f"{kind}_data.h5", tmp_path / "results.h5", tmp_path / "logs",
              run=RunOptions(timeout=60.0))
    with h5py.File(tmp_path / "results.h5") as got, h5py.File(folder / f"{kind}_expected.h5") as expected:
        assert sorted(got) == sorted(expected)
        return max(float(np.abs(got[name][:] - expected[name][:]).max()) for name in expected)


@pytest.mark.parametrize("kind", ["sequential", "functional", "tf_ops"])
def test_keras2_h5_partitions_into_three_stages_equal_to_tf_keras(keras2, kind, tmp_path):
    assert model_partitioner(papers_command(keras2, kind)) == 0
    assert pipeline_difference(keras2, kind, tmp_path) <= TOLERANCE


def test_custom_layer_with_custom_objects(keras2, tmp_path):
    args = papers_command(keras2, "custom", "--custom-objects", str(keras2 / "custom_layers.py"))
    assert model_partitioner(args) == 0
    assert pipeline_difference(keras2, "custom", tmp_path) <= TOLERANCE


def test_custom_layer_without_its_module_is_a_clean_error(keras2, capsys):
    assert model_partitioner(papers_command(keras2, "custom")) == 1
    result = subprocess.CompletedProcess([], 1, "", capsys.readouterr().err)
    assert_clean_error(result, "custom.h5: layer 'scale' is of class 'Scale', which Keras 3 does not know",
                       "--custom-objects FILE.py defining class Scale")


@pytest.mark.parametrize("kind", ["sequential", "functional", "tf_ops", "custom", "layer_zoo", "attention"])
def test_units_are_the_keras2_layers_in_order(keras2, kind):
    objects = keras2 / "custom_layers.py" if kind == "custom" else None
    graph = analyse(load_keras_model(keras2 / f"{kind}.h5", objects))[0]
    assert list(graph.units) == units_of(keras2, kind)


def keras_outputs(model, folder, kind) -> dict[str, np.ndarray]:
    with h5py.File(folder / f"{kind}_data.h5") as f:
        feed = [f["images"][:]] if "images" in f else [f[x.name][:] for x in model.inputs]
    outputs = model(feed if len(feed) > 1 else feed[0], training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return {name: np.asarray(value) for name, value in zip(model.output_names, outputs)}


def assert_outputs_equal_tf_keras(model, folder, kind):
    with h5py.File(folder / f"{kind}_expected.h5") as expected:
        for name, value in keras_outputs(model, folder, kind).items():
            np.testing.assert_allclose(value, expected[name][:], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("kind", ["layer_zoo", "attention"])
def test_every_layer_kind_loads_equal_to_tf_keras(keras2, kind):
    assert_outputs_equal_tf_keras(load_keras_model(keras2 / f"{kind}.h5"), keras2, kind)


def without_modules(value):
    if isinstance(value, dict):
        return {k: without_modules(v) for k, v in value.items() if k not in ("module", "registered_name")}
    return [without_modules(v) for v in value] if isinstance(value, list) else value


def test_configs_in_the_older_keras2_format_load_too(keras2, tmp_path):
    """TensorFlow <= 2.12 wrote nested objects (initializers, wrapped layers) without 'module' keys: same model."""
    import shutil

    for kind in ("layer_zoo", "attention", "functional", "tf_ops"):
        old = tmp_path / f"{kind}.h5"
        shutil.copyfile(keras2 / f"{kind}.h5", old)
        with h5py.File(old, "r+") as f:
            f.attrs["model_config"] = json.dumps(without_modules(json.loads(f.attrs["model_config"])))
            f.attrs["keras_version"] = "2.5.0"
        assert_outputs_equal_tf_keras(load_keras_model(old), keras2, kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["layer_zoo", "attention"])
def test_every_layer_kind_partitions_into_three_stages_equal_to_tf_keras(keras2, kind, tmp_path):
    assert model_partitioner(papers_command(keras2, kind)) == 0
    assert pipeline_difference(keras2, kind, tmp_path) <= TOLERANCE


@pytest.mark.slow  # a tf_keras child process re-saves each as H5: 7 s
@pytest.mark.parametrize("name, kind", [("savedmodel", "sequential"), ("functional_keras2.keras", "functional")])
def test_savedmodel_folder_and_keras_file_from_tf_keras(keras2, name, kind):
    model = load_keras_model(find_model(keras2, name))
    assert list(analyse(model)[0].units) == units_of(keras2, kind)
    assert_outputs_equal_tf_keras(model, keras2, kind)


def test_savedmodel_without_keras_layers_is_refused(keras2, tmp_path):
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "saved_model.pb").write_bytes(b"")
    assert find_model(tmp_path, "exported") == tmp_path / "exported"
    with pytest.raises(DnnpipeError, match="exported: a SavedModel without a Keras model inside"):
        load_keras_model(tmp_path / "exported")


def test_keras3_files_load_as_before(keras2, tmp_path):
    model = load_keras_model(keras2 / "functional.h5")
    model.save(tmp_path / "again.keras")
    model.save(tmp_path / "again.h5")
    for path in (tmp_path / "again.keras", tmp_path / "again.h5"):
        assert_outputs_equal_tf_keras(load_keras_model(path), keras2, "functional")


def test_lambda_layer_is_refused_with_what_to_do(keras2):
    with pytest.raises(DnnpipeError, match=r"layer 'double' is a Lambda layer; its Python bytecode is not loaded"):
        load_keras_model(keras2 / "lambda_layer.h5")


@pytest.mark.parametrize("content, message", [
    ("raise RuntimeError('broken')", "importing the custom objects failed (RuntimeError: broken)"),
    (None, "--custom-objects takes a Python file (.py)"),
])
def test_bad_custom_objects_file(keras2, tmp_path, content, message):
    path = tmp_path / ("layers.py" if content else "layers.txt")
    if content:
        path.write_text(content)
    with pytest.raises(DnnpipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_keras_model(keras2 / "custom.h5", path)


def test_a_file_calling_other_tensorflow_functions_is_refused(keras2, tmp_path):
    import shutil

    from dnnpipe.partition.tfop import DnnpipeTFOp

    edited = tmp_path / "tf_ops.h5"
    shutil.copyfile(keras2 / "tf_ops.h5", edited)
    with h5py.File(edited, "r+") as f:
        f.attrs["model_config"] = f.attrs["model_config"].replace('"function": "nn.relu"',
                                                                  '"function": "io.write_file"')
    with pytest.raises(DnnpipeError, match=r"tf_ops.h5: layer 'tf.nn.relu' calls tf.io.write_file, which is not"):
        load_keras_model(edited)
    with pytest.raises(ValueError, match="calls tf.io.write_file"):  # a Keras 3 file naming the class directly
        DnnpipeTFOp({"function": "io.write_file", "args": [], "kwargs": {}})


def test_a_weight_loaded_wrongly_is_caught(keras2, tmp_path):
    """The file's weights are compared with the loaded ones: swap two in the file's list and it shows."""
    import shutil

    broken = tmp_path / "functional.h5"
    shutil.copyfile(keras2 / "functional.h5", broken)
    with h5py.File(broken, "r+") as f:
        group = f["model_weights"]["stem_bn"]
        names = list(group.attrs["weight_names"])
        names[2], names[3] = names[3], names[2]  # moving_mean <-> moving_variance, same shape
        group.attrs["weight_names"] = names
    with pytest.raises(DnnpipeError, match="layer 'stem_bn' weight"):
        load_keras_model(broken)


@pytest.mark.slow
@pytest.mark.parametrize("kind", APPLICATIONS)
def test_keras2_applications_partition_into_three_stages_equal_to_tf_keras(applications, kind, tmp_path):
    assert model_partitioner(papers_command(applications, kind)) == 0
    assert pipeline_difference(applications, kind, tmp_path) <= TOLERANCE
