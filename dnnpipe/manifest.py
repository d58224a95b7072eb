"""manifest.json: what each stage's sub-model takes and returns, in wire order (docs/manifest.md).

Read by the runtime and the deployer, so it stays free of TensorFlow. Its values become file names on the
workstation and the devices and arguments of remote commands, so each is checked here, once, against what it
may be (docs/security.md): a stage file is a plain name in the manifest's folder, a sha256 is 64 hex digits.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import ConfigError, DnnpipeError
from .jsonio import write_json

MANIFEST_FILE = "manifest.json"
FORMAT = "dnnpipe-manifest"
VERSION = 1
FILE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
TFLITE_NAME = re.compile(r"[A-Za-z0-9_.-]+\.tflite")
SHA256 = re.compile(r"[0-9a-f]{64}")
KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]*")  # a TFLite signature key
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
QUANTIZE = ("none", "float16", "int8")


@dataclass(frozen=True)
class TensorSpec:
    """A tensor crossing a cut: `name` is its Keras name (layer[:index]), `key` its signature key."""

    name: str
    key: str
    shape: tuple[int, ...]
    dtype: str
    tensor: Optional[int] = None  # its index in the whole model.tflite when the stages were cut from it
    quantization: Optional[tuple[float, int]] = None  # (scale, zero point) of an int8 tensor: real = scale * (q - zp)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "shape": list(self.shape), "dtype": self.dtype,
                "bytes": self.nbytes, **({} if self.tensor is None else {"tensor": self.tensor}),
                **({} if self.quantization is None else
                   {"quantization": {"scale": self.quantization[0], "zero_point": self.quantization[1]}})}


@dataclass(frozen=True)
class WholeModel:
    """The whole model.tflite the stages were cut from, and the tensors crossing each of its legal cuts.

    `cuts[j]` lists the tensors crossing the cut after unit j, for j = 0 (the inputs), every legal cut, and U
    (the outputs): what `python -m dnnpipe slice` needs to cut a new plan without TensorFlow.
    """

    file: str
    sha256: str
    cuts: dict[int, tuple[TensorSpec, ...]]

    def boundaries(self, units: tuple[int, int]) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """The tensors into and out of units first..last; one error naming the cut the model does not have."""
        first, last = units
        missing = next((j for j in (first - 1, last) if j not in self.cuts), None)
        if missing is not None:
            raise DnnpipeError(f"units {first}-{last}: the model has no cut after unit {missing}")
        return self.cuts[first - 1], self.cuts[last]

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256,
                "legal_cuts": [{"after_unit": j, "tensors": [t.to_json() for t in tensors]}
                               for j, tensors in sorted(self.cuts.items())]}


@dataclass(frozen=True)
class StageSpec:
    stage: int  # 1-based position in the pipeline
    device: int  # 1-based device id from the plan
    units: tuple[int, int]  # first and last unit, 1-based, inclusive
    file: str  # sub-model file name, relative to the manifest
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "device": self.device, "units": list(self.units), "file": self.file,
                "sha256": self.sha256, "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs],
                "input_bytes": sum(t.nbytes for t in self.inputs),
                "output_bytes": sum(t.nbytes for t in self.outputs)}


@dataclass(frozen=True)
class Manifest:
    model_name: str
    units: int
    quantize: str
    stages: tuple[StageSpec, ...]
    extra: dict[str, Any] = field(default_factory=dict)
    whole_model: Optional[WholeModel] = None

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.stages[0].inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.stages[-1].outputs

    def stage(self, number: int) -> StageSpec:
        if not 1 <= number <= len(self.stages):
            raise ConfigError(f"stage {number} does not exist: the manifest has stages 1..{len(self.stages)}")
        return self.stages[number - 1]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "model_name": self.model_name, "units": self.units,
                "quantize": self.quantize, "stages": [s.to_json() for s in self.stages],
                "cuts": [{"after_unit": s.units[1], "tensors": [t.name for t in s.outputs],
                          "bytes": sum(t.nbytes for t in s.outputs)} for s in self.stages[:-1]],
                **({} if self.whole_model is None else {"whole_model": self.whole_model.to_json()}),
                **self.extra}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(manifest: Manifest, folder: Path) -> Path:
    return write_json(folder / MANIFEST_FILE, manifest.to_json())


def read_manifest(path: Path) -> Manifest:
    """Parse and check a manifest; a folder means folder/manifest.json."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: manifest not found (run model_partitioner.py first)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    try:
        return _parse(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None


class Fields:
    """Typed reads of one JSON object, each failure naming the field (`stages[1].sha256`)."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise ConfigError(f"{where or 'the manifest'} must be an object")
        self.data, self.where = data, where

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str) -> Any:
        if key not in self.data:
            raise ConfigError(f"{self.name(key)} is missing")
        return self.data[key]

    def integer(self, key: str, low: int = 1) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{self.name(key)} must be an integer >= {low}, got {value!r}")
        return value

    def text(self, key: str, pattern: re.Pattern[str], meaning: str, default: str | None = None) -> str:
        value = self.data.get(key, default) if default is not None else self.get(key)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise ConfigError(f"{self.name(key)} must be {meaning}, got {value!r}")
        return value

    def array(self, key: str) -> list[Any]:
        value = self.get(key)
        if not isinstance(value, list):
            raise ConfigError(f"{self.name(key)} must be a list, got {value!r}")
        return value


def _tensor(item: Any, where: str) -> TensorSpec:
    f = Fields(item, where)
    name = f.get("name")
    if not isinstance(name, str) or not name or len(name) > 256 or not name.isprintable():
        raise ConfigError(f"{f.name('name')} must be a tensor name (printable, 1-256 characters), got {name!r}")
    shape = f.array("shape")
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ConfigError(f"{f.name('shape')} must be a list of positive integers, got {shape!r}")
    dtype = f.get("dtype")
    if dtype not in DTYPES:
        raise ConfigError(f"{f.name('dtype')} must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tensor = item.get("tensor")
    if tensor is not None and (isinstance(tensor, bool) or not isinstance(tensor, int) or tensor < 0):
        raise ConfigError(f"{f.name('tensor')} must be a tensor index >= 0, got {tensor!r}")
    quantization = None
    if "quantization" in item:
        q = Fields(item["quantization"], f.name("quantization"))
        scale, zero_point = q.get("scale"), q.get("zero_point")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 \
                or isinstance(zero_point, bool) or not isinstance(zero_point, int):
            raise ConfigError(f"{f.name('quantization')} must have a scale > 0 and an integer zero_point, "
                              f"got {item['quantization']!r}")
        quantization = (float(scale), zero_point)
    return TensorSpec(name, f.text("key", KEY, "a signature key (a letter, then letters, digits, _)"), tuple(shape),
                      dtype, tensor, quantization)


def _stage(item: Any, where: str, number: int) -> StageSpec:
    f = Fields(item, where)
    if f.integer("stage") != number:
        raise ConfigError(f"{f.name('stage')} must be {number}: stages are numbered 1..K in order")
    units = f.array("units")
    if len(units) != 2 or any(isinstance(u, bool) or not isinstance(u, int) for u in units) \
            or not 1 <= units[0] <= units[1]:
        raise ConfigError(f"{f.name('units')} must be [first, last] with 1 <= first <= last, got {units!r}")
    return StageSpec(number, f.integer("device"), (units[0], units[1]),
                     f.text("file", FILE_NAME, "a plain file name in the manifest's folder (letters, digits, _ . -)"),
                     f.text("sha256", SHA256, "64 lowercase hex digits"),
                     tuple(_tensor(t, f"{where}.inputs[{i}]") for i, t in enumerate(f.array("inputs"))),
                     tuple(_tensor(t, f"{where}.outputs[{i}]") for i, t in enumerate(f.array("outputs"))))


def _parse(data: Any) -> Manifest:
    f = Fields(data, "")
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ConfigError(f"expected format {FORMAT!r} version {VERSION}, "
                          f"got {data.get('format')!r} version {data.get('version')!r}")
    model_name = f.text("model_name", FILE_NAME, "a plain folder name (letters, digits, _ . -)")
    if model_name in (".", ".."):
        raise ConfigError(f"model_name must be a plain folder name, got {model_name!r}")
    units = f.integer("units")
    quantize = f.get("quantize") if "quantize" in data else "none"
    if quantize not in QUANTIZE:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    stages = tuple(_stage(s, f"stages[{i}]", i + 1) for i, s in enumerate(f.array("stages")))
    if not stages:
        raise ConfigError("no stages")
    expected = 1
    for s in stages:
        if s.units[0] != expected:
            raise ConfigError(f"stages[{s.stage - 1}].units starts at {s.units[0]}, expected {expected}: the stages "
                              f"cover units 1..{units} in order without gaps")
        expected = s.units[1] + 1
    if expected != units + 1:
        raise ConfigError(f"the stages cover units 1..{expected - 1} but units is {units}")
    files = [s.file for s in stages]
    if len(set(files)) != len(files) or MANIFEST_FILE in files:
        raise ConfigError(f"stage files must be distinct and not {MANIFEST_FILE}, got {files}")
    for i, (s, nxt) in enumerate(zip(stages, stages[1:]), 1):
        if [t.name for t in s.outputs] != [t.name for t in nxt.inputs]:
            raise ConfigError(f"stage {i} outputs {[t.name for t in s.outputs]} but stage {i + 1} "
                              f"takes {[t.name for t in nxt.inputs]}")
    whole = _whole_model(data["whole_model"], units) if "whole_model" in data else None
    known = {"format", "version", "model_name", "units", "quantize", "stages", "cuts", "whole_model"}
    return Manifest(model_name, units, quantize, stages, {k: v for k, v in data.items() if k not in known}, whole)


def _whole_model(item: Any, units: int) -> WholeModel:
    f = Fields(item, "whole_model")
    cuts = {}
    for i, cut in enumerate(f.array("legal_cuts")):
        c = Fields(cut, f"whole_model.legal_cuts[{i}]")
        after = c.integer("after_unit", low=0)
        if after > units:
            raise ConfigError(f"{c.name('after_unit')} must be at most units = {units}, got {after}")
        cuts[after] = tuple(_tensor(t, f"{c.name('tensors')}[{k}]") for k, t in enumerate(c.array("tensors")))
    return WholeModel(f.text("file", TFLITE_NAME, "a .tflite file name beside the manifest"),
                      f.text("sha256", SHA256, "64 lowercase hex digits"), cuts)


