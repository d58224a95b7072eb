"""`profile`'s inputs: the devices file and flags are checked as the config loader checks them, before anything
is measured or written."""

import json

import pytest

from dnnpipe.config import load_devices
from dnnpipe.errors import ConfigError
from dnnpipe.examples import tiny_cnn
from helpers import assert_clean_error, run_script


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    tiny_cnn(32).save(folder / "tiny.h5")
    return folder


@pytest.mark.parametrize("text, fragments", [
    ('{"C": [1, "x"], "M": [100, 100]}', ["devices.json: 'C[1]' must be a finite number, got 'x'"]),
    ('{"C": [1, NaN], "M": [100, 100]}', ["devices.json: 'C[1]' must be a finite number, got nan"]),
    ('{"C": [1, 0.5], "M": [100, -1]}', ["devices.json: 'M[1]' must be >= 0, got -1"]),
    ('{"C": [1, 0.5], "M": [100]}', ["devices.json: 'M' has 1 values but N = 2"]),
    ('{"device_config": {"C": [1], "M": [1], "B": [Infinity]}}', ["'device_config.B[0]' must be a finite number"]),
    ('{"C": [1], "M": [1], "speed": 3}', ["unknown key 'device_config.speed'"]),
    ('[1, 2]', ["devices.json: expected a JSON object"]),
    ('{"C": ', ["devices.json: not valid JSON"]),
])
def test_a_bad_devices_file_is_one_line_before_anything_is_measured_or_written(models_dir, tmp_path, text,
                                                                                fragments):
    (tmp_path / "devices.json").write_text(text)
    result = run_script("dnnpipe", "profile", "--model-path", str(models_dir), "--model-name", "tiny",
                        "--config", str(tmp_path / "configurations"), "--devices", str(tmp_path / "devices.json"),
                        "--repeats", "2")
    assert_clean_error(result, *fragments)
    assert result.stdout == "" and not (tmp_path / "configurations").exists()


def test_a_nan_memory_flag_is_refused(models_dir, tmp_path):
    result = run_script("dnnpipe", "profile", "--model-path", str(models_dir), "--model-name", "tiny",
                        "--config", str(tmp_path / "configurations"), "--speeds", "1", "--memory", "nan")
    assert_clean_error(result, "--speeds/--memory: 'M[0]' must be a finite number, got nan")
    assert not (tmp_path / "configurations").exists()


def test_a_good_devices_file_gives_the_cluster(tmp_path):
    (tmp_path / "devices.json").write_text(json.dumps({"C": [1, 0.5], "M": [100, 50.5], "B": [100, 40]}))
    cluster = load_devices(tmp_path / "devices.json")
    assert (cluster.C, cluster.M, cluster.B) == ((1.0, 0.5), (100.0, 50.5), (100.0, 40.0))
    with pytest.raises(ConfigError, match="missing.json: devices file not found"):
        load_devices(tmp_path / "missing.json")
