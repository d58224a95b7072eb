"""Example models and datasets made locally (weights=None, fixed seed): nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .errors import DnnpipeError
from .tfenv import import_tensorflow


def tiny_cnn(input_size: int = 80):
    """A small EfficientNet-flavoured CNN (residuals, squeeze-excite): converts in seconds, and like real
    networks spends more time computing than moving its activations."""
    _, keras = import_tensorflow()
    L = keras.layers
    x = inputs = keras.Input((input_size, input_size, 3), name="image")
    x = L.Conv2D(64, 3, strides=2, padding="same", activation="swish", name="stem")(x)
    for i, (width, stride) in enumerate(((96, 1), (128, 2), (128, 1), (192, 1), (256, 2), (256, 1))):
        y = L.Conv2D(width, 3, strides=stride, padding="same", activation="swish", name=f"block{i}_conv")(x)
        s = L.GlobalAveragePooling2D(keepdims=True, name=f"block{i}_se_pool")(y)
        s = L.Conv2D(16, 1, activation="swish", name=f"block{i}_se_reduce")(s)
        s = L.Conv2D(width, 1, activation="sigmoid", name=f"block{i}_se_expand")(s)
        y = L.Multiply(name=f"block{i}_se_scale")([y, s])
        y = L.Conv2D(width, 1, name=f"block{i}_project")(y)
        x = L.Add(name=f"block{i}_add")([x, y]) if x.shape[-1] == width and stride == 1 else y
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(10, name="logits")(x), name="tiny")


def efficientnetv2b0(input_size: int = 224):
    """The paper's model, untrained (weights=None): the graph and the cost are what matter here."""
    _, keras = import_tensorflow()
    return keras.applications.EfficientNetV2B0(weights=None, input_shape=(input_size, input_size, 3),
                                               include_preprocessing=True)


def mobilenetv2(input_size: int = 224):
    _, keras = import_tensorflow()
    return keras.applications.MobileNetV2(weights=None, input_shape=(input_size, input_size, 3))


EXAMPLES: dict[str, Callable] = {"tiny": tiny_cnn, "efficientnetv2b0": efficientnetv2b0, "mobilenetv2": mobilenetv2}


def make_model(kind: str, path: Path, input_size: int | None = None, seed: int = 0) -> Path:
    if kind not in EXAMPLES:
        raise DnnpipeError(f"unknown example model {kind!r}; choose one of {', '.join(EXAMPLES)}")
    _, keras = import_tensorflow()
    keras.utils.set_random_seed(seed)
    model = EXAMPLES[kind](input_size) if input_size else EXAMPLES[kind]()
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


def make_dataset(path: Path, shape: tuple[int, ...], samples: int, seed: int = 0) -> Path:
    """Synthetic images in [0, 255] as float32, dataset 'images', one inference per row."""
    import h5py

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=(rng.random((samples, *shape)) * 255).astype("float32"))
    return path
