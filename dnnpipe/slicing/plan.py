"""Checking a plan against a model: its stages cover the units in order and end only at legal cuts."""

from __future__ import annotations

from bisect import bisect_left
from typing import Collection, Sequence

from ..errors import DnnpipeError


class CutError(DnnpipeError):
    """The model cannot be cut as asked; the message names the stage, unit, layer or tensor."""


def check_stages(U: int, stages: Sequence[Sequence[int]], source: str) -> None:
    """The plan's stages must cover units 1..U in order, each on its own device."""
    expected = 1
    for i, (start, end, _) in enumerate(stages):
        if start != expected or end < start:
            raise CutError(f"{source}: stage {i + 1} covers units {start}-{end}, expected it to start at "
                           f"unit {expected}")
        expected = end + 1
    if expected != U + 1:
        raise CutError(f"{source}: the plan covers units 1-{expected - 1} but the model has {U} units")
    devices = [d for _, _, d in stages]
    if len(set(devices)) != len(devices):
        raise CutError(f"{source}: a device runs two stages: {devices}")


def check_cuts(stages: Sequence[Sequence[int]], cuts: Collection[int], source: str) -> None:
    """Every stage but the last must end at a legal cut (model_config.cuts: a tensor exists there)."""
    legal = sorted(cuts)
    for i, (_, end, _) in enumerate(stages[:-1]):
        if end not in cuts:
            at = bisect_left(legal, end)
            near = [str(c) for c in legal[max(0, at - 1):at + 1]]
            raise CutError(f"{source}: stage {i + 1} ends after unit {end}, which is not a legal cut (the converter "
                           f"fused unit {end} with unit {end + 1}); nearest legal cuts: {', '.join(near) or 'none'}")


def inner_cuts(cuts: Collection[int], U: int) -> list[int]:
    """model_config.cuts: sorted k in 1..U-1 after which a stage may end."""
    return sorted(c for c in cuts if 1 <= c < U)


def with_cuts(config: dict, cuts: Collection[int]) -> dict:
    """The config (as read from JSON) with model_config.cuts set, or left out when every cut is legal."""
    U = int(config["model_config"]["U"])
    inner = inner_cuts(cuts, U)
    model = {k: v for k, v in config["model_config"].items() if k != "cuts"}
    if len(inner) < U - 1:
        model["cuts"] = inner
    return {**config, "model_config": model}
