"""DNNPipe: optimal pipeline partitioning of DNNs over heterogeneous IoT devices, and its tools."""

from .config import Config, load_config
from .errors import ConfigError, DnnpipeError, NoPlanError
from .planner import ALGORITHMS, Plan, plan

__all__ = ["ALGORITHMS", "Config", "ConfigError", "DnnpipeError", "NoPlanError", "Plan", "load_config", "plan"]
__version__ = "0.1.0"
