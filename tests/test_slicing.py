"""Slicing one converted TFLite model into stages: bit-exact against the whole model, checked against Keras."""

import json
import random
import sys

import numpy as np
import pytest

import models
from helpers import assert_clean_error, run_script
from dnnpipe.manifest import read_manifest, write_manifest
from dnnpipe.partition.convert import convert_stage
from dnnpipe.partition.graph import analyse, as_functional
from dnnpipe.partition.split import keras_cut_table, split_model, whole_model_flatbuffer
from dnnpipe.partition.verify import verify
from dnnpipe.manifest import TensorSpec, WholeModel
from dnnpipe.profile.costs import config_from
from dnnpipe.profile.tflite import profile_tflite
from dnnpipe.slicing.chain import random_inputs, run_chain, run_whole
from dnnpipe.slicing.cuts import mapped_cut_table, operator_cut_table
from dnnpipe.slicing.flatbuffer import op_graph, read_model
from dnnpipe.slicing.plan import CutError
from dnnpipe.slicing.slicer import slice_plan
from dnnpipe.slicing.tflite_model import partition_tflite, tflite_units
from dnnpipe.slicing.cuts import operator_crossings
from dnnpipe.slicing.flatbuffer import FlatTensor, OpGraph
from dnnpipe.slicing.plan import check_cuts

_whole: dict = {}


def converted(name, quantize="none"):
    """(keras model, unit graph, whole flatbuffer, legal cut table), converted once per test session."""
    if (name, quantize) not in _whole:
        model = as_functional(models.ALL[name]())
        graph, tensors = analyse(model)
        keys = {t.name: s.key for t in graph.tensors for s in [_spec(graph, t)]}
        calibration = _calibration(graph) if quantize == "int8" else None
        flatbuffer = whole_model_flatbuffer(graph, tensors, keys, quantize, calibration)
        _whole[name, quantize] = model, graph, flatbuffer, keras_cut_table(graph, tensors, keys, flatbuffer, quantize)
    return _whole[name, quantize]


def _spec(graph, tensor):
    from dnnpipe.slicing.cuts import signature_keys
    from dnnpipe.partition.split import wire_spec

    return wire_spec(tensor, signature_keys(t.name for t in graph.tensors))


def _calibration(graph):
    rng = np.random.default_rng(0)
    return {t.name: rng.random((16, *t.shape[1:])).astype("float32") for t in graph.crossing(0)}


def plan_over(cuts, U, stages, seed):
    inner = sorted(c for c in cuts if 0 < c < U)
    chosen = sorted(random.Random(seed).sample(inner, min(stages - 1, len(inner))))
    bounds = [0, *chosen, U]
    return [[a + 1, b, device] for device, (a, b) in enumerate(zip(bounds, bounds[1:]), 1)]


def slice_into(folder, name, stages, quantize="none"):
    _, graph, flatbuffer, table = converted(name, quantize)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.tflite").write_bytes(flatbuffer)
    from dnnpipe.manifest import sha256_file

    whole = WholeModel("model.tflite", sha256_file(folder / "model.tflite"), table)
    manifest = slice_plan(read_model(flatbuffer), whole, graph.U, stages, folder, name, quantize, "test plan")
    write_manifest(manifest, folder)
    return manifest


def assert_bit_exact(manifest, folder, samples=3):
    inputs = random_inputs(manifest.inputs, samples, seed=11)
    expected = run_whole(manifest.whole_model, folder, manifest.units, inputs)
    got = run_chain(manifest, folder, inputs)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("name", sorted(models.ALL))
def test_random_plans_of_every_model_kind_equal_the_whole_model_and_keras(name, tmp_path):
    model, graph, _, table = converted(name)
    for seed in range(3):
        stages = plan_over(table, graph.U, 4, seed)
        folder = tmp_path / str(seed)
        manifest = slice_into(folder, name, stages)
        assert [list(s.units) for s in manifest.stages] == [s[:2] for s in stages]
        assert_bit_exact(manifest, folder)
        check = verify(model, manifest, folder, 1e-4)
        assert check.ok, check.describe()
        assert read_manifest(folder) == manifest


def test_every_legal_cut_of_a_residual_model_and_every_illegal_one_refused(tmp_path):
    _, graph, _, table = converted("residual_cnn")
    legal = sorted(c for c in table if 0 < c < graph.U)
    # Conv2D + BatchNormalization + ReLU fuse into one operator: no tensor after res*_a or res*_bn.
    assert legal == [1, 4, 5, 6, 9, 10, 11, 12]
    for j in range(1, graph.U):
        stages = [[1, j, 1], [j + 1, graph.U, 2]]
        if j in legal:
            manifest = slice_into(tmp_path / str(j), "residual_cnn", stages)
            assert_bit_exact(manifest, tmp_path / str(j))
            assert [t.name for t in manifest.stages[0].outputs] == [t.name for t in graph.crossing(j)]
        else:
            with pytest.raises(CutError, match=f"test plan: stage 1 ends after unit {j}, which is not a legal cut"):
                slice_into(tmp_path / str(j), "residual_cnn", stages)


def test_sub_models_hold_only_their_own_weights(tmp_path):
    _, graph, flatbuffer, table = converted("residual_cnn")
    manifest = slice_into(tmp_path, "residual_cnn", plan_over(table, graph.U, 3, 0))
    whole_weights = _weight_bytes(flatbuffer)
    stage_weights = sum(_weight_bytes((tmp_path / s.file).read_bytes()) for s in manifest.stages)
    assert stage_weights <= whole_weights * 1.05
    assert read_manifest(tmp_path).whole_model.sha256 == manifest.whole_model.sha256


def _weight_bytes(flatbuffer):
    return sum(len(b.data) for b in read_model(flatbuffer).buffers if b.data is not None)


def test_split_model_converts_once_and_slices_float16(tmp_path):
    model, graph, _, _ = converted("squeeze_excite_cnn")
    _, tensors = analyse(model)
    messages = []
    manifest = split_model(graph, tensors, [[1, 3, 1], [4, 6, 2], [7, graph.U, 3]], tmp_path, "m", "float16",
                           progress=messages.append, slicing="require")
    assert manifest.whole_model is not None and (tmp_path / "model.tflite").exists()
    assert any("converted the whole model once" in m for m in messages)
    assert_bit_exact(manifest, tmp_path)
    check = verify(model, manifest, tmp_path, 2e-2)
    assert check.ok, check.describe()


def test_split_model_falls_back_to_per_stage_conversion_and_says_why(tmp_path):
    model, graph, _, _ = converted("residual_cnn")
    _, tensors = analyse(model)
    messages = []
    manifest = split_model(graph, tensors, [[1, 2, 1], [3, graph.U, 2]], tmp_path, "m", progress=messages.append)
    assert manifest.whole_model is None and not (tmp_path / "model.tflite").exists()
    assert any("stage 1 ends after unit 2, which is not a legal cut" in m and "converting each stage" in m
               for m in messages)
    assert verify(model, manifest, tmp_path, 1e-4).ok


def test_int8_whole_model_calibrated_once_with_int8_tensors_at_the_cuts(tmp_path):
    model, graph, _, table = converted("squeeze_excite_cnn", "int8")
    stages = plan_over(table, graph.U, 3, 1)
    manifest = slice_into(tmp_path, "squeeze_excite_cnn", stages, "int8")
    assert all(t.dtype == "int8" and t.quantization for s in manifest.stages for t in (*s.inputs, *s.outputs))
    assert_bit_exact(manifest, tmp_path)
    check = verify(model, read_manifest(tmp_path), tmp_path, 0.25)  # int8 ends compared as the reals they encode
    assert check.ok, check.describe()


@pytest.fixture(scope="module")
def tflite_files(tmp_path_factory):
    """A float and a full-int8 .tflite file, made with the TFLite converter: the only model a user may have."""
    folder = tmp_path_factory.mktemp("tflite")
    model = as_functional(models.ALL["residual_cnn"]())
    graph, tensors = analyse(model)
    keys = {t.name: _spec(graph, t).key for t in graph.tensors}
    inputs, outputs = graph.crossing(0), graph.crossing(graph.U)
    calibration = _calibration(graph)
    files = {"float": convert_stage(model, inputs, outputs, keys),
             "int8": convert_stage(model, inputs, outputs, keys, "int8",
                                   lambda: ({"image": calibration["image"][i:i + 1]} for i in range(16)),
                                   integer_io=True)}
    for kind, flatbuffer in files.items():
        (folder / f"{kind}.tflite").write_bytes(flatbuffer)
    return folder


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_a_tflite_file_as_the_model(kind, tflite_files, tmp_path):
    path = tflite_files / f"{kind}.tflite"
    units = tflite_units(path)
    U = len(units)
    assert U == len(op_graph(read_model(path)).ops) and units[0].startswith(("CONV_2D", "QUANTIZE"))
    for seed in range(3):
        stages = plan_over(range(U + 1), U, 3, seed)
        manifest, check = partition_tflite(path, stages, tmp_path / str(seed), "m", progress=None)
        assert check.ok and all(d == 0 for d in check.differences.values())
        assert_bit_exact(manifest, tmp_path / str(seed))
        assert manifest.quantize == ("int8" if kind == "int8" else "none")


def test_profile_of_a_tflite_file_gives_the_config(tflite_files):
    path = tflite_files / "float.tflite"
    profile = profile_tflite(path, repeats=3, warmup=1)
    graph = op_graph(read_model(path))
    assert len(profile.units) == len(graph.ops) and all(e >= 0 for e in profile.E)
    model = read_model(path)
    weights = {t.buffer: len(model.buffers[t.buffer].data) for t in model.subgraphs[0].tensors
               if t.buffer and model.buffers[t.buffer].data is not None}
    assert sum(u.weights_mb for u in profile.units) * (1 << 20) == sum(weights.values())
    assert profile.cut_bytes[0] == 12 * 12 * 3 * 4 and profile.cut_bytes[-1] == 5 * 4
    config = config_from(profile, {"N": 1, "C": [1.0], "M": [100.0]})
    assert config["model_config"]["U"] == len(graph.ops) and "cuts" not in config["model_config"]


def test_slice_command_without_tensorflow(tflite_files, tmp_path):
    """A board or controller re-cuts a plan: TensorFlow cannot even be imported in that process."""
    partition_tflite(tflite_files / "float.tflite", [[1, 9, 1]], tmp_path / "m", "m", progress=None)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pipeline_plan": [[1, 2, 3], [3, 6, 1], [7, 9, 2]]}))
    blocked = ("import sys; sys.modules['tensorflow'] = sys.modules['keras'] = None; "
               "from dnnpipe.__main__ import main; code = main(sys.argv[1:]); "
               "assert not any(m.startswith(('tensorflow', 'keras')) for m in sys.modules if sys.modules[m]); "
               "sys.exit(code)")
    import subprocess

    from helpers import ROOT
    result = subprocess.run([sys.executable, "-c", blocked, "slice", "--model-path", str(tmp_path), "--model-name",
                             "m", "--plan", str(plan)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path / "m")
    assert [list(s.units) for s in manifest.stages] == [[1, 2], [3, 6], [7, 9]]
    assert [s.device for s in manifest.stages] == [3, 1, 2]
    assert manifest.extra["chain_vs_whole"]["ok"]
    assert_bit_exact(manifest, tmp_path / "m")


def test_slice_command_refuses_a_plan_ending_inside_a_fused_group(tmp_path):
    slice_into(tmp_path / "m", "residual_cnn", [[1, 13, 1]])
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pipeline_plan": [[1, 3, 1], [4, 13, 2]]}))
    result = run_script("dnnpipe", "slice", "--model-path", str(tmp_path), "--model-name", "m", "--plan", str(plan))
    assert_clean_error(result, f"{plan}: stage 1 ends after unit 3, which is not a legal cut",
                       "nearest legal cuts: 1, 4")


def test_slice_command_errors(tmp_path):
    (tmp_path / "m").mkdir()
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pipeline_plan": [[1, 3, 1]]}))
    assert_clean_error(run_script("dnnpipe", "slice", "--model-path", str(tmp_path), "--model-name", "m",
                                  "--plan", str(plan)), "manifest.json: manifest not found")
    not_tflite = tmp_path / "x.tflite"
    not_tflite.write_bytes(b"\0" * 64)
    with pytest.raises(CutError, match="x.tflite: not a TFLite flatbuffer"):
        read_model(not_tflite)


def test_operator_crossings_and_cut_checks_on_plain_data():
    def tensor(i, constant=False):
        return FlatTensor(i, f"t{i}", (1, 2), "float32", constant)

    # x(0) -> op1 -> a(1); a -> op2 -> b(2); (a, b) -> op3 -> y(3); w(4) is a weight read by op2
    graph = OpGraph((((0,), (1,)), ((1, 4), (2,)), ((1, 2), (3,))), ("A", "B", "C"),
                    tuple(tensor(i, constant=(i == 4)) for i in range(5)), (0,), (3,), ("x",), ("y",))
    assert operator_crossings(graph) == {0: (0,), 1: (1,), 2: (1, 2), 3: (3,)}
    assert graph.closure([3], [1, 2]) == [2]
    with pytest.raises(CutError, match="'t0' is needed"):
        graph.closure([2], [4])
    table = operator_cut_table(graph)
    assert [t.name for t in table[2]] == ["t1", "t2"] and table[0][0].name == "x"
    with pytest.raises(CutError, match="stage 2 ends after unit 5, .* nearest legal cuts: 4, 7"):
        check_cuts([[1, 2, 1], [3, 5, 2], [6, 9, 3]], {0, 2, 4, 7, 9}, "p.json")


def test_a_cut_the_rest_of_the_model_cannot_run_from_is_not_legal():
    """Issue 24: a BatchNormalization folded into the convolution after it while its output also feeds a later
    Add. The cut after the BatchNormalization has a tensor, but the convolution reads the model input, so no
    later cut (nor the outputs) can be computed from it; it used to be taken as legal and mapping then failed
    with "tensor 'serving_default_img:0' is needed but neither computed in the stage nor among its inputs"."""
    def tensor(i, name):
        return FlatTensor(i, name, (1, 2), "float32", False)

    # img(0) -> MUL -> bn(1); img -> CONV (BatchNormalization folded in) -> conv(2); (bn, conv) -> ADD -> add(3)
    graph = OpGraph((((0,), (1,)), ((0,), (2,)), ((1, 2), (3,))), ("MUL", "CONV_2D", "ADD"),
                    (tensor(0, "serving_default_img:0"), tensor(1, "bn"), tensor(2, "conv"), tensor(3, "add")),
                    (0,), (3,), ("img",), ("add",))
    spec = {name: TensorSpec(name, name, (1, 2), "float32") for name in ("img", "bn", "conv", "add")}
    crossings = {0: (spec["img"],), 1: (spec["bn"],), 2: (spec["bn"], spec["conv"]), 3: (spec["add"],)}
    table = mapped_cut_table(crossings, {"img": 0, "bn": 1, "conv": 2, "add": 3}, graph)
    assert sorted(table) == [0, 2, 3]
    assert [t.tensor for t in table[2]] == [1, 2]


def test_config_cuts_written_only_when_some_cut_is_missing(tmp_path):
    from dnnpipe.slicing.plan import with_cuts
    from dnnpipe.slicing.tflite_model import find_tflite

    config = {"device_config": {"N": 1}, "model_config": {"U": 5, "E": [1] * 5, "R": [1] * 5, "cuts": [9]}}
    assert with_cuts(config, {0, 1, 3, 5})["model_config"]["cuts"] == [1, 3]
    assert "cuts" not in with_cuts(config, range(6))["model_config"]
    assert config["model_config"]["cuts"] == [9]  # the input is not changed
    (tmp_path / "m.tflite").write_bytes(b"")
    assert find_tflite(tmp_path, "m") == tmp_path / "m.tflite" and find_tflite(tmp_path, "other") is None


def test_legal_cuts_for_the_config_of_a_keras_model():
    from dnnpipe.partition.split import legal_cuts

    model, _, _, _ = converted("residual_cnn")
    graph, tensors = analyse(model)
    assert legal_cuts(graph, tensors) == [1, 4, 5, 6, 9, 10, 11, 12]


def test_slice_command_refuses_a_tampered_manifest(tmp_path):
    slice_into(tmp_path / "m", "residual_cnn", [[1, 13, 1]])
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pipeline_plan": [[1, 4, 1], [5, 13, 2]]}))
    path = tmp_path / "m" / "manifest.json"
    original = path.read_text()
    data = json.loads(original)
    data["whole_model"]["legal_cuts"][1]["tensors"][0]["tensor"] = 10 ** 6
    path.write_text(json.dumps(data))
    assert_clean_error(run_script("dnnpipe", "slice", "--model-path", str(tmp_path), "--model-name", "m",
                                  "--plan", str(plan)), "whole_model cut 1", "outside 0..")
    data = json.loads(original)
    data["whole_model"]["file"] = "../model.tflite"
    path.write_text(json.dumps(data))
    assert_clean_error(run_script("dnnpipe", "slice", "--model-path", str(tmp_path), "--model-name", "m",
                                  "--plan", str(plan)), "whole_model.file must be a")


def test_a_damaged_tflite_file_is_refused(tflite_files):
    from dnnpipe.slicing.flatbuffer import pack

    model = read_model(tflite_files / "float.tflite")
    operator = model.subgraphs[0].operators[1]
    operator.inputs = [9999, *operator.inputs[1:]]
    with pytest.raises(CutError, match="an operator refers to a tensor that does not exist"):
        op_graph(read_model(pack(model)))


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_the_papers_flow_with_only_a_tflite_file(kind, tflite_files, tmp_path):
    """profile -> plan -> partition -> run with NAME.tflite alone: the pipeline gives the whole model's outputs."""
    import h5py

    models_dir = tmp_path / "models"
    models_dir.mkdir()
    (models_dir / "net.tflite").write_bytes((tflite_files / f"{kind}.tflite").read_bytes())
    profiled = run_script("dnnpipe", "profile", "--model-path", str(models_dir), "--model-name", "net", "--config",
                          str(tmp_path / "configurations"), "--speeds", "1", "0.5", "0.5", "--memory", "100", "100",
                          "100", "--repeats", "2", "--warmup", "1")
    assert profiled.returncode == 0, profiled.stderr
    parted = run_script("model_partitioner.py", "--model-path", str(models_dir), "--config",
                        str(tmp_path / "configurations"), "--output-dir", str(tmp_path / "parts"),
                        "--model-name", "net")
    assert parted.returncode == 0, parted.stderr
    manifest = read_manifest(tmp_path / "parts" / "net")
    assert len(manifest.stages) > 1 and manifest.whole_model is not None
    images = np.random.default_rng(1).random((5, 12, 12, 3)).astype("float32")
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["images"] = images
    ran = run_script("dnnpipe", "run-local", "--model-path", str(tmp_path / "parts"), "--model-name", "net",
                     "--data-path", str(tmp_path / "data.h5"), "--output-path", str(tmp_path / "out.h5"),
                     "--testbed", "loopback")
    assert ran.returncode == 0, ran.stderr
    from dnnpipe.runtime.dataio import to_real, to_wire

    spec_in, spec_out = manifest.inputs[0], manifest.outputs[0]
    expected = [to_real(spec_out, run_whole(manifest.whole_model, tmp_path / "parts" / "net", manifest.units,
                                            {spec_in.name: to_wire(spec_in, image)})[spec_out.name])
                for image in images]
    with h5py.File(tmp_path / "out.h5") as f:
        np.testing.assert_array_equal(f[spec_out.name][:], np.concatenate(expected))
