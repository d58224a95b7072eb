"""The profiler: per-unit times that add up to the whole model, memory as documented, a valid config."""

import json

import numpy as np
import pytest

import models
from dnnpipe import load_config
from dnnpipe.examples import tiny_cnn
from dnnpipe.partition.partitioner import partition_keras_model
from dnnpipe.profile.costs import MIB, SUM_TOLERANCE
from dnnpipe.partition.graph import analyse
from dnnpipe.partition.split import legal_cuts
from dnnpipe.profile.costs import shared
from dnnpipe.profile.profiler import device_config, keras_config, profile_keras_model
from helpers import assert_clean_error, run_script


@pytest.fixture(scope="module")
def tiny_profile():
    model = tiny_cnn()
    return model, profile_keras_model(model, repeats=15, warmup=3, num_threads=1)


def test_unit_times_add_up_to_the_whole_model(tiny_profile):
    model, profile = tiny_profile
    assert len(profile.units) == len(model.layers) - 1
    assert all(u.time_ms >= 0 for u in profile.units)
    assert profile.whole_ms > 0
    # How close the sum comes to the whole model is a timing figure a busy machine moves: the profile prints it
    # (profile.check()) and benchmarks measure it; here the check must report it against the documented bound.
    assert f"{SUM_TOLERANCE:.0%}" in profile.check() and "sum of unit times" in profile.check()
    assert profile.cuts == tuple(legal_cuts(*analyse(model)))


def test_a_fused_groups_time_is_shared_in_proportion():
    assert shared(6.0, [1.0, 2.0, 0.0]) == [2.0, 4.0, 0.0]
    assert shared(3.0, [0.0, 0.0, 0.0]) == [1.0, 1.0, 1.0]


def test_memory_is_weights_plus_produced_activations(tiny_profile):
    model, profile = tiny_profile
    logits = model.get_layer("logits")
    unit = next(u for u in profile.units if u.name == "logits")
    weights = (logits.kernel.shape[0] * logits.kernel.shape[1] + logits.kernel.shape[1]) * 4
    assert unit.weights_mb == pytest.approx(weights / MIB)
    assert unit.activations_mb == pytest.approx(10 * 4 / MIB)
    stem = next(u for u in profile.units if u.name == "stem")
    assert stem.activations_mb == pytest.approx(np.prod(model.get_layer("stem").output.shape[1:]) * 4 / MIB)
    assert profile.R == [u.weights_mb + u.activations_mb for u in profile.units]


def test_device_part_of_the_config(tmp_path):
    assert device_config(None, [1, 0.5], [100, 50], None, 10.0) == {"N": 2, "C": [1.0, 0.5], "M": [100.0, 50.0]}
    # Whole model 10 ms here, 20 ms and 40 ms measured on the devices: C = 0.5 and 0.25.
    assert device_config(None, None, [1, 1], [20.0, 40.0], 10.0)["C"] == [0.5, 0.25]
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({"C": [1, 0.33], "M": [8998, 1452]}))
    assert device_config(path, None, None, None, 1.0)["M"] == [8998.0, 1452.0]
    alone = device_config(None, None, None, None, 1.0)
    assert alone["N"] == 1 and alone["C"] == [1.0] and alone["M"][0] > 0


def test_profile_command_writes_a_config_the_planner_reads(tmp_path):
    model = tiny_cnn(32)
    (tmp_path / "models").mkdir()
    model.save(tmp_path / "models" / "tiny.h5")
    result = run_script("dnnpipe", "profile", "--model-path", str(tmp_path / "models"), "--model-name", "tiny",
                        "--config", str(tmp_path / "configurations"), "--speeds", "1", "0.33", "0.21",
                        "--memory", "100", "20", "10", "--repeats", "5")
    assert result.returncode == 0, result.stderr
    assert "sum of unit times" in result.stdout and "whole model" in result.stdout
    config = load_config(tmp_path / "configurations" / "tiny" / "config.json")
    assert config.profile.U == len(model.layers) - 1 and config.cluster.C == (1.0, 0.33, 0.21)
    assert sum(config.profile.R) >= model.count_params() * 4 / MIB  # every weight is counted somewhere
    planned = run_script("model_partitioner.py", "--config", str(tmp_path / "configurations"),
                         "--model-name", "tiny", "--plan-only")
    assert planned.returncode == 0, planned.stderr

    bad = run_script("dnnpipe", "profile", "--model-path", str(tmp_path / "models"), "--model-name", "tiny",
                     "--config", str(tmp_path / "c2"), "--speeds", "1", "0.5", "--memory", "100", "--repeats", "2")
    assert_clean_error(bad, "2 device speeds but 1 memory sizes")


def test_cut_bytes_follow_the_graph(tiny_profile):
    model, profile = tiny_profile
    assert len(profile.cut_bytes) == len(profile.units) + 1
    assert profile.cut_bytes[0] == np.prod(model.inputs[0].shape[1:]) * 4
    assert profile.cut_bytes[-1] == 10 * 4
    assert device_config(None, [1, 1], [5, 5], None, 1.0, [100, 10])["B"] == [100.0, 10.0]


@pytest.mark.parametrize("build, fused", [(models.shared_batchnorm_two_in_two_out, True),
                                          (models.outputs_of_equal_values, False)])
def test_profile_works_for_every_model_the_partitioner_partitions(build, fused, tmp_path):
    """Issue 24: profile stopped where the partitioner went on. Its config's cuts are where the partitioner cuts:
    the sliced whole model's legal cuts (conv1 and bn1 fuse: their units are timed together), or every cut when
    it converts each stage on its own."""
    model = build()
    said: list[str] = []
    profile = profile_keras_model(model, repeats=2, warmup=1, progress=said.append)
    config = keras_config(model, profile, {"N": 2, "C": [1.0, 1.0], "M": [100.0, 100.0]})
    U = config["model_config"]["U"]
    cuts = config["model_config"].get("cuts", list(range(1, U)))
    assert cuts and ("cuts" in config["model_config"]) != any("every cut kept" in m for m in said)
    assert ("cuts" in config["model_config"]) == fused and any(f"and {int(fused)} fused groups" in m for m in said)
    middle = cuts[len(cuts) // 2]
    manifest, check = partition_keras_model(model, [[1, middle, 1], [middle + 1, U, 2]], tmp_path, "m", "test",
                                            echo=said.append)
    assert check is not None and check.ok and len(manifest.stages) == 2
    assert (manifest.whole_model is None) == ("cuts" not in config["model_config"])  # sliced where cuts were found
