"""One stage of a Keras graph as a TFLite flatbuffer, fed and read by signature key."""

from __future__ import annotations

import tempfile
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from ..native import native_stderr_captured
from ..tfenv import import_tensorflow
from ..slicing.plan import CutError
from .graph import GraphTensor


def stage_model(keras_tensors: dict[str, Any], inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor]):
    """A Keras model from one cut's tensors to those of the next cut that the stage computes.

    Keras 3 accepts inner tensors as inputs, but not a tensor that is both input and output: those
    pass-through tensors (a skip connection crossing the whole stage) are left to convert_stage.
    """
    _, keras = import_tensorflow()
    passed = {t.name for t in inputs}
    computed = [keras_tensors[t.name] for t in outputs if t.name not in passed]
    if not computed:
        raise CutError(f"the stage from {[t.name for t in inputs]} computes none of {[t.name for t in outputs]}")
    try:
        return keras.Model([keras_tensors[t.name] for t in inputs], computed)
    except ValueError as e:
        raise CutError(f"cannot build the sub-model from {[t.name for t in inputs]} to "
                             f"{[t.name for t in outputs]}: {str(e).splitlines()[0]}") from None


def tensor_spec(tensor: GraphTensor, key: str):
    tf, _ = import_tensorflow()
    if any(d is None for d in tensor.shape[1:]):
        raise CutError(f"tensor {tensor.name!r} has shape {tensor.shape}: every dimension but the batch "
                             f"must be fixed to run on a TFLite interpreter")
    return tf.TensorSpec([1, *tensor.shape[1:]], tf.as_dtype(tensor.dtype), name=key)


def endpoint(model, inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor], keys: dict[str, str]):
    """A function from {key: input} to {key: output} around a Keras (sub-)model, and its input signature.

    Outputs that are also inputs (pass-throughs) are returned as identities around the model.
    """
    tf, _ = import_tensorflow()
    passed = {t.name for t in inputs}

    def call(feed):
        args = [feed[keys[t.name]] for t in inputs]
        results = model(args if len(args) > 1 else args[0], training=False)
        results = iter(results if isinstance(results, (list, tuple)) else [results])
        return {keys[t.name]: tf.identity(feed[keys[t.name]]) if t.name in passed else next(results)
                for t in outputs}

    return call, [{keys[t.name]: tensor_spec(t, keys[t.name]) for t in inputs}]


def convert_stage(model, inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor], keys: dict[str, str],
                  quantize: str = "none",
                  representative: Optional[Callable[[], Iterable[dict[str, np.ndarray]]]] = None,
                  integer_io: bool = False) -> bytes:
    """Convert with batch size 1; int8 needs representative samples of the stage's inputs by key.

    integer_io (int8 only): the model takes and returns int8 too, as a whole model to be sliced does, so
    the tensors at every cut stay int8 (a float interface would need a quantize op at every cut).
    """
    tf, keras = import_tensorflow()
    serve, signature = endpoint(model, inputs, outputs, keys)

    # Through a SavedModel, as TFLiteConverter.from_keras_model does for Keras 3: converting the
    # concrete function directly keeps Keras variables as resources that the interpreter cannot read.
    with tempfile.TemporaryDirectory(prefix="dnnpipe-stage-") as folder, native_stderr_captured() as log:
        try:
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint("serve", serve, signature)
            archive.write_out(folder, verbose=False)
            converter = tf.lite.TFLiteConverter.from_saved_model(folder)
            _set_quantization(tf, converter, quantize, representative)
            if integer_io and quantize == "int8":
                converter.inference_input_type = converter.inference_output_type = tf.int8
            return converter.convert()
        except CutError:
            raise
        except Exception as e:  # the converter raises many types; all mean the same to the user
            failure = e
    detail = " ".join(log[0].split())[-400:]
    raise CutError(f"TFLite conversion failed: {str(failure).splitlines()[0]} {detail}".strip())


def _set_quantization(tf, converter, quantize: str, representative) -> None:
    if quantize == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        if representative is None:
            raise CutError("--quantize int8 needs --calibration-data")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative  # samples as {signature key: array}, fed by name
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
