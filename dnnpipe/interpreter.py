"""The TFLite interpreter backend: ai-edge-litert, else tflite-runtime, else TensorFlow's.

Boards like the Coral Dev Board cannot install full TensorFlow, so the lite packages come first and
TensorFlow is imported only when neither is present.
"""

from __future__ import annotations

import importlib
import inspect
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import DnnpipeError
from .native import native_stderr_captured

BACKENDS = (
    ("ai-edge-litert", "ai_edge_litert.interpreter"),
    ("tflite-runtime", "tflite_runtime.interpreter"),
    ("tensorflow", "tensorflow.lite"),
)


def interpreter_module() -> tuple[str, Any]:
    """The first importable backend as (name, module with Interpreter and load_delegate)."""
    for name, module in BACKENDS:
        try:
            return name, importlib.import_module(module)
        except ImportError:
            continue
    raise DnnpipeError("no TFLite interpreter found: pip install ai-edge-litert (or tflite-runtime)")


def prepared_invoke(runner, feed: dict[str, Any], warmup: int) -> Callable[[], None]:
    """A signature runner's own invoke with its inputs set once and `warmup` invokes done: what every timing
    loop (the host's profilers, the device timer) times, without the runner's input and output copies."""
    runner(**feed)  # allocates and sets the inputs
    invoke = partial(runner._interpreter_wrapper.Invoke, runner._subgraph_index)
    for _ in range(warmup):
        invoke()
    return invoke


def call_seconds(call: Callable[[], object], repeats: int, warmup: int = 0) -> list[float]:
    """Each of `repeats` calls' wall time in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        samples.append(time.perf_counter() - began)
    return samples


def load_interpreter(model: Path | bytes, num_threads: Optional[int] = None, delegate: Optional[str] = None,
                     every_signature_delegated: bool = False):
    """An allocated interpreter for a .tflite file or its bytes, with an optional delegate library.

    The default CPU delegate (XNNPACK) only takes a model with one signature; the profiler's model
    has one per unit, so it asks for the delegate on all of them to time what the runtime will run.
    """
    _, module = interpreter_module()
    options: dict[str, Any] = {}
    if every_signature_delegated and "experimental_default_delegate_latest_features" in \
            inspect.signature(module.Interpreter).parameters:
        options["experimental_default_delegate_latest_features"] = True
    if num_threads:
        options["num_threads"] = num_threads
    if delegate:
        try:
            options["experimental_delegates"] = [module.load_delegate(delegate)]
        except (ValueError, OSError) as e:
            raise DnnpipeError(f"cannot load delegate {delegate}: {e}") from None
    source = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
    try:
        with native_stderr_captured():  # "Created TensorFlow Lite XNNPACK delegate" on every load
            interpreter = module.Interpreter(**source, **options)
            interpreter.allocate_tensors()
    except ValueError as e:
        where = "model bytes" if isinstance(model, bytes) else str(model)
        raise DnnpipeError(f"{where}: not a valid TFLite model ({e})") from None
    return interpreter


class StageRunner:
    """Runs one stage's sub-model, fed and read by signature key in manifest (wire) order.

    The interpreter's own signature is checked against the manifest when the runner is built, so a
    mismatched file fails at start-up with the tensor's name rather than mid-stream.
    """

    def __init__(self, model: Path | bytes, stage, num_threads: Optional[int] = None,
                 delegate: Optional[str] = None):
        self.stage = stage
        interpreter = load_interpreter(model, num_threads, delegate)
        signatures = interpreter.get_signature_list()
        if len(signatures) != 1:
            raise DnnpipeError(f"stage {stage.stage}: expected one signature in {stage.file}, "
                               f"found {sorted(signatures)}")
        self.runner = interpreter.get_signature_runner(next(iter(signatures)))
        self._check("input", stage.inputs, self.runner.get_input_details())
        self._check("output", stage.outputs, self.runner.get_output_details())
        # For `into`: the signature's tensors by index, in manifest (wire) order (a backend without these
        # internals takes __call__'s way).
        runner = self.runner
        try:
            self._wrapper, self._subgraph = runner._interpreter_wrapper, runner._subgraph_index
            self._input_indices = [runner._inputs[spec.key] for spec in stage.inputs]
            self._output_indices = [dict(runner._outputs)[spec.key] for spec in stage.outputs]
            self._wrapper.AllocateTensors(self._subgraph)
            for index in self._output_indices:  # the tensor() signature this build has, tried before a frame
                self._wrapper.tensor(self._wrapper, index, self._subgraph)
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError):
            self._wrapper = None

    def _check(self, kind: str, specs, details: dict[str, Any]) -> None:
        expected = {spec.key for spec in specs}
        if set(details) != expected:
            raise DnnpipeError(f"stage {self.stage.stage}: {self.stage.file} has {kind}s {sorted(details)}, "
                               f"the manifest says {sorted(expected)}")
        import numpy as np

        for spec in specs:
            got = details[spec.key]
            shape, dtype = tuple(int(x) for x in got["shape"]), np.dtype(got["dtype"]).name
            if shape != spec.shape or dtype != spec.dtype:
                raise DnnpipeError(f"stage {self.stage.stage}: {kind} {spec.name!r} is {dtype}{list(shape)} in "
                                   f"{self.stage.file}, the manifest says {spec.dtype}{list(spec.shape)}")

    def __call__(self, arrays) -> list:
        results = self.runner(**{spec.key: array for spec, array in zip(self.stage.inputs, arrays)})
        return [results[spec.key] for spec in self.stage.outputs]

    def into(self, arrays, results) -> None:
        """Run on `arrays` and copy the outputs into `results` (manifest order): what __call__ does without its
        per-call resize and allocation checks and its freshly allocated output arrays (one copy out of the
        interpreter's memory, not two), which a stage pays on every frame."""
        import numpy as np

        wrapper, subgraph = self._wrapper, self._subgraph
        if wrapper is None:
            for result, output in zip(results, self(arrays)):
                np.copyto(result, output)
            return
        for index, array in zip(self._input_indices, arrays):
            wrapper.SetTensor(index, array, subgraph)
        wrapper.Invoke(subgraph)
        for index, result in zip(self._output_indices, results):
            np.copyto(result, wrapper.tensor(wrapper, index, subgraph))  # a view, dropped before the next call
