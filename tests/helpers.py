"""Running the project's scripts as real processes, the way users do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
# Whether a child's scheduling policy shows what runtime.priority chose: Linux, and the tests under the default
# policy (under `chrt -b` every child would be batch work whatever the code did).
POLICY_VISIBLE = sys.platform.startswith("linux") and os.sched_getscheduler(0) == os.SCHED_OTHER


def run_script(script: str, *args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run a top-level script or `-m dnnpipe` with this interpreter; output captured as text."""
    command = [sys.executable, *(["-m", "dnnpipe"] if script == "dnnpipe" else [str(ROOT / script)]), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=kwargs.pop("cwd", ROOT),
                          env={**env, **kwargs.pop("env", {})}, **kwargs)


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -c code args` in a process of its own, from the repository; output captured as text."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: non-zero exit, one line on stderr naming what was wrong, no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def raw_header(magic: Optional[bytes] = None, version: int = 1, kind: int = 1, count: int = 2, sequence: int = 0,
               block: int = 0) -> bytes:
    """A frame header with any field set, valid or not (dnnpipe/protocol.py's HEADER)."""
    from dnnpipe.protocol import HEADER, MAGIC

    return HEADER.pack(MAGIC if magic is None else magic, version, kind, count, sequence, 0, block)
