"""Run the same inputs through the Keras model and the chain of TFLite sub-models, and compare."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import DnnpipeError
from ..manifest import Manifest
from ..runtime.dataio import to_real
from ..slicing.chain import Verification, differences, random_inputs, run_chain

# Largest accepted difference, relative to max(1, largest reference magnitude) of each output.
TOLERANCE = {"none": 1e-4, "float16": 2e-2, "int8": 0.25}


def verify(model, manifest: Manifest, folder: Path, tolerance: float, samples: int = 2) -> Verification:
    """Int8 model inputs and outputs (a whole int8 model sliced) are compared as the real numbers they stand for."""
    inputs = random_inputs(manifest.inputs, samples)
    real = {spec.name: to_real(spec, inputs[spec.name]) for spec in manifest.inputs}
    feed = [real[x._keras_history[0].name] for x in model.inputs]
    expected = model(feed if len(feed) > 1 else feed[0], training=False)
    expected = expected if isinstance(expected, (list, tuple)) else [expected]
    _finite(folder, "the Keras model", {spec.name: np.asarray(v) for spec, v in zip(manifest.outputs, expected)})
    chain = run_chain(manifest, folder, inputs)
    got = {spec.name: to_real(spec, chain[spec.name]) for spec in manifest.outputs}
    _finite(folder, "the sub-model chain", got)
    return Verification(differences(got, {spec.name: value for spec, value in zip(manifest.outputs, expected)}),
                        tolerance)


def _finite(folder: Path, what: str, outputs: Mapping[str, np.ndarray]) -> None:
    """A NaN output is no difference to report: it says the model (its weights) computes NaN."""
    for name, value in outputs.items():
        if not np.all(np.isfinite(value)):
            kind = "NaN" if np.isnan(value).any() else "infinite"
            raise DnnpipeError(f"{folder}: {what}'s output {name!r} is {kind} on the verification inputs (NaN or "
                               f"infinite weights?); nothing to compare the sub-models with")
