"""Verifying the sub-model chain against the Keras model: a model that computes NaN is said to, not 'differs'."""

import numpy as np
import pytest

import models
from dnnpipe.errors import DnnpipeError
from dnnpipe.partition.graph import analyse
from dnnpipe.partition.partitioner import partition_keras_model


def test_a_model_with_nan_weights_is_said_to_compute_nan(tmp_path):
    model = models.residual_cnn()
    layer = next(layer for layer in model.layers if layer.get_weights())
    layer.set_weights([np.full_like(w, np.nan) for w in layer.get_weights()])
    U = analyse(model)[0].U
    with pytest.raises(DnnpipeError, match=r"the Keras model's output '.*' is NaN on the verification inputs "
                                           r"\(NaN or infinite weights\?\)"):
        partition_keras_model(model, [[1, 4, 1], [5, U, 2]], tmp_path / "res", "res", "test")
