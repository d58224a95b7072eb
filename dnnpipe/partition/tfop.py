"""The Keras 3 layer that replays one raw TensorFlow call of a Keras 2 functional graph (a TFOpLambda).

Imported only once TensorFlow is loaded; legacy.py writes its config from the Keras 2 one.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from .legacy import TF_OP_CLASS, allowed_tf_function


class DnnpipeTFOp(keras.layers.Layer):
    """tf.<function>(*args, **kwargs) with the layer's input tensors put where {"__tensor__": i} stands."""

    def __init__(self, call: dict[str, Any], **kwargs):
        super().__init__(**kwargs)
        if not allowed_tf_function(str(call.get("function"))):  # checked here too: any file may name this class
            raise ValueError(f"layer {self.name!r} calls tf.{call.get('function')}, which is not a TensorFlow "
                             f"math or array operation")
        self.call_spec = call
        self.function = _tf_function(call["function"])

    def call(self, inputs):
        tensors = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        fill = _filler(tensors, self.call_spec.get("slicing", False))
        return self.function(*fill(self.call_spec["args"]), **fill(self.call_spec["kwargs"]))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "call": self.call_spec}


def _tf_function(path: str):
    target: Any = tf
    for part in path.split("."):
        target = getattr(target, part, None)
    if not callable(target):
        raise ValueError(f"TensorFlow has no function tf.{path}")
    return target


def _filler(tensors: list[Any], slicing: bool):
    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"__tensor__"}:
                return tensors[value["__tensor__"]]
            if slicing and set(value) == {"start", "stop", "step"}:  # Keras 2's encoding of a slice
                return slice(fill(value["start"]), fill(value["stop"]), fill(value["step"]))
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(fill(v) for v in value)
        return value

    return fill


CUSTOM_OBJECTS = {TF_OP_CLASS: DnnpipeTFOp}
