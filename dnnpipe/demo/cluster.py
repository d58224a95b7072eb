"""The cluster the demo plans for and emulates: the paper's testbed, or the user's --cluster file.

Its own module so both the paced demo (run.py) and the virtual fleet (fleet.py) read it without importing
each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import load_devices

PAPER_C = [1.0, 0.33, 0.21, 0.21]
PAPER_M = [8998.0, 1452.0, 562.0, 582.0]
PAPER_MODEL_MB = 88.57  # EfficientNetV2B0's total R in the paper's profile: the memories are for that size
LAN_MBPS = 1000.0  # each board on gigabit Ethernet: plans count the time to ship every cut


def cluster(cluster_file: Optional[Path], model_mb: float) -> dict:
    """The paper's testbed speeds, memories scaled to this model as they were to EfficientNetV2B0, and
    gigabit links (the testbed shapes each device's link to its B; the plan avoids cuts too big to ship)."""
    if cluster_file is not None:
        given = load_devices(cluster_file)
        return {"N": given.N, "C": list(given.C), "M": list(given.M),
                **({} if given.B is None else {"B": list(given.B)}),
                **({} if given.B_link is None else {"B_link": [list(row) for row in given.B_link]})}
    scale = model_mb / PAPER_MODEL_MB
    return {"N": 4, "C": PAPER_C, "M": [round(m * scale, 3) for m in PAPER_M], "B": [LAN_MBPS] * 4}
