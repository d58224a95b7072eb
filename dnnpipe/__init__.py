"""DNNPipe: optimal pipeline partitioning of DNNs over heterogeneous IoT devices, and its tools.

The planner is loaded on first use (`dnnpipe.plan`), so a board that only runs stages (`dnnpipe.runtime`)
never imports it.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ConfigError, DnnpipeError, NoPlanError

__all__ = ["ALGORITHMS", "Config", "ConfigError", "DnnpipeError", "NoPlanError", "Plan", "load_config", "plan"]
__version__ = "0.1.0"

_LAZY = {"ALGORITHMS": ".planner", "Plan": ".planner", "plan": ".planner", "Config": ".config",
         "load_config": ".config"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
