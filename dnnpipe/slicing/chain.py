"""Running a chain of sub-models by the manifest, and comparing it with a reference (no TensorFlow)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..interpreter import StageRunner
from ..manifest import Manifest, StageSpec, TensorSpec, WholeModel


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


def random_inputs(specs: Sequence[TensorSpec], samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs in [0, 1) for floats, the whole range for 8-bit (quantized images), small integers (valid
    token ids for any vocabulary) otherwise."""
    rng = np.random.default_rng(seed)
    values = {}
    for spec in specs:
        shape = (samples, *spec.shape[1:])
        dtype = np.dtype(spec.dtype)
        if np.issubdtype(dtype, np.floating):
            values[spec.name] = rng.random(shape).astype(dtype)
        elif dtype.itemsize == 1 and dtype != np.bool_:
            info = np.iinfo(dtype)
            values[spec.name] = rng.integers(info.min, info.max + 1, shape).astype(dtype)
        else:
            values[spec.name] = rng.integers(0, 2, shape).astype(dtype)
    return values


def run_stages(runners: Sequence[StageRunner], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Push each sample through every runner in order, carrying tensors by name."""
    first, last = runners[0].stage, runners[-1].stage
    samples = len(next(iter(inputs.values())))
    results: dict[str, list[np.ndarray]] = {spec.name: [] for spec in last.outputs}
    for i in range(samples):
        carried = [inputs[spec.name][i:i + 1] for spec in first.inputs]
        for runner in runners:
            carried = runner(carried)
        for spec, value in zip(last.outputs, carried):
            results[spec.name].append(value)
    return {name: np.concatenate(values) for name, values in results.items()}


def run_chain(manifest: Manifest, folder: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run_stages([StageRunner(folder / stage.file, stage) for stage in manifest.stages], inputs)


def run_whole(whole: WholeModel, folder: Path, units: int, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The whole model.tflite, fed and read like a one-stage pipeline."""
    stage = StageSpec(1, 1, (1, units), whole.file, whole.sha256, whole.cuts[0], whole.cuts[units])
    return run_stages([StageRunner(folder / whole.file, stage)], inputs)


def differences(got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Largest |got - expected| per output, relative to max(1, largest reference magnitude)."""
    result = {}
    for name, reference in expected.items():
        reference = np.asarray(reference, dtype=np.float64)
        scale = max(1.0, float(np.abs(reference).max(initial=0.0)))
        result[name] = float(np.abs(np.asarray(got[name], np.float64) - reference).max(initial=0.0)) / scale
    return result


def all_tensor_values(flatbuffer: bytes, tensors: Sequence[int],
                      feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[int, np.ndarray]:
    """Every listed tensor's value for each feed (by signature key), stacked: what mapping units needs.

    Runs the built-in kernels without the default delegate, which would keep intermediate tensors to itself.
    """
    from ..interpreter import interpreter_module
    from ..native import native_stderr_captured

    _, module = interpreter_module()
    options: dict = {"experimental_preserve_all_tensors": True}
    resolver = getattr(getattr(module, "OpResolverType", None), "BUILTIN_WITHOUT_DEFAULT_DELEGATES", None)
    if resolver is not None:
        options["experimental_op_resolver_type"] = resolver
    with native_stderr_captured():
        interpreter = module.Interpreter(model_content=flatbuffer, **options)
    runner = interpreter.get_signature_runner()
    collected: dict[int, list[np.ndarray]] = {t: [] for t in tensors}
    for feed in feeds:
        runner(**feed)
        for t in list(collected):
            try:
                value = np.array(interpreter.get_tensor(t))
            except ValueError:  # not allocated (optional or dynamic): cannot be a cut
                del collected[t]
                continue
            if value.ndim == 0:  # a scalar (a loop counter, a shape): never a tensor crossing a cut
                del collected[t]
                continue
            collected[t].append(value)
    return {t: np.concatenate(values) for t, values in collected.items() if values}
