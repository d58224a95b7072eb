"""Keras 2 (tf.keras) model configs rewritten into what Keras 3's own loader accepts.

Plain JSON in, plain JSON out: no TensorFlow, so every rule is testable on its own. Keras 3's legacy
H5 loader still builds the model and sets the weights; this only removes the differences it does not
handle. Every layer keeps its name and its place in the layer list, so units stay the paper's.
"""

from __future__ import annotations

import copy
from typing import Any

from ..errors import DnnpipeError

# Keras 2 gave these the Conv base class's `groups`; Keras 3 refuses the argument.
GROUPLESS = {"DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D", "Conv1DTranspose",
             "Conv2DTranspose", "Conv3DTranspose"}
RECURRENT = {"LSTM", "GRU", "SimpleRNN", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D"}
SPATIAL_DROPOUT = {"SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D"}
SEPARABLE = {"SeparableConv1D", "SeparableConv2D"}  # Keras 2 also kept the unused kernel_* arguments
MODELS = {"Functional", "Model", "Sequential"}
LAYER_FUNCTIONS = {"add", "average", "concatenate", "dot", "maximum", "minimum", "multiply", "subtract", "Input",
                   "serialize", "deserialize"}  # functions in keras.layers
# Weights Keras 3 names differently: Keras 2 name -> Keras 3 name (load.py checks names after loading).
WEIGHT_RENAMES = {"depthwise_kernel": "kernel"}
TF_OPS = {"TFOpLambda", "SlicingOpLambda"}  # layers Keras 2 made for raw TensorFlow calls in a functional graph
TF_OP_CLASS = "DnnpipeTFOp"  # the Keras 3 layer (partition/tfop.py) that replays them

# TensorFlow functions a translated TFOpLambda may call: math and array operations only, since the
# function name comes from the file.
TF_OP_NAMESPACES = ("math.", "nn.", "linalg.", "image.", "signal.", "__operators__.", "bitwise.")
TF_OP_FUNCTIONS = {
    "concat", "stack", "unstack", "reshape", "transpose", "expand_dims", "squeeze", "pad", "cast", "identity",
    "split", "gather", "gather_nd", "tile", "clip_by_value", "where", "ones_like", "zeros_like", "shape", "size",
    "rank", "broadcast_to", "einsum", "matmul", "slice", "strided_slice", "reverse", "one_hot", "argmax", "argmin",
    "range", "fill", "roll", "repeat", "add", "multiply", "subtract", "divide", "maximum", "minimum", "abs", "exp",
    "sqrt", "square", "pow", "sigmoid", "tanh", "clip_by_norm", "boolean_mask", "sort", "argsort",
    "truediv", "floordiv", "realdiv", "negative", "sign", "round", "floor", "ceil", "norm", "tensordot",
}


class LegacyModelError(DnnpipeError, ValueError):
    """A Keras 2 model uses something that has no faithful Keras 3 form; the message names the layer."""


def is_keras2(keras_version: str | None) -> bool:
    """Files without a version were written before Keras recorded it, so by Keras 2 or older."""
    return not keras_version or int(str(keras_version).split(".")[0]) < 3


def translate(model_config: dict[str, Any]) -> dict[str, Any]:
    """The Keras 2 model config (the H5 file's `model_config`), rewritten for Keras 3; input untouched."""
    config = copy.deepcopy(model_config)
    _translate_model(config)
    return config


def _translate_model(model: dict[str, Any]) -> None:
    layers = model.get("config", {}).get("layers") if isinstance(model.get("config"), dict) else None
    if not isinstance(layers, list):
        return
    functional = model.get("class_name") != "Sequential"
    skip_first = {layer.get("name", layer["config"].get("name")) for layer in layers if _reserves_node_0(layer)}
    for layer in layers:
        _translate_layer(layer)
        if functional:
            if layer["class_name"] in TF_OPS:
                _translate_tf_op(layer)
            layer["inbound_nodes"] = [_with_tensor_kwargs(_renumber(node, skip_first))
                                      for node in layer.get("inbound_nodes", [])]
            if _mangled_by_legacy_loader(layer):
                layer.setdefault("module", "keras.layers")
                layer.setdefault("registered_name", None)
    if functional:
        for key in ("input_layers", "output_layers"):
            model["config"][key] = _renumber(model["config"].get(key, []), skip_first)


def _translate_layer(layer: dict[str, Any]) -> None:
    """One layer's own config; nested models and wrapped layers (Bidirectional, TimeDistributed) too."""
    name, config = layer.get("class_name"), layer.get("config")
    if not isinstance(config, dict):
        return
    if name in MODELS:
        _translate_model(layer)
        return
    if name in GROUPLESS:
        _drop(config, "groups", 1, name)
    if name in SEPARABLE:
        for key in ("kernel_initializer", "kernel_regularizer", "kernel_constraint"):
            config.pop(key, None)
    if name == "MultiHeadAttention":  # Keras 2 recorded the build shapes; Keras 3 builds on the first call
        for key in ("query_shape", "key_shape", "value_shape"):
            config.pop(key, None)
        _drop(config, "softmax_robust_masking", False, name)
    if name in RECURRENT:
        _drop(config, "time_major", False, name)
    if name in SPATIAL_DROPOUT:
        config.pop("trainable", None)
        _drop(config, "noise_shape", None, name)
    dtype = config.get("dtype")
    if isinstance(dtype, dict) and dtype.get("class_name") == "Policy":  # Keras 2 mixed precision
        config["dtype"] = dtype.get("config", {}).get("name", "float32")
    for value in config.values():
        _translate_objects(value)
    for key in ("layer", "backward_layer"):
        if isinstance(config.get(key), dict):
            # Keras 3's wrappers read the wrapped layer in the new format, which names its module; TF <= 2.12 did not
            config[key].setdefault("module", "keras.layers")
            config[key].setdefault("registered_name", None)
            _translate_layer(config[key])


def _translate_objects(value: Any) -> None:
    """Initializers inside a config: Keras 2's VarianceScaling 'normal' meant truncated normal."""
    if isinstance(value, dict):
        if value.get("class_name") == "VarianceScaling" and isinstance(value.get("config"), dict):
            if value["config"].get("distribution") == "normal":
                value["config"]["distribution"] = "truncated_normal"
        for inner in value.values():
            _translate_objects(inner)
    elif isinstance(value, list):
        for inner in value:
            _translate_objects(inner)


def _drop(config: dict[str, Any], key: str, allowed: Any, class_name: str) -> None:
    value = config.pop(key, allowed)
    if value != allowed:
        raise LegacyModelError(f"layer {config.get('name')!r} ({class_name}) has {key}={value!r}, which Keras 3's "
                               f"{class_name} does not support")


def _reserves_node_0(layer: dict[str, Any]) -> bool:
    """Keras 2 numbered a nested model's calls from 1: node 0 was the model's own graph, when it had inputs."""
    if layer.get("class_name") in ("Functional", "Model"):
        return True
    if layer.get("class_name") == "Sequential":
        inner = layer.get("config", {}).get("layers") or [{}]
        return inner[0].get("class_name") == "InputLayer" or "batch_input_shape" in inner[0].get("config", {})
    return False


def _mangled_by_legacy_loader(layer: dict[str, Any]) -> bool:
    """Configs Keras 3's legacy layer reader would change: an axis list of several axes (it keeps only single
    axes) or a string that names a function of keras.layers (it swaps in the function, e.g. Attention's
    score_mode 'dot'). Such a layer gets a module, which sends it through Keras 3's current reader instead."""
    config = layer.get("config", {})
    axis = config.get("axis")
    return (isinstance(axis, list) and len(axis) > 1) or any(
        isinstance(value, str) and value in LAYER_FUNCTIONS for key, value in config.items() if key != "name")


def _with_tensor_kwargs(node: Any) -> Any:
    """A call with tensors among its keyword arguments (MultiHeadAttention's value=, key=) in Keras 3's
    current node format, which resolves them; Keras 3's legacy node format passes them on as lists."""
    if not (isinstance(node, list) and node and all(is_tensor_ref(ref) for ref in node)):
        return node
    kwargs = node[-1][3] if len(node[-1]) == 4 else {}

    def tensor(ref: list[Any]) -> dict[str, Any]:
        return {"class_name": "__keras_tensor__",
                "config": {"shape": [], "dtype": "float32", "keras_history": list(ref[:3])}}

    found = False

    def in_kwargs(value: Any) -> Any:
        nonlocal found
        if is_tensor_ref(value):
            found = True
            return tensor(value)
        if isinstance(value, list):
            return [in_kwargs(v) for v in value]
        if isinstance(value, dict):
            return {k: in_kwargs(v) for k, v in value.items()}
        return value

    converted = in_kwargs(kwargs)
    if not found:
        return node
    inputs = [tensor(ref) for ref in node]
    return {"args": [inputs[0] if len(inputs) == 1 else inputs], "kwargs": converted}


def is_tensor_ref(value: Any) -> bool:
    """Keras 2's reference to a layer output: [layer name, node index, tensor index(, call kwargs)]."""
    return (isinstance(value, list) and len(value) in (3, 4) and isinstance(value[0], str)
            and isinstance(value[1], int) and isinstance(value[2], int)
            and (len(value) == 3 or isinstance(value[3], dict)))


def _renumber(node: Any, skip_first: set[str]) -> Any:
    if is_tensor_ref(node):
        if node[0] in skip_first:
            if node[1] < 1:
                raise LegacyModelError(f"a layer reads node {node[1]} of nested model {node[0]!r}, which Keras 2 "
                                       f"kept for the model itself")
            return [node[0], node[1] - 1, *node[2:]]
        return node
    if isinstance(node, list):
        return [_renumber(item, skip_first) for item in node]
    return node


def allowed_tf_function(function: str) -> bool:
    """A math or array operation, under its TF 2 or compat.v1 name (Keras 2 wrote tf.transpose as the latter)."""
    for prefix in ("compat.v1.", "compat.v2."):
        function = function.removeprefix(prefix)
    if any(part.startswith("_") and part != "__operators__" for part in function.split(".")):
        return False  # no module internals (math.__loader__, ...)
    return function.startswith(TF_OP_NAMESPACES) or function in TF_OP_FUNCTIONS


def _translate_tf_op(layer: dict[str, Any]) -> None:
    """A TFOpLambda (one raw TensorFlow call) becomes a DnnpipeTFOp whose config holds the call.

    Keras 2 wrote the call's first argument as the node (tensor references as leaves) and its keyword
    arguments in each reference's fourth element, where tensors are references too. The rewritten node
    lists every tensor once, in order; the call's arguments keep {"__tensor__": i} in their place.
    """
    name = layer.get("name", layer["config"].get("name"))
    nodes = layer.get("inbound_nodes", [])
    if len(nodes) != 1:
        raise LegacyModelError(f"layer {name!r} ({layer['class_name']}) is called {len(nodes)} times; "
                               f"a raw TensorFlow call is expected exactly once")
    function = str(layer["config"].get("function", ""))
    if not allowed_tf_function(function):
        raise LegacyModelError(f"layer {name!r} calls tf.{function}, which is not a TensorFlow math or array "
                               f"operation; the loader runs only those")
    refs: list[list[Any]] = []
    kwargs: dict[str, Any] = {}

    def first_arg(node: Any) -> Any:
        nonlocal kwargs
        if is_tensor_ref(node):
            if len(node) == 4:
                kwargs = node[3]
            refs.append(list(node[:3]))
            return {"__tensor__": len(refs) - 1}
        return [first_arg(item) for item in node] if isinstance(node, list) else node

    def in_kwargs(value: Any) -> Any:
        if is_tensor_ref(value):
            refs.append(list(value[:3]))
            return {"__tensor__": len(refs) - 1}
        if isinstance(value, list):
            return [in_kwargs(item) for item in value]
        if isinstance(value, dict):
            return {k: in_kwargs(v) for k, v in value.items()}
        return value

    args = [first_arg(nodes[0])]
    call = {"function": function, "args": args, "kwargs": in_kwargs(kwargs),
            "slicing": layer["class_name"] == "SlicingOpLambda"}
    keep = {k: layer["config"][k] for k in ("name", "trainable", "dtype") if k in layer["config"]}
    layer["class_name"] = TF_OP_CLASS
    layer["config"] = {**keep, "call": call}
    layer["inbound_nodes"] = [[[*ref, {}] for ref in refs]]


def layer_classes(model_config: dict[str, Any]) -> list[tuple[str, str]]:
    """(layer name, class name) of every layer, nested models' and wrapped layers' included."""
    found: list[tuple[str, str]] = []

    def visit(layer: dict[str, Any]) -> None:
        config: dict[str, Any] = layer["config"] if isinstance(layer.get("config"), dict) else {}
        found.append((str(layer.get("name", config.get("name", "?"))), str(layer.get("class_name"))))
        for inner in config.get("layers", []) if isinstance(config.get("layers"), list) else []:
            if isinstance(inner, dict):
                visit(inner)
        for key in ("layer", "backward_layer"):
            if isinstance(config.get(key), dict):
                visit(config[key])

    for layer in model_config.get("config", {}).get("layers", []):
        visit(layer)
    return found
