"""device_registry.json: where each device is and how to reach it. Keys and agents only, no secrets.

Every value here ends up in an ssh argument vector or as an argument of a remote script, so each is checked
once, here, against what it may be (docs/security.md): nothing can start with `-` and be taken for an option,
and nothing holds a control character.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import ConfigError

LOCAL = "local"
SECRET_KEYS = ("password", "passwd", "pass", "passphrase")
HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}|[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*")  # a name, IPv4 or IPv6
USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
PYTHON = re.compile(r"[A-Za-z0-9_.~/+][A-Za-z0-9_.~/+-]*")  # a path or bare name, no shell metacharacters
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Device:
    device_id: int
    host: str  # "local" deploys by plain copy on this machine
    user: Optional[str] = None
    port: int = 22
    identity_file: Optional[str] = None
    remote_dir: str = "~/DNNPipe"
    runtime_port: int = 50000
    python: Optional[str] = None  # the interpreter that runs runtime_engine.py on the device
    known_hosts: Optional[str] = None  # this device's host keys, instead of ssh's own known_hosts files

    @property
    def is_local(self) -> bool:
        return self.host == LOCAL

    @property
    def interpreter(self) -> str:
        """The registry's `python`, else this very interpreter for `local` devices and python3 on a board."""
        return self.python or (sys.executable if self.is_local else "python3")

    @property
    def address(self) -> str:
        return self.host if self.user is None else f"{self.user}@{self.host}"


def load_registry(path: Path) -> dict[int, Device]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: device registry not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return parse_registry(data, str(path))


def parse_registry(data: Any, source: str) -> dict[int, Device]:
    entries = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: expected {{\"devices\": [...]}} with at least one device")
    devices: dict[int, Device] = {}
    for i, entry in enumerate(entries):
        where = f"{source}: devices[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be an object")
        secrets = [k for k in entry if k.lower() in SECRET_KEYS]
        if secrets:
            raise ConfigError(f"{where} has a '{secrets[0]}': passwords are refused; use an SSH key "
                              f"(identity_file) or an ssh-agent, so no secret lives in a JSON file")
        device = _device(entry, where)
        if device.device_id in devices:
            raise ConfigError(f"{where}: device_id {device.device_id} appears twice")
        devices[device.device_id] = device
    return devices


def _device(entry: dict[str, Any], where: str) -> Device:
    known = {"device_id", "host", "user", "username", "port", "identity_file", "remote_dir", "runtime_port",
             "python", "known_hosts", "name", "comment"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    if "user" in entry and "username" in entry and entry["user"] != entry["username"]:
        raise ConfigError(f"{where}: 'user' and 'username' disagree")
    device_id = entry.get("device_id")
    if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 1:
        raise ConfigError(f"{where}: 'device_id' must be a positive integer, got {device_id!r}")
    host = entry.get("host")
    if not isinstance(host, str) or not (host == LOCAL or HOST.fullmatch(host)):
        raise ConfigError(f"{where}: 'host' must be a host name, an IP address or \"local\" (letters, digits, "
                          f"'.', '-', '_', ':' and not starting with '-'), got {host!r}")
    for key in ("port", "runtime_port"):
        value = entry.get(key, 22 if key == "port" else 50000)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise ConfigError(f"{where}: '{key}' must be a port number 1-65535, got {value!r}")
    for key in ("user", "username", "identity_file", "remote_dir", "python", "known_hosts"):
        if key in entry and (not isinstance(entry[key], str) or not entry[key]):
            raise ConfigError(f"{where}: '{key}' must be a non-empty string, got {entry[key]!r}")
    user = entry.get("user", entry.get("username"))
    if user is not None and not USER.fullmatch(user):
        raise ConfigError(f"{where}: 'user' must be a user name (letters, digits, '.', '-', '_', not starting with "
                          f"'-'), got {user!r}")
    for key in ("identity_file", "remote_dir", "known_hosts"):
        _check_path(entry.get(key), f"{where}: '{key}'")
    if '"' in entry.get("known_hosts", ""):  # ssh reads the option's value as a quoted list of files
        raise ConfigError(f"{where}: 'known_hosts' must not hold a '\"': {entry['known_hosts']!r}")
    python = entry.get("python")
    if python is not None and not PYTHON.fullmatch(python):
        raise ConfigError(f"{where}: 'python' must be an interpreter path or name without spaces or shell "
                          f"characters (letters, digits, '.', '_', '+', '-', '/', '~'), got {python!r}")
    return Device(device_id=device_id, host=host, user=user, port=entry.get("port", 22),
                  identity_file=entry.get("identity_file"), remote_dir=entry.get("remote_dir", "~/DNNPipe"),
                  runtime_port=entry.get("runtime_port", 50000), python=python, known_hosts=entry.get("known_hosts"))


def _check_path(path: Optional[str], what: str) -> None:
    """Spaces, quotes and non-ASCII letters are fine (they travel as arguments); control characters are not,
    nor a leading '-', nor a `~user` home the deployer would not expand."""
    if path is None:
        return
    if CONTROL.search(path):
        raise ConfigError(f"{what} holds a control character (newline, tab, ...): {path!r}")
    if path.startswith("-"):
        raise ConfigError(f"{what} must not start with '-': {path!r}")
    if path.startswith("~") and path != "~" and not path.startswith("~/"):
        raise ConfigError(f"{what}: only '~' and '~/...' (your home) are expanded, got {path!r}")


def devices_for(registry: dict[int, Device], device_ids: Sequence[int], source: str) -> list[Device]:
    missing = [d for d in device_ids if d not in registry]
    if missing:
        raise ConfigError(f"{source}: the plan uses device {missing[0]}, which the registry does not list "
                          f"(it has {', '.join(map(str, sorted(registry)))})")
    return [registry[d] for d in device_ids]
