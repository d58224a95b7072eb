"""Keras 2 config rules, on plain JSON: no TensorFlow, no files."""

import pytest

from dnnpipe.partition.legacy import (TF_OP_CLASS, LegacyModelError, allowed_tf_function, is_keras2, layer_classes,
                                      translate)


def functional(*layers):
    return {"class_name": "Functional", "config": {"name": "m", "layers": list(layers),
                                                   "input_layers": [["x", 0, 0]],
                                                   "output_layers": [[layers[-1]["name"], 0, 0]]}}


def layer(class_name, name, inbound=(), **config):
    return {"class_name": class_name, "name": name, "config": {"name": name, **config},
            "inbound_nodes": [[[source, 0, 0, {}] for source in inbound]] if inbound else []}


INPUT = layer("InputLayer", "x", batch_input_shape=[None, 4])


def test_keras_versions():
    assert is_keras2("2.5.0") and is_keras2(None) and is_keras2("2.21.0")
    assert not is_keras2("3.15.1")


@pytest.mark.parametrize("class_name", ["DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose", "DepthwiseConv1D"])
def test_groups_of_one_is_dropped(class_name):
    config = translate(functional(INPUT, layer(class_name, "c", ["x"], groups=1, kernel_size=[3, 3])))
    assert config["config"]["layers"][1]["config"] == {"name": "c", "kernel_size": [3, 3]}


def test_other_groups_cannot_be_translated():
    with pytest.raises(LegacyModelError, match="layer 'c' \\(DepthwiseConv2D\\) has groups=2"):
        translate(functional(INPUT, layer("DepthwiseConv2D", "c", ["x"], groups=2)))


def test_input_is_not_changed():
    original = functional(INPUT, layer("DepthwiseConv2D", "c", ["x"], groups=1))
    translate(original)
    assert original["config"]["layers"][1]["config"]["groups"] == 1


def test_recurrent_spatial_dropout_separable_and_mixed_precision():
    policy = {"module": "keras.mixed_precision", "class_name": "Policy", "config": {"name": "mixed_float16"}}
    initializer = {"class_name": "VarianceScaling", "config": {"scale": 2.0, "distribution": "normal"}}
    config = translate(functional(
        INPUT,
        layer("Bidirectional", "b", ["x"], layer={"class_name": "GRU", "config": {"units": 3, "time_major": False}}),
        layer("SpatialDropout2D", "s", ["b"], rate=0.1, trainable=True, noise_shape=None),
        layer("SeparableConv2D", "p", ["s"], kernel_initializer={}, kernel_regularizer=None, dtype=policy,
              depthwise_initializer=initializer)))
    bidirectional, dropout, separable = config["config"]["layers"][1:]
    assert bidirectional["config"]["layer"] == {"class_name": "GRU", "config": {"units": 3},
                                                "module": "keras.layers", "registered_name": None}
    assert dropout["config"] == {"name": "s", "rate": 0.1}
    assert separable["config"] == {"name": "p", "dtype": "mixed_float16", "depthwise_initializer": {
        "class_name": "VarianceScaling", "config": {"scale": 2.0, "distribution": "truncated_normal"}}}


def test_nested_model_calls_are_renumbered_from_zero():
    """Keras 2 kept node 0 of a nested model for the model itself; Keras 3 numbers its calls from 0."""
    inner = {"class_name": "Functional", "name": "block", "inbound_nodes": [[["x", 0, 0, {}]]], "config": {
        "name": "block", "layers": [layer("InputLayer", "i"), layer("Dense", "d", ["i"])],
        "input_layers": [["i", 0, 0]], "output_layers": [["d", 0, 0]]}}
    model = functional(INPUT, inner, layer("Dense", "head", []))
    model["config"]["layers"][2]["inbound_nodes"] = [[["block", 1, 0, {}]]]
    model["config"]["output_layers"] = [["block", 1, 0], ["head", 0, 0]]
    config = translate(model)
    assert config["config"]["layers"][2]["inbound_nodes"] == [[["block", 0, 0, {}]]]
    assert config["config"]["output_layers"] == [["block", 0, 0], ["head", 0, 0]]


def test_sequential_without_input_keeps_its_numbering():
    inner = {"class_name": "Sequential", "name": "seq", "inbound_nodes": [[["x", 0, 0, {}]]],
             "config": {"name": "seq", "layers": [{"class_name": "Dense", "config": {"name": "d", "units": 2}}]}}
    config = translate(functional(INPUT, inner, layer("Dense", "head", [])))
    config["config"]["layers"][2]["inbound_nodes"] = [[["seq", 0, 0, {}]]]
    assert translate(config)["config"]["layers"][2]["inbound_nodes"] == [[["seq", 0, 0, {}]]]


def test_tf_op_lambda_becomes_one_call_with_every_tensor_an_input():
    """tf.concat([a, b], axis=-1) + reduce_mean(...): tensors in the first argument and in keyword arguments."""
    concat = {"class_name": "TFOpLambda", "name": "tf.concat", "config": {"name": "tf.concat", "dtype": "float32",
                                                                        "function": "concat", "trainable": True},
              "inbound_nodes": [[["a", 0, 0, {"axis": -1}], ["b", 0, 0, {"axis": -1}]]]}
    add = {"class_name": "TFOpLambda", "name": "tf.__operators__.add",
           "config": {"name": "tf.__operators__.add", "function": "__operators__.add"},
           "inbound_nodes": [["tf.concat", 0, 0, {"y": ["a", 0, 0], "name": None}]]}
    config = translate(functional(INPUT, layer("Dense", "a", ["x"]), layer("Dense", "b", ["x"]), concat, add))
    concat, add = config["config"]["layers"][3:]
    assert concat["class_name"] == TF_OP_CLASS
    assert concat["config"] == {"name": "tf.concat", "trainable": True, "dtype": "float32", "call": {
        "function": "concat", "args": [[{"__tensor__": 0}, {"__tensor__": 1}]], "kwargs": {"axis": -1},
        "slicing": False}}
    assert concat["inbound_nodes"] == [[["a", 0, 0, {}], ["b", 0, 0, {}]]]
    assert add["config"]["call"]["args"] == [{"__tensor__": 0}]
    assert add["config"]["call"]["kwargs"] == {"y": {"__tensor__": 1}, "name": None}
    assert add["inbound_nodes"] == [[["tf.concat", 0, 0, {}], ["a", 0, 0, {}]]]


def test_slicing_op_keeps_its_slices():
    getitem = {"class_name": "SlicingOpLambda", "name": "g", "config": {"name": "g", "function":
                                                                         "__operators__.getitem"},
               "inbound_nodes": [["x", 0, 0, {"slice_spec": [{"start": None, "stop": 4, "step": None}]}]]}
    call = translate(functional(INPUT, getitem))["config"]["layers"][1]["config"]["call"]
    assert call["slicing"] and call["kwargs"] == {"slice_spec": [{"start": None, "stop": 4, "step": None}]}


@pytest.mark.parametrize("function, allowed", [
    ("nn.relu", True), ("math.reduce_mean", True), ("compat.v1.transpose", True), ("concat", True),
    ("__operators__.getitem", True), ("io.write_file", False), ("compat.v1.io.write_file", False),
    ("print", False), ("py_function", False), ("math.__loader__.exec_module", False), ("nn.relu.__globals__", False)])
def test_only_math_and_array_operations_are_replayed(function, allowed):
    assert allowed_tf_function(function) is allowed


def test_a_file_naming_another_tensorflow_function_is_refused():
    op = {"class_name": "TFOpLambda", "name": "w", "config": {"name": "w", "function": "io.write_file"},
          "inbound_nodes": [["x", 0, 0, {"contents": "x"}]]}
    with pytest.raises(LegacyModelError, match="layer 'w' calls tf.io.write_file, which is not"):
        translate(functional(INPUT, op))


def test_layer_classes_include_nested_and_wrapped_layers():
    wrapped = layer("Bidirectional", "b", ["x"], layer={"class_name": "MyCell", "config": {"name": "cell"}})
    inner = {"class_name": "Sequential", "name": "seq", "config": {"name": "seq", "layers": [
        {"class_name": "Scale", "config": {"name": "s"}}]}}
    assert layer_classes(functional(INPUT, wrapped, inner)) == [
        ("x", "InputLayer"), ("b", "Bidirectional"), ("cell", "MyCell"), ("seq", "Sequential"), ("s", "Scale")]


def test_tensors_passed_by_keyword_use_the_current_node_format():
    """MultiHeadAttention()(x, value=y): Keras 3 resolves tensors in keyword arguments only in its current format."""
    mha = layer("MultiHeadAttention", "mha", num_heads=2, key_dim=4, query_shape=[None, 6, 8], key_shape=None,
                value_shape=[None, 6, 8], softmax_robust_masking=False)
    mha["inbound_nodes"] = [[["x", 0, 0, {"value": ["y", 0, 0], "use_causal_mask": False}]]]
    translated = translate(functional(INPUT, layer("Dense", "y", ["x"]), mha))["config"]["layers"][2]

    def tensor(name):
        return {"class_name": "__keras_tensor__", "config": {"shape": [], "dtype": "float32",
                                                             "keras_history": [name, 0, 0]}}

    assert translated["config"] == {"name": "mha", "num_heads": 2, "key_dim": 4}
    assert translated["inbound_nodes"] == [{"args": [tensor("x")],
                                            "kwargs": {"value": tensor("y"), "use_causal_mask": False}}]


def test_configs_the_legacy_reader_would_change_go_to_the_current_one():
    config = translate(functional(INPUT, layer("LayerNormalization", "ln", ["x"], axis=[1, 2]),
                                  layer("Attention", "att", ["ln"], score_mode="dot"),
                                  layer("LayerNormalization", "ln1", ["att"], axis=[2]),
                                  layer("Dense", "named_dot", ["ln1"], activation="relu")))
    modules = [entry.get("module") for entry in config["config"]["layers"]]
    assert modules == [None, "keras.layers", "keras.layers", None, None]
