"""Run the same inputs through the Keras model and the chain of TFLite sub-models, and compare."""

from __future__ import annotations

from pathlib import Path

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
    chain = run_chain(manifest, folder, inputs)
    got = {spec.name: to_real(spec, chain[spec.name]) for spec in manifest.outputs}
    return Verification(differences(got, {spec.name: value for spec, value in zip(manifest.outputs, expected)}),
                        tolerance)
