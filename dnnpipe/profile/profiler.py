"""Measure a model's per-unit costs on this machine: E (ms) and R (MB), the paper's model_config.

Timing each layer as its own interpreter call would mostly measure call overhead (tens of us per
Python call, a layer often takes less). Instead every unit, the whole model and an empty probe
become signatures of ONE TFLite model (one conversion), and only the interpreter's invoke of each
signature is timed, with inputs already in place. E[u] is the median over repeats after warm-up,
minus the probe's invoke time; the sum of E is then checked against the whole model's time.

R[u] counts the unit's weights plus the activations it produces for one inference (batch 1), in MiB.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import DnnpipeError
from ..interpreter import load_interpreter
from ..manifest import TensorSpec
from ..partition.convert import endpoint, signature_keys
from ..partition.split import wire_spec
from ..partition.graph import analyse
from ..tfenv import import_tensorflow, native_stderr_captured
from .costs import MIB, ModelProfile, UnitCost, config_from, time_invoke

def _convert_all(model, graph, keras_tensors, keys) -> bytes:
    """One TFLite flatbuffer with a signature per unit, one for the whole model and an empty probe."""
    tf, keras = import_tensorflow()
    archive = keras.export.ExportArchive()
    archive.track(model)
    names = ["whole", "probe"]
    archive.add_endpoint("whole", *endpoint(model, graph.crossing(0), graph.crossing(graph.U), keys))
    archive.add_endpoint("probe", lambda x: x + 0.0, [tf.TensorSpec([1], tf.float32, name="x")])
    for u in range(1, graph.U + 1):
        inputs, outputs = graph.unit_inputs(u), graph.unit_outputs(u)
        sub = keras.Model([keras_tensors[t.name] for t in inputs], [keras_tensors[t.name] for t in outputs])
        archive.add_endpoint(f"unit_{u}", *endpoint(sub, inputs, outputs, keys))
        names.append(f"unit_{u}")
    with tempfile.TemporaryDirectory(prefix="dnnpipe-profile-") as folder, native_stderr_captured() as log:
        try:
            archive.write_out(folder, verbose=False)
            return tf.lite.TFLiteConverter.from_saved_model(folder, signature_keys=names).convert()
        except Exception as e:  # noqa: BLE001 - converter errors come in many types
            failure = e
    raise DnnpipeError(f"profiling conversion failed: {str(failure).splitlines()[0]} "
                       f"{' '.join(log[0].split())[-300:]}")


def profiling_model(model, progress: Optional[Callable[[str], None]] = None) -> tuple:
    """(graph, keras tensors, signature keys, the profiling flatbuffer): what the host times, and what
    per-device profiling ships to each device."""
    graph, keras_tensors = analyse(model)
    keys = signature_keys(t.name for t in graph.tensors)
    (progress or (lambda _: None))(f"converting {graph.U} units in one model ...")
    return graph, keras_tensors, keys, _convert_all(model, graph, keras_tensors, keys)


def profile_keras_model(model, repeats: int = 30, warmup: int = 5, num_threads: Optional[int] = None,
                        progress: Optional[Callable[[str], None]] = None, converted: Optional[tuple] = None
                        ) -> ModelProfile:
    from ..partition.verify import random_inputs

    graph, keras_tensors, keys, flatbuffer = converted or profiling_model(model, progress)
    say = progress or (lambda _: None)
    interpreter = load_interpreter(flatbuffer, num_threads, every_signature_delegated=True)

    def timed(signature: str, specs: list[TensorSpec]) -> float:
        values = random_inputs(tuple(specs), 1)
        return time_invoke(interpreter.get_signature_runner(signature),
                           {s.key: values[s.name] for s in specs}, repeats, warmup)

    probe = time_invoke(interpreter.get_signature_runner("probe"), {"x": np.zeros(1, "float32")}, repeats, warmup)
    whole = timed("whole", [wire_spec(t, keys) for t in graph.crossing(0)])
    layers = {layer.name: layer for layer in model.layers}
    units = []
    for u, name in enumerate(graph.units, 1):
        ms = max(0.0, timed(f"unit_{u}", [wire_spec(t, keys) for t in graph.unit_inputs(u)]) - probe)
        weights = sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in layers[name].weights)
        produced = sum(t.nbytes for t in graph.tensors if t.producer == u)
        units.append(UnitCost(name, ms, weights / MIB, produced / MIB))
        if u % 10 == 0 or u == graph.U:
            say(f"timed {u}/{graph.U} units")
    return ModelProfile(tuple(units), whole, probe, tuple(graph.cut_bytes(j) for j in range(graph.U + 1)))


def progress_line(message: str) -> None:
    """One updating line on a terminal, plain lines otherwise."""
    if sys.stderr.isatty():
        print(f"\r{message:<60}", end="", file=sys.stderr, flush=True)
    else:
        print(message, file=sys.stderr, flush=True)


def device_config(devices: Optional[Path], speeds: Optional[Sequence[float]], memory: Optional[Sequence[float]],
                  speed_factor_of: Optional[Sequence[float]], whole_ms: Optional[float],
                  bandwidth: Optional[Sequence[float]] = None) -> dict:
    """The cluster part of the config: from a devices file, from flags, or this machine alone.

    --speed-factor-of gives the whole model's measured time on each device; C[d] is then this
    machine's whole-model time over that device's, as E is measured here. Called once before
    profiling (whole_ms None) to check the flags, and once after.
    """
    import json
    import os

    C: Optional[list[float]] = None
    M: Optional[list[float]] = None
    if devices is not None:
        try:
            data = json.loads(Path(devices).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DnnpipeError(f"{devices}: cannot read devices file ({e})") from None
        data = data.get("device_config", data) if isinstance(data, dict) else {}
        C, M = data.get("C"), data.get("M")
        if not isinstance(C, list) or not isinstance(M, list):
            raise DnnpipeError(f"{devices}: expected {{\"C\": [...], \"M\": [...]}} (or a device_config)")
    C = list(speeds) if speeds else C
    M = list(memory) if memory else M
    if speed_factor_of:
        if any(ms <= 0 for ms in speed_factor_of):
            raise DnnpipeError("--speed-factor-of takes each device's whole-model time in ms, all > 0")
        C = [(whole_ms or ms) / ms for ms in speed_factor_of]
    if C is None:
        C = [1.0]
    if M is None:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / MIB
        M = [round(free, 1)] * len(C)
    if len(C) != len(M):
        raise DnnpipeError(f"{len(C)} device speeds but {len(M)} memory sizes: give one of each per device")
    if any(c <= 0 for c in C) or any(m < 0 for m in M):
        raise DnnpipeError(f"device speeds must be > 0 and memory sizes >= 0 (got C = {C}, M = {M})")
    result = {"N": len(C), "C": [round(float(c), 6) for c in C], "M": [float(m) for m in M]}
    if bandwidth:
        if len(bandwidth) != len(C) or any(b <= 0 for b in bandwidth):
            raise DnnpipeError(f"--bandwidth needs one positive Mbit/s value per device ({len(C)})")
        result["B"] = [float(b) for b in bandwidth]
    return result


def keras_config(model, profile: ModelProfile, devices: dict) -> dict:
    """The config of a profiled Keras model, with the cuts slicing can make (model_config.cuts): the converter
    fuses layers, so a plan must not end inside a fused group."""
    from ..partition.split import legal_cuts
    from ..slicing.plan import with_cuts

    return with_cuts(config_from(profile, devices), legal_cuts(*analyse(model)))
