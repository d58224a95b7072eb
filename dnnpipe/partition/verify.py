"""Run the same inputs through the Keras model and the chain of TFLite sub-models, and compare."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..interpreter import StageRunner
from ..manifest import Manifest, TensorSpec

# Largest accepted difference, relative to max(1, largest reference magnitude) of each output.
TOLERANCE = {"none": 1e-4, "float16": 2e-2, "int8": 0.25}


@dataclass(frozen=True)
class Verification:
    differences: dict[str, float]  # output name -> largest relative difference
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(d <= self.tolerance for d in self.differences.values())

    def describe(self) -> str:
        worst = ", ".join(f"{name}: {diff:.2e}" for name, diff in self.differences.items())
        verdict = "OK" if self.ok else "FAILED"
        return f"verify {verdict}: largest difference per output (relative) {worst}; tolerance {self.tolerance:g}"


def random_inputs(specs: tuple[TensorSpec, ...], samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs in [0, 1) for floats; small integers (valid token ids for any vocabulary) otherwise."""
    rng = np.random.default_rng(seed)
    values = {}
    for spec in specs:
        shape = (samples, *spec.shape[1:])
        if np.issubdtype(np.dtype(spec.dtype), np.floating):
            values[spec.name] = rng.random(shape).astype(spec.dtype)
        else:
            values[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
    return values


def run_chain(manifest: Manifest, folder: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Push each sample through every stage in order, carrying tensors by name."""
    runners = [StageRunner(folder / stage.file, stage) for stage in manifest.stages]
    samples = len(next(iter(inputs.values())))
    results: dict[str, list[np.ndarray]] = {spec.name: [] for spec in manifest.outputs}
    for i in range(samples):
        carried = [inputs[spec.name][i:i + 1] for spec in manifest.inputs]
        for runner in runners:
            carried = runner(carried)
        for spec, value in zip(manifest.outputs, carried):
            results[spec.name].append(value)
    return {name: np.concatenate(values) for name, values in results.items()}


def verify(model, manifest: Manifest, folder: Path, tolerance: float, samples: int = 2) -> Verification:
    inputs = random_inputs(manifest.inputs, samples)
    feed = [inputs[x._keras_history[0].name] for x in model.inputs]
    expected = model(feed if len(feed) > 1 else feed[0], training=False)
    expected = expected if isinstance(expected, (list, tuple)) else [expected]
    got = run_chain(manifest, folder, inputs)
    differences = {}
    for spec, reference in zip(manifest.outputs, expected):
        reference = np.asarray(reference, dtype=np.float64)
        scale = max(1.0, float(np.abs(reference).max(initial=0.0)))
        differences[spec.name] = float(np.abs(got[spec.name] - reference).max(initial=0.0)) / scale
    return Verification(differences, tolerance)
