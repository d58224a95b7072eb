"""model_partitioner.py end to end as a user runs it: the paper's command, its options and its errors."""

import json

import h5py
import numpy as np
import pytest

import models
from helpers import assert_clean_error, run_script


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """original_models/res.h5 and configurations/res/config.json for a 3-device cluster."""
    root = tmp_path_factory.mktemp("ws")
    model = models.residual_cnn()
    (root / "original_models").mkdir()
    model.save(root / "original_models" / "res.h5")
    U = len(model.layers) - 1
    (root / "configurations" / "res").mkdir(parents=True)
    config = {"device_config": {"N": 3, "C": [1, 0.5, 0.25], "M": [100, 100, 100]},
              "model_config": {"U": U, "E": [1.0] * U, "R": [1.0] * U}}
    (root / "configurations" / "res" / "config.json").write_text(json.dumps(config))
    with h5py.File(root / "calibration.h5", "w") as f:
        f["images"] = np.random.default_rng(0).random((16, 12, 12, 3)).astype("float32")
    return root


def partitioner(root, *extra, name="res"):
    return run_script("model_partitioner.py", "--model-path", str(root / "original_models"),
                      "--config", str(root / "configurations"), "--output-dir", str(root / "out"),
                      "--model-name", name, *extra)


def test_the_papers_command(workspace):
    result = partitioner(workspace)
    assert result.returncode == 0, result.stderr
    assert (workspace / "configurations" / "res" / "pipeline_plan.json").exists()
    manifest = json.loads((workspace / "out" / "res" / "manifest.json").read_text())
    plan = json.loads((workspace / "configurations" / "res" / "pipeline_plan.json").read_text())
    assert [[*s["units"], s["device"]] for s in manifest["stages"]] == plan["pipeline_plan"]
    assert manifest["verification"]["ok"] is True
    for stage in manifest["stages"]:
        assert (workspace / "out" / "res" / stage["file"]).exists()
    assert "verify OK" in result.stdout
    assert "Traceback" not in result.stderr and len(result.stderr) < 2000, result.stderr  # quiet conversion


def test_partition_by_an_existing_plan_without_verification(workspace):
    plan = workspace / "my_plan.json"
    plan.write_text(json.dumps({"pipeline_plan": [[1, 4, 2], [5, 13, 1]]}))
    result = partitioner(workspace, "--plan", str(plan), "--no-verify", "--model-name", "res")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((workspace / "out" / "res" / "manifest.json").read_text())
    assert [s["units"] for s in manifest["stages"]] == [[1, 4], [5, 13]]
    assert "verification" not in manifest


def test_int8_with_calibration_data(workspace):
    result = partitioner(workspace, "--quantize", "int8", "--calibration-data", str(workspace / "calibration.h5"))
    assert result.returncode == 0, result.stderr
    assert json.loads((workspace / "out" / "res" / "manifest.json").read_text())["quantize"] == "int8"


@pytest.mark.parametrize("extra, fragments", [
    (["--model-name", "absent", "--plan-only"], ["absent/config.json: config file not found"]),
    (["--quantize", "int8"], ["--quantize int8 needs --calibration-data"]),
    (["--plan", "nowhere.json"], ["nowhere.json: plan file not found"]),
])
def test_clear_errors(workspace, extra, fragments):
    assert_clean_error(partitioner(workspace, *extra), *fragments)


def test_unit_count_mismatch_and_unreadable_model(workspace, tmp_path):
    config_dir = tmp_path / "configurations" / "res"
    config_dir.mkdir(parents=True)
    config = json.loads((workspace / "configurations" / "res" / "config.json").read_text())
    config["model_config"].update(U=5, E=[1.0] * 5, R=[1.0] * 5)
    (config_dir / "config.json").write_text(json.dumps(config))
    result = run_script("model_partitioner.py", "--model-path", str(workspace / "original_models"),
                        "--config", str(tmp_path / "configurations"), "--output-dir", str(tmp_path / "out"),
                        "--model-name", "res")
    assert_clean_error(result, "model_config.U = 5 but", "res.h5 has 13 units")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "res.h5").write_text("not a model")
    result = run_script("model_partitioner.py", "--model-path", str(tmp_path / "models"),
                        "--config", str(tmp_path / "configurations"), "--output-dir", str(tmp_path / "out"),
                        "--model-name", "res")
    assert_clean_error(result, "res.h5: cannot load the Keras model")
    result = run_script("model_partitioner.py", "--model-path", str(tmp_path / "nothing"),
                        "--config", str(tmp_path / "configurations"), "--output-dir", str(tmp_path / "out"),
                        "--model-name", "res")
    assert_clean_error(result, "nothing/res.h5: model file not found")


@pytest.mark.slow
def test_a_real_keras_applications_architecture(tmp_path):
    result = run_script("dnnpipe", "make-model", "--model", "mobilenetv2", "--input-size", "96",
                        "--model-path", str(tmp_path / "original_models"), "--model-name", "net")
    assert result.returncode == 0, result.stderr
    plan = tmp_path / "plan.json"
    from dnnpipe.partition.load import load_keras_model
    from dnnpipe.partition.graph import analyse

    U = analyse(load_keras_model(tmp_path / "original_models" / "net.h5"))[0].U
    plan.write_text(json.dumps({"pipeline_plan": [[1, 40, 1], [41, 100, 2], [101, U, 3]]}))
    result = run_script("model_partitioner.py", "--model-path", str(tmp_path / "original_models"),
                        "--config", str(tmp_path), "--output-dir", str(tmp_path / "out"), "--model-name", "net",
                        "--plan", str(plan))
    assert result.returncode == 0, result.stderr
    assert "verify OK" in result.stdout
