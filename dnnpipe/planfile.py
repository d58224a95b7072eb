"""pipeline_plan.json: write, read back, and show a plan as a table a person can check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .jsonio import write_json
from .planner import Plan


def write_plan(plan: Plan, path: Path) -> None:
    write_json(path, plan.to_json())


def read_stages(path: Path) -> list[list[int]]:
    """The stages of a plan file, checked for shape; the reference format's only required key."""
    try:
        data: Any = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: plan file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    stages = data.get("pipeline_plan") if isinstance(data, dict) else None
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{path}: 'pipeline_plan' must be a non-empty list of [start, end, device]")
    for i, stage in enumerate(stages):
        if (not isinstance(stage, list) or len(stage) != 3
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in stage)):
            raise ConfigError(f"{path}: 'pipeline_plan[{i}]' must be [start_unit, end_unit, device_id] "
                              f"with positive integers, got {stage!r}")
    return stages


def format_plan(plan: Plan) -> str:
    """The stages as a table; with each device's link CPU (device_config.link_cpu) a column says how much of each
    stage's time is its links' CPU."""
    link_cpu = plan.extra.get("link_cpu_ms")
    cpu_header = f"  {'link CPU ms':>11}" if link_cpu else ""
    rows = [f"{'stage':>5}  {'units':>11}  {'device':>6}  {'time ms':>9}{cpu_header}  {'memory MB / capacity':>22}"]
    for i, ((start, end, device), time_ms, mem, cap) in enumerate(
            zip(plan.stages, plan.stage_times_ms, plan.stage_memory_mb, plan.stage_capacity_mb), 1):
        marker = "  <- bottleneck" if time_ms == plan.bottleneck else ""
        cpu = f"  {link_cpu[i - 1]:>11.4f}" if link_cpu else ""
        rows.append(f"{i:>5}  {f'{start}-{end}':>11}  {device:>6}  {time_ms:>9.4f}{cpu}  "
                    f"{f'{mem:.1f} / {cap:.1f}':>22}{marker}")
    gap = (plan.bottleneck / plan.ideal_ms - 1) * 100 if plan.ideal_ms > 0 else 0.0
    rows.append(f"bottleneck {plan.bottleneck:.5f} ms ({plan.throughput:.1f} inferences/s); "
                f"ideal sum(E)/sum(C) {plan.ideal_ms:.5f} ms (+{gap:.2f}%); "
                f"{plan.algorithm} planned in {plan.planning_time_ms:.1f} ms")
    return "\n".join(rows)
