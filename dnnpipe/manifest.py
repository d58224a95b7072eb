"""manifest.json: what each stage's sub-model takes and returns, in wire order (docs/manifest.md).

Read by the runtime and the deployer, so it stays free of TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import ConfigError
from .jsonio import write_json

MANIFEST_FILE = "manifest.json"
FORMAT = "dnnpipe-manifest"
VERSION = 1


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
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None


def _parse(data: dict[str, Any]) -> Manifest:
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ValueError(f"expected format {FORMAT!r} version {VERSION}, "
                         f"got {data.get('format')!r} version {data.get('version')!r}")

    def tensors(items) -> tuple[TensorSpec, ...]:
        specs = tuple(TensorSpec(str(t["name"]), str(t["key"]), tuple(int(x) for x in t["shape"]),
                                 np.dtype(t["dtype"]).name, None if t.get("tensor") is None else int(t["tensor"]),
                                 None if "quantization" not in t else
                                 (float(t["quantization"]["scale"]), int(t["quantization"]["zero_point"])))
                      for t in items)
        return specs

    stages = tuple(StageSpec(int(s["stage"]), int(s["device"]), (int(s["units"][0]), int(s["units"][1])),
                             str(s["file"]), str(s["sha256"]), tensors(s["inputs"]), tensors(s["outputs"]))
                   for s in data["stages"])
    if not stages:
        raise ValueError("no stages")
    for i, (s, nxt) in enumerate(zip(stages, stages[1:]), 1):
        if [t.name for t in s.outputs] != [t.name for t in nxt.inputs]:
            raise ValueError(f"stage {i} outputs {[t.name for t in s.outputs]} but stage {i + 1} "
                             f"takes {[t.name for t in nxt.inputs]}")
    whole = None
    if "whole_model" in data:
        w = data["whole_model"]
        whole = WholeModel(str(w["file"]), str(w["sha256"]),
                           {int(c["after_unit"]): tensors(c["tensors"]) for c in w["legal_cuts"]})
    known = {"format", "version", "model_name", "units", "quantize", "stages", "cuts", "whole_model"}
    return Manifest(str(data["model_name"]), int(data["units"]), str(data.get("quantize", "none")), stages,
                    {k: v for k, v in data.items() if k not in known}, whole)


