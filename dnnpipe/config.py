"""Load and validate the paper's config format (device_config + model_config), Section 3.1."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .errors import ConfigError

ConfigSource = Union[str, os.PathLike, Mapping[str, Any], "Config"]


LINK_CPU_KEYS = ("send_ms_per_mb", "receive_ms_per_mb", "frame_ms")


@dataclass(frozen=True)
class LinkCpu:
    """Each device's own CPU for its links, in its own ms (measured on it: `profile --device-registry`). On a
    board of one core or less sending and receiving a cut take CPU from the same budget as the compute."""

    send_ms_per_mb: tuple[float, ...]  # per MB of cut sent to the next stage
    receive_ms_per_mb: tuple[float, ...]  # per MB of cut received from the previous stage
    frame_ms: tuple[float, ...]  # a stage's own CPU per frame beyond its inference and its cuts' bytes

    def to_dict(self) -> dict[str, list[float]]:
        return {key: list(getattr(self, key)) for key in LINK_CPU_KEYS}

    def device(self, d: int) -> tuple[float, float, float]:
        """Device d's (0-based) send ms per MB, receive ms per MB and frame ms."""
        return self.send_ms_per_mb[d], self.receive_ms_per_mb[d], self.frame_ms[d]


def link_cpu_ms(cost, received_bytes, sent_bytes):
    """A device's CPU for receiving and sending cuts of these sizes and its fixed CPU per frame, cost = (send ms
    per MB, receive ms per MB, frame ms). Scalars or NumPy arrays alike, always in this order of operations."""
    send, receive, frame = cost
    return (receive * received_bytes / 1e6 + send * sent_bytes / 1e6) + frame


def stage_link_cpu_ms(cost, A, j, k):
    """Stage (j, k]'s link CPU (link_cpu_ms), A the bytes of each cut (U + 1 values): it takes in cut j and passes
    on cut k. The first stage's cut 0 is the model's input (read from the data file, or sent by serve's front door)
    and the last stage's cut U its result (written, or sent back): taking in an input cost a stage about what
    receiving a cut of its size does (issue 27: EfficientNetV2B0's 0.6 MB input on a 0.19-core board took 0.53 ms
    of CPU a frame that a plan without it did not count), so every stage pays both ends alike. j and k may be NumPy
    index arrays (A then an array). The one place this rule lives: the planner (planner.Problem) and the fleet's
    prediction (testbed.pacing) both take stage times from here, stage_compute_ms and stage_cpu_ms, so they are the
    very same numbers."""
    return link_cpu_ms(cost, A[j], A[k])


def stage_cpu_ms(compute_ms, link_cpu_ms):
    """A stage's time with its link CPU: on a board of one core or less both come out of one CPU budget, so they
    add (the paper's model counts compute alone)."""
    return compute_ms + link_cpu_ms


def time_prefix(rows) -> np.ndarray:
    """P[d][k]: units 1..k's time in row d (one row per device), shape (rows, U + 1). Stage times are differences
    of these (stage_compute_ms), for the planner and the fleet's prediction alike."""
    rows = np.asarray(rows, dtype=float)
    return np.concatenate((np.zeros((rows.shape[0], 1)), np.cumsum(rows, axis=1)), axis=1)


def stage_compute_ms(prefix, speed, j, k):
    """Stage (j, k]'s compute on a device whose time_prefix row is `prefix` and speed `speed` (k may be a slice
    or an index array)."""
    return (prefix[k] - prefix[j]) / speed


def hop_ms(cut_bytes, mbps):
    """Moving a cut of this many bytes over a link of this many Mbit/s, ms."""
    return cut_bytes * 8e-3 / mbps


@dataclass(frozen=True)
class Cluster:
    """The devices: C[d] is device d's speed relative to device 1, M[d] its free memory in MB."""

    C: tuple[float, ...]
    M: tuple[float, ...]
    B: Optional[tuple[float, ...]] = None  # link bandwidth per device, Mbit/s (optional)
    B_link: Optional[tuple[tuple[float, ...], ...]] = None  # Mbit/s from device d (row) to e (column) (optional)
    link_cpu: Optional[LinkCpu] = None  # each device's CPU for its links (optional; needs B and A)

    @property
    def N(self) -> int:
        return len(self.C)

    def pair_mbps(self, d: int, e: int) -> float:
        """Mbit/s from device d to device e (0-based): B_link, or the slower of the two devices' links (needs B)."""
        assert self.B is not None
        return self.B_link[d][e] if self.B_link is not None else min(self.B[d], self.B[e])


@dataclass(frozen=True)
class Profile:
    """The model: E[u] is unit u's time on device 1 in ms, R[u] its runtime memory in MB."""

    E: tuple[float, ...]
    R: tuple[float, ...]
    E_device: Optional[tuple[tuple[float, ...], ...]] = None  # per-device unit times, N rows (optional)
    A: Optional[tuple[float, ...]] = None  # bytes crossing the cut after unit j, j = 0..U (optional)
    cuts: Optional[tuple[int, ...]] = None  # legal stage ends k (1 <= k < U), increasing; None: every boundary

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
        if self.cluster.B_link is not None:
            devices["B_link"] = [list(row) for row in self.cluster.B_link]
        if self.cluster.link_cpu is not None:
            devices["link_cpu"] = self.cluster.link_cpu.to_dict()
        if self.profile.E_device is not None:
            model["E_device"] = [list(row) for row in self.profile.E_device]
        if self.profile.A is not None:
            model["A"] = list(self.profile.A)
        if self.profile.cuts is not None:
            model["cuts"] = list(self.profile.cuts)
        return {"device_config": devices, "model_config": model}

    def unit_times(self) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
        """Each device's speed and its row of unit times: C and E on every device, or all 1 and E_device's rows.
        Stage times are stage_compute_ms over time_prefix of these rows."""
        if self.profile.E_device is not None:
            return (1.0,) * self.cluster.N, self.profile.E_device
        return self.cluster.C, (self.profile.E,) * self.cluster.N


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


KEYS = {"": ("device_config", "model_config"), "device_config": ("N", "C", "M", "B", "B_link", "link_cpu"),
        "model_config": ("U", "E", "R", "E_device", "A", "cuts")}


def parse_config(data: Any, source: str) -> Config:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: top level must be a JSON object with device_config and model_config")
    _known_keys(data, "", source)
    devices = _section(data, "device_config", source)
    model = _section(data, "model_config", source)
    cluster = parse_cluster(devices, source)
    n = cluster.N
    u = _count(model, "model_config.U", "U", source)
    e_device = None
    if "E_device" in model:
        e_device = _rows(model, "model_config.E_device", "E_device", n, u, "U", source)
    # With per-device times E may be left out: the paper's E is device 1's row.
    e = _numbers(model, "model_config.E", "E", u, "U", source) if "E" in model or e_device is None else e_device[0]
    r = _numbers(model, "model_config.R", "R", u, "U", source)
    a = _numbers(model, "model_config.A", "A", u + 1, "U + 1", source) if "A" in model else None
    cuts = _cuts(model["cuts"], u, source) if "cuts" in model else None
    if cluster.link_cpu is not None and a is None:
        raise ConfigError(f"{source}: 'device_config.link_cpu' needs 'model_config.A' (the bytes of each cut, "
                          f"which the link CPU is per MB of)")
    return Config(cluster, Profile(e, r, e_device, a, cuts), source)


def parse_cluster(devices: Mapping[str, Any], source: str, prefix: str = "device_config.") -> Cluster:
    """The device_config part alone (N, C, M, optional B and B_link), checked as in a whole config."""
    n = _count(devices, f"{prefix}N", "N", source)
    c = _numbers(devices, f"{prefix}C", "C", n, "N", source, positive=True)
    m = _numbers(devices, f"{prefix}M", "M", n, "N", source)
    b = _numbers(devices, f"{prefix}B", "B", n, "N", source, positive=True) if "B" in devices else None
    b_link = _link_matrix(devices, n, source, prefix) if "B_link" in devices else None
    if b_link is not None and b is None:
        raise ConfigError(f"{source}: '{prefix}B_link' needs '{prefix}B' (each device's link for the "
                          f"model's input and result)")
    link_cpu = _link_cpu(devices["link_cpu"], n, source, prefix) if "link_cpu" in devices else None
    if link_cpu is not None and b is None:
        raise ConfigError(f"{source}: '{prefix}link_cpu' needs '{prefix}B' (the links whose CPU it counts)")
    return Cluster(c, m, b, b_link, link_cpu)


def _link_cpu(section: Any, n: int, source: str, prefix: str) -> LinkCpu:
    """Three lists of N finite numbers >= 0."""
    field = f"{prefix}link_cpu"
    if not isinstance(section, Mapping):
        raise ConfigError(f"{source}: '{field}' must be an object with {', '.join(LINK_CPU_KEYS)}, got "
                          f"{type(section).__name__}")
    for key in section:
        if key not in LINK_CPU_KEYS:
            raise ConfigError(f"{source}: unknown key '{field}.{key}' (known: {', '.join(LINK_CPU_KEYS)})")
    send, receive, frame = (_numbers(section, f"{field}.{key}", key, n, "N", source) for key in LINK_CPU_KEYS)
    return LinkCpu(send, receive, frame)


def load_devices(path: Path) -> Cluster:
    """A cluster file, {"C": [...], "M": [...]} (N, B, B_link and link_cpu optional) or {"device_config": {...}},
    checked before anything is measured or planned with it."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: devices file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read devices file ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    prefix = ""
    if isinstance(data, Mapping) and "device_config" in data:
        data, prefix = data["device_config"], "device_config."
    if not isinstance(data, Mapping):
        raise ConfigError(f'{path}: expected a JSON object {{"C": [...], "M": [...]}} (or a device_config)')
    _known_keys(data, "device_config", str(path))
    if "N" not in data and isinstance(data.get("C"), Sequence) and not isinstance(data.get("C"), (str, bytes)):
        data = {**data, "N": len(data["C"])}
    return parse_cluster(data, str(path), prefix)


def _known_keys(section: Mapping[str, Any], name: str, source: str) -> None:
    """A misspelt optional key (B_lnk) would otherwise be ignored without a word."""
    for key in section:
        if key not in KEYS[name]:
            field = f"{name}.{key}" if name else str(key)
            raise ConfigError(f"{source}: unknown key '{field}' (known: {', '.join(KEYS[name])})")


def _rows(section: Mapping[str, Any], field: str, key: str, n: int, length: int, length_name: str,
          source: str) -> tuple[tuple[float, ...], ...]:
    """N rows (one per device) of `length` numbers each."""
    rows = section[key]
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)) or len(rows) != n:
        raise ConfigError(f"{source}: '{field}' must be a list of N = {n} lists of {length_name} = {length} "
                          f"numbers")
    return tuple(_numbers({"row": row}, f"{field}[{d}]", "row", length, length_name, source)
                 for d, row in enumerate(rows))


def _link_matrix(devices: Mapping[str, Any], n: int, source: str,
                 prefix: str = "device_config.") -> tuple[tuple[float, ...], ...]:
    """N x N Mbit/s, finite; > 0 between two devices, the diagonal (a device to itself) is never used."""
    rows = _rows(devices, f"{prefix}B_link", "B_link", n, n, "N", source)
    for d, row in enumerate(rows):
        for e, value in enumerate(row):
            if d != e and value <= 0:
                raise ConfigError(f"{source}: '{prefix}B_link[{d}][{e}]' must be > 0 (a link between two "
                                  f"devices), got {value!r}")
    return rows


def _cuts(values: Any, u: int, source: str) -> tuple[int, ...]:
    field = "model_config.cuts"
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        raise ConfigError(f"{source}: '{field}' must be a list of unit indices, got {type(values).__name__}")
    for i, k in enumerate(values):
        if isinstance(k, bool) or not isinstance(k, int):
            raise ConfigError(f"{source}: '{field}[{i}]' must be an integer unit index, got {k!r}")
        if not 1 <= k <= u - 1:
            raise ConfigError(f"{source}: '{field}[{i}]' = {k} is out of range: a stage may end after unit 1..U - 1 "
                              f"= {u - 1}")
        if i and k <= values[i - 1]:
            raise ConfigError(f"{source}: '{field}' must be strictly increasing, got {values[i - 1]} then {k}")
    return tuple(values)


def _section(data: Mapping[str, Any], key: str, source: str) -> Mapping[str, Any]:
    if key not in data:
        raise ConfigError(f"{source}: missing key '{key}'")
    section = data[key]
    if not isinstance(section, Mapping):
        raise ConfigError(f"{source}: '{key}' must be an object, got {type(section).__name__}")
    _known_keys(section, key, source)
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
