"""Tiny Keras models with the graph shapes real networks have; built with fixed seeds, no downloads."""

from __future__ import annotations


def _keras():
    from dnnpipe.tfenv import import_tensorflow

    _, keras = import_tensorflow()
    keras.utils.set_random_seed(0)
    return keras


def residual_cnn():
    keras = _keras()
    L = keras.layers
    x = inputs = keras.Input((12, 12, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="stem")(x)
    for i in range(2):
        y = L.Conv2D(8, 3, padding="same", name=f"res{i}_a")(x)
        y = L.BatchNormalization(name=f"res{i}_bn")(y)
        y = L.ReLU(name=f"res{i}_relu")(y)
        y = L.Conv2D(8, 3, padding="same", name=f"res{i}_b")(y)
        x = L.Add(name=f"res{i}_add")([x, y])
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(5, name="logits")(x), name="residual")


def dense_cnn():
    keras = _keras()
    L = keras.layers
    x = inputs = keras.Input((10, 10, 3), name="image")
    features = [L.Conv2D(4, 3, padding="same", name="stem")(x)]
    for i in range(3):
        joined = features[0] if len(features) == 1 else L.Concatenate(name=f"cat{i}")(features)
        features.append(L.Conv2D(4, 3, padding="same", activation="relu", name=f"grow{i}")(joined))
    x = L.Concatenate(name="cat_final")(features)
    x = L.GlobalMaxPooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(3, name="logits")(x), name="densenet_like")


def squeeze_excite_cnn():
    keras = _keras()
    L = keras.layers
    x = inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", name="stem")(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    s = L.GlobalAveragePooling2D(keepdims=True, name="se_pool")(x)
    s = L.Conv2D(2, 1, activation="swish", name="se_reduce")(s)
    s = L.Conv2D(8, 1, activation="sigmoid", name="se_expand")(s)
    x = L.Multiply(name="se_scale")([x, s])
    x = L.Conv2D(8, 1, name="project")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(4, name="logits")(x), name="efficientnet_like")


def two_in_two_out():
    keras = _keras()
    L = keras.layers
    a = keras.Input((6,), name="features")
    b = keras.Input((4, 4, 1), name="patch")
    ha = L.Dense(8, activation="relu", name="dense_a")(a)
    hb = L.Flatten(name="flat")(L.Conv2D(2, 2, name="conv_b")(b))
    aux = L.Dense(2, name="aux_out")(ha)  # an early output: crosses every later cut
    joined = L.Concatenate(name="join")([ha, hb])
    main = L.Dense(3, name="main_out")(L.Dense(8, activation="relu", name="mix")(joined))
    return keras.Model([a, b], [main, aux], name="two_in_two_out")


def shared_batchnorm_two_in_two_out():
    """Issue 24: a BatchNorm output feeding the next layer and a later Add, with two inputs and two outputs
    (the converter fuses the BatchNorm with the convolution before it)."""
    keras = _keras()
    L = keras.layers
    img = keras.Input((8, 8, 3), name="img")
    meta = keras.Input((4,), name="meta")
    x = L.Conv2D(8, 3, padding="same", name="conv1")(img)
    bn = L.BatchNormalization(name="bn1")(x)
    y = L.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(bn)
    y = L.Conv2D(8, 3, padding="same", name="conv3")(y)
    x = L.GlobalAveragePooling2D(name="pool")(L.Add(name="add")([bn, y]))
    joined = L.Concatenate(name="join")([x, L.Dense(8, activation="relu", name="meta_dense")(meta)])
    return keras.Model([img, meta], [L.Dense(3, name="main_out")(joined), L.Dense(2, name="aux_out")(x)],
                       name="shared_bn")


def outputs_of_equal_values():
    """Two outputs with the same values (one a linear activation of the other): the converted whole model
    cannot tell them apart, so its units cannot be mapped and every stage is converted on its own."""
    keras = _keras()
    L = keras.layers
    x = keras.Input((6,), name="x")
    a = L.Dense(4, name="dense")(x)
    b = L.Activation("linear", name="copy")(a)
    return keras.Model(x, [L.Dense(3, name="head")(b), a, b], name="equal_outputs")


def transformer_block():
    keras = _keras()
    L = keras.layers
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    x = L.Embedding(20, 8, name="embed")(tokens)
    y = L.MultiHeadAttention(num_heads=2, key_dim=4, name="attention")(x, x)
    x = L.LayerNormalization(name="norm1")(L.Add(name="add1")([x, y]))
    y = L.Dense(16, activation="gelu", name="ffn_in")(x)
    y = L.Dense(8, name="ffn_out")(y)
    x = L.LayerNormalization(name="norm2")(L.Add(name="add2")([x, y]))
    x = L.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(tokens, L.Dense(2, name="logits")(x), name="transformer")


def sequential_mlp():
    keras = _keras()
    L = keras.layers
    return keras.Sequential([keras.Input((5,), name="x"), L.Dense(6, activation="relu", name="d1"),
                             L.Dense(6, activation="relu", name="d2"), L.Dense(2, name="d3")], name="mlp")


ALL = {f.__name__: f for f in (residual_cnn, dense_cnn, squeeze_excite_cnn, two_in_two_out, transformer_block,
                               sequential_mlp)}
