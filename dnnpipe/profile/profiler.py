"""Measure a model's per-unit costs on this machine: E (ms) and R (MB), the paper's model_config.

Timing each layer as its own interpreter call would mostly measure call overhead (tens of us per
Python call, a layer often takes less). Instead every unit, the whole model and an empty probe
become signatures of ONE TFLite model (one conversion), and only the interpreter's invoke of each
signature is timed, with inputs already in place. E[u] is the median over repeats after warm-up,
minus the probe's invoke time; the sum of E is then checked against the whole model's time.

The converter fuses layers (Conv2D + BatchNormalization + ReLU become one operator), so a plan can only
cut where the converted whole model has tensors (the legal cuts), and a fused group never runs as its
separate layers. So the units between two legal cuts are also timed together, as one signature, and that
time is shared among them in proportion to their own times: a stage's E is then what its sliced sub-model
runs. When the converted whole model cannot be mapped onto the units, the partitioner converts each stage
on its own, every cut exists, and each unit's own time stands.

R[u] counts the unit's weights plus the activations it produces for one inference (batch 1), in MiB.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

from ..errors import DnnpipeError
from ..interpreter import load_interpreter
from ..manifest import TensorSpec
from ..partition.convert import endpoint, stage_model
from ..partition.graph import analyse
from ..partition.split import legal_cuts, wire_spec
from ..slicing.chain import random_inputs
from ..slicing.cuts import signature_keys
from ..slicing.plan import CutError, with_cuts
from ..native import native_stderr_captured
from ..tfenv import import_tensorflow
from .costs import MIB, ModelProfile, UnitCost, config_from, time_invoke, unit_times


def _convert_all(model, graph, keras_tensors, keys, groups: Sequence[tuple[int, int]]) -> bytes:
    """One TFLite flatbuffer with a signature per unit, one per group of units between legal cuts (i..k], one
    for the whole model and an empty probe."""
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
    for i, k in groups:
        inputs, outputs = graph.crossing(i), graph.crossing(k)
        archive.add_endpoint(f"units_{i + 1}_{k}", *endpoint(stage_model(keras_tensors, inputs, outputs), inputs,
                                                               outputs, keys))
        names.append(f"units_{i + 1}_{k}")
    with tempfile.TemporaryDirectory(prefix="dnnpipe-profile-") as folder, native_stderr_captured() as log:
        try:
            archive.write_out(folder, verbose=False)
            return tf.lite.TFLiteConverter.from_saved_model(folder, signature_keys=names).convert()
        except Exception as e:  # noqa: BLE001 - converter errors come in many types
            failure = e
    raise DnnpipeError(f"profiling conversion failed: {str(failure).splitlines()[0]} "
                       f"{' '.join(log[0].split())[-300:]}")


class Profiling(NamedTuple):
    """What the host times, and what per-device profiling ships to each device (`flatbuffer`)."""

    graph: Any
    keras_tensors: Any
    keys: Any
    flatbuffer: bytes
    cuts: list[int]  # the legal inner cuts
    groups: list[tuple[int, int]]  # the units between two legal cuts, fused by the converter: timed together


def profiling_model(model, progress: Optional[Callable[[str], None]] = None) -> Profiling:
    """One conversion with a signature per unit and per fused group (see Profiling)."""
    graph, keras_tensors = analyse(model)
    keys = signature_keys(t.name for t in graph.tensors)
    say = progress or (lambda _: None)
    say("finding the legal cuts (converting the whole model) ...")
    cuts = sliceable_cuts(graph, keras_tensors, say)
    bounds = [0, *cuts, graph.U]
    groups = [(i, k) for i, k in zip(bounds, bounds[1:]) if k - i > 1]
    say(f"converting {graph.U} units and {len(groups)} fused groups in one model ...")
    return Profiling(graph, keras_tensors, keys, _convert_all(model, graph, keras_tensors, keys, groups), cuts, groups)


def profile_keras_model(model, repeats: int = 30, warmup: int = 5, num_threads: Optional[int] = None,
                        progress: Optional[Callable[[str], None]] = None, converted: Optional[Profiling] = None
                        ) -> ModelProfile:
    graph, keras_tensors, keys, flatbuffer, cuts, groups = converted or profiling_model(model, progress)
    say = progress or (lambda _: None)
    interpreter = load_interpreter(flatbuffer, num_threads, every_signature_delegated=True)

    def timed(signature: str, specs: list[TensorSpec]) -> float:
        values = random_inputs(tuple(specs), 1)
        return time_invoke(interpreter.get_signature_runner(signature),
                           {s.key: values[s.name] for s in specs}, repeats, warmup)

    probe = time_invoke(interpreter.get_signature_runner("probe"), {"x": np.zeros(1, "float32")}, repeats, warmup)
    whole = timed("whole", [wire_spec(t, keys) for t in graph.crossing(0)])
    alone = [timed(f"unit_{u}", [wire_spec(t, keys) for t in graph.unit_inputs(u)]) for u in range(1, graph.U + 1)]
    say(f"timed {graph.U} units")
    times = unit_times(probe, alone, {(i, k): timed(f"units_{i + 1}_{k}", [wire_spec(t, keys) for t in
                                                                           graph.crossing(i)]) for i, k in groups})
    layers = {layer.name: layer for layer in model.layers}
    units = []
    for u, (name, ms) in enumerate(zip(graph.units, times), 1):
        weights = sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in layers[name].weights)
        produced = sum(t.nbytes for t in graph.tensors if t.producer == u)
        units.append(UnitCost(name, ms, weights / MIB, produced / MIB))
    return ModelProfile(tuple(units), whole, probe, tuple(graph.cut_bytes(j) for j in range(graph.U + 1)),
                        tuple(cuts))


def sliceable_cuts(graph, keras_tensors, say: Callable[[str], None]) -> list[int]:
    """The inner cuts the partitioner can make: the converted whole model's legal cuts, or every cut when the
    whole model cannot be mapped (the partitioner then converts each stage on its own)."""
    try:
        return legal_cuts(graph, keras_tensors)
    except CutError as e:
        say(f"cannot slice the whole model ({e}); every cut kept: the partitioner will convert each stage")
        return list(range(1, graph.U))


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


def keras_config(model, profile: ModelProfile, devices: dict, echo: Callable[[str], None] = print) -> dict:
    """The config of a profiled Keras model, with the cuts the partitioner can make (model_config.cuts, left out
    when every cut exists): the converter fuses layers, so a plan must not end inside a fused group. The cuts
    are the profile's (profile_keras_model finds them), else found here."""
    cuts = profile.cuts if profile.cuts is not None else sliceable_cuts(*analyse(model), echo)
    return with_cuts(config_from(profile, devices), cuts)
