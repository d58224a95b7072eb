"""Load and validate the paper's config format (device_config + model_config), Section 3.1."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .errors import ConfigError

ConfigSource = Union[str, os.PathLike, Mapping[str, Any], "Config"]


@dataclass(frozen=True)
class Cluster:
    """The devices: C[d] is device d's speed relative to device 1, M[d] its free memory in MB."""

    C: tuple[float, ...]
    M: tuple[float, ...]
    B: Optional[tuple[float, ...]] = None  # link bandwidth per device, Mbit/s (optional)

    @property
    def N(self) -> int:
        return len(self.C)


@dataclass(frozen=True)
class Profile:
    """The model: E[u] is unit u's time on device 1 in ms, R[u] its runtime memory in MB."""

    E: tuple[float, ...]
    R: tuple[float, ...]
    E_device: Optional[tuple[tuple[float, ...], ...]] = None  # per-device unit times, N rows (optional)
    A: Optional[tuple[float, ...]] = None  # bytes crossing the cut after unit j, j = 0..U (optional)

    @property
    def U(self) -> int:
        return len(self.E)


@dataclass(frozen=True)
class Config:
    cluster: Cluster
    profile: Profile
    source: str = "<config>"

    def to_dict(self) -> dict[str, Any]:
        devices: dict[str, Any] = {"N": self.cluster.N, "C": list(self.cluster.C), "M": list(self.cluster.M)}
        model: dict[str, Any] = {"U": self.profile.U, "E": list(self.profile.E), "R": list(self.profile.R)}
        if self.cluster.B is not None:
            devices["B"] = list(self.cluster.B)
        if self.profile.E_device is not None:
            model["E_device"] = [list(row) for row in self.profile.E_device]
        if self.profile.A is not None:
            model["A"] = list(self.profile.A)
        return {"device_config": devices, "model_config": model}


def load_config(source: ConfigSource) -> Config:
    """Accept a path to config.json, an already parsed dict, or a Config; always validate."""
    if isinstance(source, Config):
        return source
    if isinstance(source, Mapping):
        return parse_config(source, "<config>")
    path = Path(source)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    return parse_config(data, str(path))


def parse_config(data: Any, source: str) -> Config:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: top level must be a JSON object with device_config and model_config")
    devices = _section(data, "device_config", source)
    model = _section(data, "model_config", source)
    n = _count(devices, "device_config.N", "N", source)
    c = _numbers(devices, "device_config.C", "C", n, "N", source, positive=True)
    m = _numbers(devices, "device_config.M", "M", n, "N", source)
    b = _numbers(devices, "device_config.B", "B", n, "N", source, positive=True) if "B" in devices else None
    u = _count(model, "model_config.U", "U", source)
    e_device = None
    if "E_device" in model:
        rows = model["E_device"]
        if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)) or len(rows) != n:
            raise ConfigError(f"{source}: 'model_config.E_device' must be a list of N = {n} lists of U = {u} numbers")
        e_device = tuple(_numbers({"row": row}, f"model_config.E_device[{d}]", "row", u, "U", source)
                         for d, row in enumerate(rows))
    # With per-device times E may be left out: the paper's E is device 1's row.
    e = _numbers(model, "model_config.E", "E", u, "U", source) if "E" in model or e_device is None else e_device[0]
    r = _numbers(model, "model_config.R", "R", u, "U", source)
    a = _numbers(model, "model_config.A", "A", u + 1, "U + 1", source) if "A" in model else None
    return Config(Cluster(c, m, b), Profile(e, r, e_device, a), source)


def _section(data: Mapping[str, Any], key: str, source: str) -> Mapping[str, Any]:
    if key not in data:
        raise ConfigError(f"{source}: missing key '{key}'")
    section = data[key]
    if not isinstance(section, Mapping):
        raise ConfigError(f"{source}: '{key}' must be an object, got {type(section).__name__}")
    return section


def _count(section: Mapping[str, Any], field: str, key: str, source: str) -> int:
    if key not in section:
        raise ConfigError(f"{source}: missing key '{field}'")
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source}: '{field}' must be a positive integer, got {value!r}")
    return value


def _numbers(
    section: Mapping[str, Any], field: str, key: str, length: int, length_name: str, source: str,
    positive: bool = False,
) -> tuple[float, ...]:
    if key not in section:
        raise ConfigError(f"{source}: missing key '{field}'")
    values = section[key]
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        raise ConfigError(f"{source}: '{field}' must be a list of numbers, got {type(values).__name__}")
    if len(values) != length:
        expected = length_name if " " in length_name else f"{length_name} = {length}"
        raise ConfigError(f"{source}: '{field}' has {len(values)} values but {expected}"
                          + (f" = {length}" if " " in length_name else ""))
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{source}: '{field}[{i}]' must be a finite number, got {v!r}")
        if positive and v <= 0:
            raise ConfigError(f"{source}: '{field}[{i}]' must be > 0, got {v!r}")
        if v < 0:
            raise ConfigError(f"{source}: '{field}[{i}]' must be >= 0, got {v!r}")
    return tuple(float(v) for v in values)
