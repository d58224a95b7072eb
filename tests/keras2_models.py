"""Keras 2 model files as users have them, written by tf_keras (tf.keras) in a process of their own.

    python tests/keras2_models.py OUT KIND...

writes OUT/KIND.h5 (and OUT/savedmodel/, OUT/functional_keras2.keras), OUT/KIND_data.h5 with inputs (dataset 'images'
for one input, else one per input name), OUT/KIND_expected.h5 with tf.keras's outputs (one dataset per
output layer) and OUT/KIND.json with the model's units (its non-input layers, in order). Fixed seeds,
weights=None: nothing is downloaded. Keras 3 is never imported here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROWS = 3

# A custom layer, the same source for tf_keras (here) and for Keras 3 (the --custom-objects file).
CUSTOM_LAYERS = '''
import {keras} as keras


class Scale(keras.layers.Layer):
    """x * gain * factor, with one learned gain per channel."""

    def __init__(self, factor=1.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def build(self, input_shape):
        self.gain = self.add_weight(name="gain", shape=(input_shape[-1],), initializer="random_normal")

    def call(self, x):
        return x * self.gain * self.factor

    def get_config(self):
        return {{**super().get_config(), "factor": self.factor}}
'''


def custom_layers_source(keras_module: str = "keras") -> str:
    return CUSTOM_LAYERS.format(keras=keras_module)


def sequential(k, tf):
    L = k.layers
    return k.Sequential([L.Dense(8, activation="relu", input_shape=(6,), name="d1"), L.BatchNormalization(name="bn"),
                         L.Dense(8, activation="tanh", name="d2"), L.Dropout(0.1, name="drop"),
                         L.Dense(3, name="d3")], name="sequential_mlp")


def functional(k, tf):
    """Two inputs, two outputs; depthwise convolutions, squeeze-excite, concatenation, a nested block."""
    L = k.layers
    image, meta = k.Input((16, 16, 3), name="image"), k.Input((5,), name="meta")
    x = L.Conv2D(8, 3, strides=2, padding="same", name="stem")(image)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(6.0, name="stem_relu")(x)
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = L.BatchNormalization(name="dw_bn")(x)
    x = L.Activation("swish", name="dw_act")(x)
    s = L.GlobalAveragePooling2D(name="se_pool")(x)
    s = L.Reshape((1, 1, 8), name="se_reshape")(s)
    s = L.Conv2D(2, 1, activation="swish", name="se_reduce")(s)
    s = L.Conv2D(8, 1, activation="sigmoid", name="se_expand")(s)
    x = L.Multiply(name="se_scale")([x, s])
    y = L.SeparableConv2D(8, 3, padding="same", name="sep")(x)
    x = L.Add(name="res_add")([x, y])
    inner_in = k.Input((8, 8, 8), name="block_in")
    block = k.Model(inner_in, L.Conv2D(8, 1, activation="relu", name="block_conv")(inner_in), name="block")
    x = block(x)
    pooled = L.GlobalAveragePooling2D(name="pool")(x)
    m = L.Dense(4, activation="relu", name="meta_dense")(meta)
    joined = L.Concatenate(name="join")([pooled, m])
    main = L.Dense(3, name="main")(joined)
    aux = L.Dense(2, name="aux")(m)
    return k.Model([image, meta], [main, aux], name="functional")


def tf_ops(k, tf):
    """Raw TensorFlow calls in the functional graph: Keras 2 wraps each in a TFOpLambda layer."""
    L = k.layers
    x = inputs = k.Input((12,), name="x")
    h = L.Dense(8, name="d1")(x)
    h = tf.nn.relu(h) * 2.0
    head, tail = h[:, :4], h[:, 4:]
    h = tf.concat([head, tf.math.sigmoid(tail)], axis=-1)
    h = tf.reduce_mean(h, axis=-1, keepdims=True) + h
    h = tf.reshape(h, (-1, 2, 4))
    h = tf.transpose(h, perm=[0, 2, 1])[:, ::-1, :]
    h = L.Flatten(name="flat")(h)
    return k.Model(inputs, L.Dense(3, name="d2")(h), name="tf_ops")


def custom(k, tf):
    namespace: dict = {}
    exec(custom_layers_source("tf_keras"), namespace)  # noqa: S102 - our own source, above
    L = k.layers
    x = inputs = k.Input((8, 8, 3), name="image")
    x = L.Conv2D(4, 3, padding="same", name="conv")(x)
    x = namespace["Scale"](factor=0.5, name="scale")(x)
    x = L.Conv2D(4, 3, padding="same", activation="relu", name="conv2")(x)
    x = L.GlobalMaxPooling2D(name="pool")(x)
    return k.Model(inputs, L.Dense(2, name="logits")(x), name="custom")


def layer_zoo(k, tf):
    """One of each layer kind a Keras 2 CNN or small sequence model carries, with their Keras 2 arguments."""
    L, R = k.layers, k.regularizers
    x = image = k.Input((16, 16, 3), name="image")
    x = L.Rescaling(1 / 255.0, offset=-0.5, name="rescale")(x)
    normalize = L.Normalization(name="normalize")
    normalize.adapt(tf.random.stateless_uniform((8, 16, 16, 3), seed=(1, 2)))
    x = normalize(x)
    x = L.ZeroPadding2D(((1, 0), (1, 0)), name="pad")(x)
    x = L.Conv2D(6, 3, kernel_regularizer=R.l2(1e-4), bias_regularizer=R.L1L2(1e-5, 1e-5),
                 kernel_initializer=k.initializers.VarianceScaling(2.0, "fan_out", "truncated_normal"),
                 kernel_constraint=k.constraints.MaxNorm(3), name="conv")(x)
    x = L.PReLU(shared_axes=[1, 2], name="prelu")(x)
    x = L.SeparableConv2D(6, 3, padding="same", depth_multiplier=2, name="sep")(x)
    x = L.BatchNormalization(momentum=0.9, epsilon=1e-3, name="bn")(x)
    x = L.LeakyReLU(0.2, name="leaky")(x)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", activation="relu6", name="dw")(x)
    x = L.GroupNormalization(groups=3, name="gn")(x)
    x = L.Conv2DTranspose(4, 3, strides=2, padding="same", name="up_conv")(x)
    x = L.ELU(name="elu")(x)
    x = L.MaxPooling2D(name="max")(x)
    x = L.AveragePooling2D(name="avg")(x)
    x = L.UpSampling2D(interpolation="bilinear", name="upsample")(x)
    x = L.Cropping2D(1, name="crop")(x)
    x = L.SpatialDropout2D(0.2, name="sdrop")(x)
    x = L.LayerNormalization(name="ln")(x)
    seq = L.Reshape((12, 12 * 4), name="to_seq")(x)
    seq = L.Conv1D(8, 3, padding="causal", name="conv1d")(seq)
    seq = L.DepthwiseConv1D(3, padding="same", name="dw1d")(seq)
    forward = L.GRU(5, return_sequences=True, name="gru")(seq)
    both = L.Bidirectional(L.LSTM(3, return_sequences=True), name="bilstm")(forward)
    per_step = L.TimeDistributed(L.Dense(4), name="per_step")(both)
    pooled = L.GlobalAveragePooling1D(name="seq_pool")(per_step)
    flat = L.Flatten(name="flat")(L.Permute((2, 1, 3), name="permute")(x))
    joined = L.Concatenate(name="join")([pooled, L.Dense(4, activation="gelu", name="squeeze")(flat)])
    joined = L.Dropout(0.3, name="drop")(joined)
    return k.Model(image, L.Dense(3, activation="softmax", name="probs")(joined), name="layer_zoo")


def attention(k, tf):
    """A transformer block: attention with value= passed by keyword, layer norm over two axes."""
    L = k.layers
    tokens = k.Input((6,), dtype="int32", name="tokens")
    x = L.Embedding(20, 8, name="embed")(tokens)
    y = L.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")(x, value=x)
    x = L.LayerNormalization(axis=[1, 2], name="norm1")(L.Add(name="add1")([x, y]))
    z = L.Attention(score_mode="dot", name="dot_attention")([x, x])
    x = L.LayerNormalization(epsilon=1e-6, name="norm2")(L.Add(name="add2")([x, z]))
    x = L.GlobalAveragePooling1D(name="pool")(x)
    return k.Model(tokens, L.Dense(2, name="logits")(x), name="attention")


def lambda_layer(k, tf):
    x = inputs = k.Input((4,), name="x")
    x = k.layers.Lambda(lambda t: t * 2.0, name="double")(x)
    return k.Model(inputs, k.layers.Dense(2, name="d")(x), name="lambda_model")


def mobilenetv2(k, tf):
    return k.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classifier_activation=None)


def resnet50(k, tf):
    return k.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classifier_activation=None)


def efficientnetb0(k, tf):
    return k.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classifier_activation=None)


KINDS = {f.__name__: f for f in (sequential, functional, tf_ops, custom, layer_zoo, attention, lambda_layer,
                                 mobilenetv2, resnet50, efficientnetb0)}


def randomize_statistics(model, rng) -> None:
    """Moving means and variances away from 0 and 1, so a weight loaded into the wrong place shows."""
    for weight in model.weights:
        if "moving_mean" in weight.name:
            weight.assign(rng.normal(0, 0.5, weight.shape).astype("float32"))
        elif "moving_variance" in weight.name:
            weight.assign(rng.uniform(0.5, 2.0, weight.shape).astype("float32"))


def write(kind: str, out: Path, k, tf) -> None:
    import h5py
    import numpy as np

    k.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = KINDS[kind](k, tf)
    randomize_statistics(model, rng)
    inputs = [rng.random((ROWS, *x.shape[1:])).astype("float32") if x.dtype.is_floating
              else rng.integers(0, 2, (ROWS, *x.shape[1:])).astype(x.dtype.name) for x in model.inputs]
    outputs = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    model.save(out / f"{kind}.h5")
    input_names = [x.name.split(":")[0] for x in model.inputs]
    with h5py.File(out / f"{kind}_data.h5", "w") as f:
        for name, value in zip(["images"] if len(inputs) == 1 else input_names, inputs):
            f[name] = value
    with h5py.File(out / f"{kind}_expected.h5", "w") as f:
        for name, value in zip(model.output_names, outputs):
            f[name] = np.asarray(value)
    units = [layer.name for layer in model.layers if not isinstance(layer, k.layers.InputLayer)]
    (out / f"{kind}.json").write_text(json.dumps({"units": units, "outputs": list(model.output_names)}))
    if kind == "sequential":  # the same model as a tf.keras SavedModel folder
        model.save(out / "savedmodel", save_format="tf")
    if kind == "functional":  # and in the .keras format of tf.keras 2.13 and later
        model.save(out / "functional_keras2.keras")


def main(out: str, *kinds: str) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    import tf_keras as k

    tf.get_logger().setLevel("ERROR")
    Path(out).mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        write(kind, Path(out), k, tf)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
