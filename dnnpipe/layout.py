"""The paper's folder layout: configurations/NAME/config.json beside its pipeline_plan.json."""

from __future__ import annotations

from pathlib import Path

CONFIG_FILE = "config.json"
PLAN_FILE = "pipeline_plan.json"


def config_paths(config: Path, model_name: str) -> tuple[Path, Path]:
    """The config file and where its plan goes: DIR/NAME/config.json, or a JSON file given directly."""
    if config.suffix == ".json" and not config.is_dir():
        return config, config.parent / PLAN_FILE
    folder = config / model_name
    return folder / CONFIG_FILE, folder / PLAN_FILE
