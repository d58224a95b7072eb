"""The pipeline key: a shared secret beside manifest.json that every stage proves it holds before data flows.

One random 32-byte key per partition output, readable by its owner only. Stages and the controller
authenticate each link with it (dnnpipe.runtime.transport); see docs/security.md for what it protects.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Optional

from .errors import ConfigError

KEY_FILE = "pipeline.key"
KEY_BYTES = 32


def create_key(folder: Path) -> Path:
    """Write a fresh key to folder/pipeline.key (mode 0600, never half-written) unless one is there."""
    path = folder / KEY_FILE
    if path.exists():
        read_key(path)  # an existing key must be a valid one
        return path
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{KEY_FILE}.{secrets.token_hex(4)}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def read_key(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: pipeline key not found (re-run the partitioner, pass --key-file, or "
                          f"--insecure to run without authentication)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the pipeline key ({e.strerror or e})") from None
    if len(data) != KEY_BYTES:
        raise ConfigError(f"{path}: a pipeline key is {KEY_BYTES} bytes, this file has {len(data)}")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path}: the pipeline key is readable by others (mode {stat.S_IMODE(mode):o}); "
                          f"run chmod 600 on it")
    return data


def stage_key(folder: Path, key_file: Optional[Path], insecure: bool) -> Optional[bytes]:
    """The key a stage uses: --key-file, else the one beside the manifest; None only with --insecure."""
    if insecure:
        return None
    return read_key(key_file if key_file is not None else folder / KEY_FILE)
