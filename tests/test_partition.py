"""Partitioning real Keras models into real TFLite sub-models, checked against the Keras model."""

import random

import numpy as np
import pytest

import models
from dnnpipe.manifest import read_manifest
from dnnpipe.partition.partitioner import partition_keras_model
from dnnpipe.partition.graph import analyse, as_functional
from dnnpipe.slicing.plan import CutError
from dnnpipe.partition.split import legal_cuts
from dnnpipe.slicing.chain import random_inputs, run_chain

_built: dict = {}


def model_named(name):
    if name not in _built:
        _built[name] = as_functional(models.ALL[name]())
    return _built[name]


def random_plan(U: int, stages: int, seed: int) -> list[list[int]]:
    cuts = sorted(random.Random(seed).sample(range(1, U), stages - 1))
    bounds = [0, *cuts, U]
    return [[a + 1, b, device] for device, (a, b) in enumerate(zip(bounds, bounds[1:]), 1)]


def split(model, stages, folder, **kwargs):
    manifest, check = partition_keras_model(model, stages, folder, "m", "test plan", **kwargs)
    return manifest, check


@pytest.mark.parametrize("name", sorted(models.ALL))
@pytest.mark.parametrize("seed", [0, 1])
def test_random_multi_stage_plans_match_keras(name, seed, tmp_path):
    model = model_named(name)
    U = analyse(model)[0].U
    stages = random_plan(U, min(4, U), seed)
    manifest, check = split(model, stages, tmp_path)
    assert check.ok, check.describe()
    assert [list(s.units) for s in manifest.stages] == [s[:2] for s in stages]
    assert read_manifest(tmp_path) .stages == manifest.stages
    for stage in manifest.stages:
        assert (tmp_path / stage.file).stat().st_size > 0


def test_every_single_cut_of_a_residual_model(tmp_path):
    model = model_named("residual_cnn")
    U = analyse(model)[0].U
    for j in range(1, U):
        manifest, check = split(model, [[1, j, 1], [j + 1, U, 2]], tmp_path / str(j))
        assert check.ok, (j, check.describe())


def test_one_stage_is_the_whole_model(tmp_path):
    model = model_named("squeeze_excite_cnn")
    U = analyse(model)[0].U
    manifest, check = split(model, [[1, U, 1]], tmp_path)
    assert check.ok and len(manifest.stages) == 1


def test_wire_order_and_sizes_in_the_manifest(tmp_path):
    model = model_named("two_in_two_out")
    graph = analyse(model)[0]
    stages = [[1, 2, 3], [3, graph.U, 1]]
    manifest, _ = split(model, stages, tmp_path)
    first, last = manifest.stages
    assert [t.name for t in first.inputs] == ["features", "patch"]
    assert [t.name for t in last.outputs] == ["main_out", "aux_out"]
    assert [t.name for t in first.outputs] == [t.name for t in last.inputs]
    for t in first.outputs:
        assert t.nbytes == int(np.prod(t.shape)) * 4
    data = __import__("json").loads((tmp_path / "manifest.json").read_text())
    assert data["cuts"] == [{"after_unit": 2, "tensors": [t.name for t in first.outputs],
                             "bytes": sum(t.nbytes for t in first.outputs)}]


def test_chain_carries_an_early_output_through_later_stages(tmp_path):
    model = model_named("two_in_two_out")
    U = analyse(model)[0].U
    manifest, _ = split(model, [[1, 3, 1], [4, 5, 2], [6, U, 3]], tmp_path)
    inputs = random_inputs(manifest.inputs, 3, seed=5)
    got = run_chain(manifest, tmp_path, inputs)
    expected = model([inputs["features"], inputs["patch"]], training=False)
    for name, reference in zip(["main_out", "aux_out"], expected):
        np.testing.assert_allclose(got[name], np.asarray(reference), rtol=1e-5, atol=1e-6)


def test_float16_quantized_chain_within_stated_tolerance(tmp_path):
    model = model_named("residual_cnn")
    U = analyse(model)[0].U
    manifest, check = split(model, random_plan(U, 3, 7), tmp_path, quantize="float16")
    assert check.ok and check.tolerance == 2e-2
    assert manifest.quantize == "float16"
    for stage in manifest.stages:  # the weights really are float16 (dequantized at run time)
        assert "float16" in tensor_dtypes(tmp_path / stage.file), stage.file


def test_int8_quantized_chain_with_calibration(tmp_path):
    """The whole model is calibrated once and sliced: int8 ends and int8 cut tensors, each with its scale."""
    model = model_named("squeeze_excite_cnn")
    graph, keras_tensors = analyse(model)
    cuts = legal_cuts(graph, keras_tensors)
    plan = [[1, cuts[len(cuts) // 3], 3], [cuts[len(cuts) // 3] + 1, cuts[2 * len(cuts) // 3], 2],
            [cuts[2 * len(cuts) // 3] + 1, graph.U, 1]]
    calibration = {"image": np.random.default_rng(0).random((32, 8, 8, 3)).astype("float32")}
    manifest, check = split(model, plan, tmp_path, quantize="int8", calibration_inputs=calibration,
                            slicing="require")
    assert check.ok, check.describe()
    assert manifest.whole_model is not None
    assert all(t.dtype == "int8" and t.quantization for s in manifest.stages for t in (*s.inputs, *s.outputs))
    for stage in manifest.stages:  # the arithmetic really is int8
        assert "int8" in tensor_dtypes(tmp_path / stage.file), stage.file


def tensor_dtypes(path):
    """The dtypes of every tensor a TFLite model holds, as the runtime's interpreter sees them."""
    from dnnpipe.interpreter import load_interpreter

    return {np.dtype(t["dtype"]).name for t in load_interpreter(path).get_tensor_details()}


def test_plan_that_does_not_cover_the_model(tmp_path):
    model = model_named("residual_cnn")
    U = analyse(model)[0].U
    with pytest.raises(CutError, match=f"the plan covers units 1-{U - 1} but the model has {U} units"):
        split(model, [[1, 2, 1], [3, U - 1, 2]], tmp_path)
    with pytest.raises(CutError, match="stage 2 covers units 4-5, expected it to start at unit 3"):
        split(model, [[1, 2, 1], [4, 5, 2]], tmp_path)


def test_shared_layer_is_refused():
    from dnnpipe.tfenv import import_tensorflow

    _, keras = import_tensorflow()
    shared = keras.layers.Dense(3, name="shared")
    x = keras.Input((3,), name="x")
    model = keras.Model(x, shared(shared(x)))
    with pytest.raises(CutError, match="layer 'shared' is called 2 times"):
        analyse(model)


def test_keras_ops_inside_the_graph_join_the_unit_that_needs_them(tmp_path):
    from dnnpipe.tfenv import import_tensorflow

    _, keras = import_tensorflow()
    x = keras.Input((4,), name="x")
    h = keras.layers.Dense(4, name="d1")(x)
    y = keras.layers.Dense(4, name="d2")(keras.ops.relu(h) * 2.0)
    model = keras.Model(x, keras.layers.Dense(2, name="d3")(y + h))
    graph = analyse(model)[0]
    assert graph.units == ("d1", "d2", "d3")
    for j in (1, 2):
        _, check = split(model, [[1, j, 1], [j + 1, 3, 2]], tmp_path / str(j))
        assert check.ok
