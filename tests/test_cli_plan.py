"""model_partitioner.py --plan-only as a user runs it: files in, plan file and table out, clear errors."""

import json

import pytest

from helpers import assert_clean_error, run_script
from strategies import as_config

CONFIG = as_config([1.0, 0.5, 0.25], [100, 50, 50], [3.0, 1.0, 2.0, 2.0, 1.0], [10, 10, 10, 10, 10])


def write_config(root, name, data):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(data) if not isinstance(data, str) else data)
    return folder


@pytest.mark.parametrize("algorithm", ["dnnpipe", "exhaustive", "pipeedge"])
def test_plan_only_writes_plan_and_prints_table(tmp_path, algorithm):
    folder = write_config(tmp_path, "model", CONFIG)
    result = run_script("model_partitioner.py", "--config", str(tmp_path), "--model-name", "model",
                        "--plan-only", "--algorithm", algorithm)
    assert result.returncode == 0, result.stderr
    written = json.loads((folder / "pipeline_plan.json").read_text())
    assert list(written)[:4] == ["pipeline_plan", "bottleneck_ms", "algorithm", "planning_time_ms"]
    assert written["algorithm"] == algorithm
    # Optimal is 6 ms, e.g. units 1-3 (6 ms) on device 1 and 4-5 (3 ms at half speed) on device 2;
    # 5 units of 3,1,2,2,1 ms admit no split under 6 ms at speeds 1, 0.5 and 0.25.
    assert written["bottleneck_ms"] == pytest.approx(6.0)
    assert "bottleneck 6.00000 ms" in result.stdout and "<- bottleneck" in result.stdout
    assert "ideal sum(E)/sum(C)" in result.stdout


def test_config_may_be_a_json_file(tmp_path):
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(CONFIG))
    result = run_script("model_partitioner.py", "--config", str(path), "--model-name", "any", "--plan-only")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "pipeline_plan.json").exists()


def test_dnnpipe_module_has_the_same_command(tmp_path):
    write_config(tmp_path, "model", CONFIG)
    result = run_script("dnnpipe", "partition", "--config", str(tmp_path), "--model-name", "model", "--plan-only")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("content, fragments", [
    ("{broken", ["config.json: not valid JSON"]),
    ({"model_config": CONFIG["model_config"]}, ["config.json: missing key 'device_config'"]),
    (as_config([1.0, 1.0], [10], [1.0], [1.0]), ["'device_config.M' has 1 values but N = 2"]),
    (as_config([1.0], [10], [1.0, 2.0], [1.0]), ["'model_config.R' has 1 values but U = 2"]),
    (as_config([1.0], [10], ["x"], [1.0]), ["'model_config.E[0]' must be a finite number"]),
    ('{"device_config": {"N": 1, "C": [1], "M": [10]}, "model_config": {"U": 1, "E": [NaN], "R": [1]}}',
     ["'model_config.E[0]' must be a finite number, got nan"]),
    (as_config([1.0], [10], [-1.0], [1.0]), ["'model_config.E[0]' must be >= 0"]),
    (as_config([0.0], [10], [1.0], [1.0]), ["'device_config.C[0]' must be > 0"]),
    (as_config([1.0, 1.0], [5, 6], [1.0, 1.0], [1.0, 812.0]),
     ["unit 2 needs 812.0 MB, more than any device has (largest: 6.0 MB on device 2)"]),
])
def test_bad_config_is_one_clear_line(tmp_path, content, fragments):
    write_config(tmp_path, "model", content)
    result = run_script("model_partitioner.py", "--config", str(tmp_path), "--model-name", "model", "--plan-only")
    assert_clean_error(result, "model_partitioner.py: error:", *fragments)
    assert not (tmp_path / "model" / "pipeline_plan.json").exists()


def test_missing_config_and_missing_model_path(tmp_path):
    result = run_script("model_partitioner.py", "--config", str(tmp_path), "--model-name", "absent", "--plan-only")
    assert_clean_error(result, "absent/config.json: config file not found")
    write_config(tmp_path, "model", CONFIG)
    result = run_script("model_partitioner.py", "--config", str(tmp_path), "--model-name", "model")
    assert_clean_error(result, "--model-path and --output-dir are needed")


@pytest.mark.parametrize("args, fragments", [
    (["--speed", "2=nan"], ["--speed '2=nan'", "finite number > 0"]),
    (["--speed", "2=-1"], ["--speed '2=-1'"]),
    (["--memory", "x=1"], ["--memory takes DEVICE=VALUE"]),
    (["--remove", "7"], ["device 7 is not in the cluster (devices 1..3)"]),
])
def test_replan_refuses_bad_values_at_once(tmp_path, args, fragments):
    write_config(tmp_path, "model", CONFIG)
    assert run_script("model_partitioner.py", "--config", str(tmp_path), "--model-name", "model",
                      "--plan-only").returncode == 0
    result = run_script("dnnpipe", "replan", "--config", str(tmp_path), "--model-name", "model", *args, timeout=60)
    assert_clean_error(result, "dnnpipe replan: error:", *fragments)


def test_quantize_int8_without_calibration_fails_before_planning(tmp_path):
    write_config(tmp_path, "model", CONFIG)
    result = run_script("model_partitioner.py", "--config", str(tmp_path), "--model-name", "model", "--model-path",
                        str(tmp_path), "--output-dir", str(tmp_path / "out"), "--quantize", "int8")
    assert_clean_error(result, "--quantize int8 needs --calibration-data")
    assert not (tmp_path / "model" / "pipeline_plan.json").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--queue-size", "-2"], "argument --queue-size: must be at least 1, got -2"),
    (["--queue-size", "0"], "argument --queue-size: must be at least 1, got 0"),
    (["--timeout", "nan"], "argument --timeout: must be a finite number > 0, got nan"),
    (["--bind-port", "70000"], "argument --bind-port: a port is at most 65535"),
])
def test_runtime_options_out_of_range(tmp_path, args, fragment):
    result = run_script("runtime_engine.py", "--stage", "1", "--model-path", str(tmp_path), "--model-name", "m", *args,
                        timeout=60)
    assert result.returncode == 2 and fragment in result.stderr and "Traceback" not in result.stderr
