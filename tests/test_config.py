"""Config validation: each malformed field gets an error naming the file and the field."""

import copy
import json
import math

import pytest

from dnnpipe import ConfigError, load_config

GOOD = {"device_config": {"N": 2, "C": [1, 0.5], "M": [100, 50]},
        "model_config": {"U": 3, "E": [1.0, 2.0, 3.0], "R": [1, 1, 1]}}


def broken(section, key, value):
    config = copy.deepcopy(GOOD)
    if value is KeyError:
        del config[section][key]
    else:
        config[section][key] = value
    return config


@pytest.mark.parametrize("config, message", [
    ({}, "missing key 'device_config'"),
    ({"device_config": GOOD["device_config"]}, "missing key 'model_config'"),
    ({"device_config": [], "model_config": {}}, "'device_config' must be an object"),
    (broken("device_config", "N", KeyError), "missing key 'device_config.N'"),
    (broken("device_config", "C", KeyError), "missing key 'device_config.C'"),
    (broken("model_config", "R", KeyError), "missing key 'model_config.R'"),
    (broken("device_config", "N", 3), "'device_config.C' has 2 values but N = 3"),
    (broken("device_config", "M", [1]), "'device_config.M' has 1 values but N = 2"),
    (broken("model_config", "U", 4), "'model_config.E' has 3 values but U = 4"),
    (broken("model_config", "R", [1, 1]), "'model_config.R' has 2 values but U = 3"),
    (broken("device_config", "N", 0), "'device_config.N' must be a positive integer, got 0"),
    (broken("device_config", "N", 2.0), "'device_config.N' must be a positive integer, got 2.0"),
    (broken("model_config", "U", True), "'model_config.U' must be a positive integer, got True"),
    (broken("model_config", "E", [1, "2", 3]), "'model_config.E[1]' must be a finite number, got '2'"),
    (broken("model_config", "E", [1, math.nan, 3]), "'model_config.E[1]' must be a finite number, got nan"),
    (broken("model_config", "E", [1, math.inf, 3]), "'model_config.E[1]' must be a finite number"),
    (broken("model_config", "R", [1, -1, 3]), "'model_config.R[1]' must be >= 0, got -1"),
    (broken("device_config", "M", [1, -5]), "'device_config.M[1]' must be >= 0, got -5"),
    (broken("device_config", "C", [1, 0]), "'device_config.C[1]' must be > 0, got 0"),
    (broken("device_config", "C", [-1, 1]), "'device_config.C[0]' must be > 0, got -1"),
    (broken("device_config", "C", "fast"), "'device_config.C' must be a list of numbers, got str"),
])
def test_bad_config_is_named(config, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        load_config(config)


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "config.json"
    with pytest.raises(ConfigError, match=f"{missing}: config file not found"):
        load_config(missing)
    missing.write_text("{not json")
    with pytest.raises(ConfigError, match=f"{missing}: not valid JSON"):
        load_config(missing)
    missing.write_text(json.dumps(broken("device_config", "C", [1, 0])))
    with pytest.raises(ConfigError, match=f"{missing}: 'device_config.C\\[1\\]' must be > 0"):
        load_config(missing)


def test_good_config_round_trips():
    config = load_config(GOOD)
    assert config.cluster.N == 2 and config.profile.U == 3
    assert load_config(config.to_dict()) == config.__class__(config.cluster, config.profile, "<config>")


def test_optional_fields_of_the_richer_models():
    config = copy.deepcopy(GOOD)
    config["device_config"]["B"] = [100, 10]
    config["model_config"]["A"] = [12, 8, 4, 2]
    config["model_config"]["E_device"] = [[1, 2, 3], [2, 2, 2]]
    del config["model_config"]["E"]
    loaded = load_config(config)
    assert loaded.cluster.B == (100.0, 10.0) and loaded.profile.A == (12.0, 8.0, 4.0, 2.0)
    assert loaded.profile.E == (1.0, 2.0, 3.0)  # the paper's E is device 1's row
    assert load_config(loaded.to_dict()).profile.E_device == loaded.profile.E_device


@pytest.mark.parametrize("section, key, value, message", [
    ("device_config", "B", [100, 0], "'device_config.B[1]' must be > 0"),
    ("device_config", "B", [100], "'device_config.B' has 1 values but N = 2"),
    ("model_config", "A", [1, 2, 3], "'model_config.A' has 3 values but U + 1 = 4"),
    ("model_config", "E_device", [[1, 2, 3]], "'model_config.E_device' must be a list of N = 2 lists"),
    ("model_config", "E_device", [[1, 2, 3], [1, -2, 3]], "'model_config.E_device[1][1]' must be >= 0"),
])
def test_bad_optional_fields(section, key, value, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        load_config(broken(section, key, value))


LINKED = {**GOOD, "device_config": {**GOOD["device_config"], "B": [100, 10]}}


def linked(key, value):
    config = copy.deepcopy(LINKED)
    config["device_config"][key] = value
    return config


@pytest.mark.parametrize("config, message", [
    ({**GOOD, "devices": {}}, "unknown key 'devices' (known: device_config, model_config)"),
    (broken("device_config", "B_lnk", [[0, 1], [1, 0]]), "unknown key 'device_config.B_lnk' (known: N, C, M, B, "),
    (broken("model_config", "cut", [1]), "unknown key 'model_config.cut' (known: U, E, R, E_device, A, cuts)"),
    (linked("B_link", [[0, 1]]), "'device_config.B_link' must be a list of N = 2 lists of N = 2 numbers"),
    (linked("B_link", "fast"), "'device_config.B_link' must be a list of N = 2 lists"),
    (linked("B_link", [[0, 1], [1]]), "'device_config.B_link[1]' has 1 values but N = 2"),
    (linked("B_link", [[0, 1], [math.inf, 0]]), "'device_config.B_link[1][0]' must be a finite number, got inf"),
    (linked("B_link", [[0, 0], [1, 0]]), "'device_config.B_link[0][1]' must be > 0 (a link between two devices)"),
    (linked("B_link", [[0, 1], [-3, 0]]), "'device_config.B_link[1][0]' must be >= 0, got -3"),
    (broken("device_config", "B_link", [[0, 1], [1, 0]]), "'device_config.B_link' needs 'device_config.B'"),
    (broken("model_config", "cuts", 2), "'model_config.cuts' must be a list of unit indices, got int"),
    (broken("model_config", "cuts", [1.0]), "'model_config.cuts[0]' must be an integer unit index, got 1.0"),
    (broken("model_config", "cuts", [True]), "'model_config.cuts[0]' must be an integer unit index, got True"),
    (broken("model_config", "cuts", [0]), "'model_config.cuts[0]' = 0 is out of range: a stage may end after unit "
                                          "1..U - 1 = 2"),
    (broken("model_config", "cuts", [1, 3]), "'model_config.cuts[1]' = 3 is out of range"),
    (broken("model_config", "cuts", [2, 1]), "'model_config.cuts' must be strictly increasing, got 2 then 1"),
    (broken("model_config", "cuts", [1, 1]), "'model_config.cuts' must be strictly increasing, got 1 then 1"),
])
def test_bad_links_cuts_and_unknown_keys(config, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        load_config(config)


def test_link_matrix_and_cuts_are_plain_data_and_round_trip():
    config = linked("B_link", [[0, 50], [20, 0]])
    config["model_config"]["cuts"] = [2]
    loaded = load_config(config)
    assert loaded.cluster.B_link == ((0.0, 50.0), (20.0, 0.0)) and loaded.profile.cuts == (2,)
    assert load_config(loaded.to_dict()) == loaded
    assert load_config(broken("model_config", "cuts", [])).profile.cuts == ()  # no legal cut: one stage


CPU = {"send_ms_per_mb": [3.0, 4.0], "receive_ms_per_mb": [5.0, 6.0], "frame_ms": [0.5, 0.25]}


def with_link_cpu(**changes):
    config = copy.deepcopy(LINKED)
    config["model_config"]["A"] = [12, 8, 4, 2]
    config["device_config"]["link_cpu"] = {**CPU, **changes}
    return config


def test_link_cpu_round_trips_and_reaches_the_problem():
    from dnnpipe.planner import Problem

    loaded = load_config(with_link_cpu())
    assert loaded.cluster.link_cpu is not None and loaded.cluster.link_cpu.frame_ms == (0.5, 0.25)
    assert load_config(loaded.to_dict()) == loaded
    problem = Problem.from_config(loaded)
    # Stage (1, 2] on device 2 receives cut 1 (8 B) and sends cut 2 (4 B): 6 * 8e-6 + 4 * 4e-6 + 0.25 ms.
    assert problem.link_cpu_ms(1, 2, 1) == pytest.approx(6 * 8e-6 + 4 * 4e-6 + 0.25)
    # one stage on device 1 takes in the input (12 B) and passes on the result (2 B) as it would cuts of that size
    assert problem.link_cpu_ms(0, 3, 0) == pytest.approx(5 * 12e-6 + 3 * 2e-6 + 0.5)
    assert problem.stage_cpu_ms(1, 2, 1) == pytest.approx(problem.stage_time(1, 2, 1) + problem.link_cpu_ms(1, 2, 1))


@pytest.mark.parametrize("config, message", [
    (with_link_cpu(frame_ms=[0.5]), "'device_config.link_cpu.frame_ms' has 1 values but N = 2"),
    (with_link_cpu(send_ms_per_mb=[1, -1]), "'device_config.link_cpu.send_ms_per_mb[1]' must be >= 0, got -1"),
    (with_link_cpu(receive_ms_per_mb=[1, math.nan]),
     "'device_config.link_cpu.receive_ms_per_mb[1]' must be a finite number, got nan"),
    (with_link_cpu(sned_ms_per_mb=[1, 1]), "unknown key 'device_config.link_cpu.sned_ms_per_mb' (known: "
                                           "send_ms_per_mb, receive_ms_per_mb, frame_ms)"),
    ({**with_link_cpu(), "device_config": {**with_link_cpu()["device_config"], "link_cpu": [1, 2]}},
     "'device_config.link_cpu' must be an object with send_ms_per_mb, receive_ms_per_mb, frame_ms, got list"),
    ({**with_link_cpu(), "device_config": {**with_link_cpu()["device_config"], "link_cpu": {
        "send_ms_per_mb": [1, 1], "receive_ms_per_mb": [1, 1]}}}, "missing key 'device_config.link_cpu.frame_ms'"),
    (broken("device_config", "link_cpu", CPU), "'device_config.link_cpu' needs 'device_config.B'"),
    (linked("link_cpu", CPU), "'device_config.link_cpu' needs 'model_config.A'"),
])
def test_bad_link_cpu(config, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        load_config(config)


def test_the_first_stage_takes_in_the_input_and_the_last_passes_on_the_result_as_cuts():
    # One rule, by cut index, for the planner (index arrays) and the prediction (plain numbers) alike.
    import numpy as np

    from dnnpipe.config import stage_link_cpu_ms

    cost, A, U = (2.0, 3.0, 0.5), [1e6, 2e6, 3e6, 4e6], 3
    assert stage_link_cpu_ms(cost, A, 0, U) == 3.0 * 1 + 2.0 * 4 + 0.5  # one stage: the input in, the result out
    assert stage_link_cpu_ms(cost, A, 0, 1) == 3.0 * 1 + 2.0 * 2 + 0.5  # first: the input in, cut 1 out
    assert stage_link_cpu_ms(cost, A, 2, U) == 3.0 * 3 + 2.0 * 4 + 0.5  # last: cut 2 in, the result out
    assert stage_link_cpu_ms(cost, A, 1, 2) == 3.0 * 2 + 2.0 * 3 + 0.5
    j, k = np.meshgrid(np.arange(U + 1), np.arange(U + 1))
    grid = stage_link_cpu_ms(cost, np.asarray(A), j, k)
    assert all(grid[b, a] == stage_link_cpu_ms(cost, A, a, b) for a in range(U + 1) for b in range(U + 1))
