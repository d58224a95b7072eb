"""JSON as the project writes it: plans and manifests read as tables, and files appear whole or not at all."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any


def dump_json(data: Any) -> str:
    """Indented JSON with lists of numbers kept on one line, so plans and manifests read as tables."""
    text = json.dumps(data, indent=2)
    return re.sub(r"\[\s+([^\[\]{}\"]*?)\s+\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside path and rename it into place: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> Path:
    write_atomic(path, dump_json(data))
    return path


def size_text(nbytes: int) -> str:
    """A byte count as a person reads it: 40 B, 200.0 KiB, 1.4 MiB."""
    if nbytes < 1024:
        return f"{nbytes} B"
    if nbytes < 1024 ** 2:
        return f"{nbytes / 1024:.1f} KiB"
    return f"{nbytes / 1024 ** 2:.1f} MiB"
