"""Where the demo keeps everything: one work directory in the layout the individual commands use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Work:
    """Where the demo keeps everything."""

    root: Path
    name: str

    def __post_init__(self) -> None:
        self.models = self.root / "original_models"
        self.configs = self.root / "configurations"
        self.parts = self.root / "partitioned_submodels"
        self.single = self.root / "single_device"
        self.devices = self.root / "devices"
        self.logs = self.root / "logs"
        self.dataset = self.root / "dataset.h5"
        self.results = self.root / "results.h5"
        self.registry = self.configs / "device_registry.json"
        self.config = self.configs / self.name / "config.json"
        self.plan = self.configs / self.name / "pipeline_plan.json"
        self.link_costs = self.configs / self.name / "link_costs.json"  # per-device link CPU (--compute cpu-quota)
        self.model = self.models / f"{self.name}.h5"
        self.report = self.root / "report.md"
        self.measured = self.root / "measured.json"
