"""Cutting the sub-models of a new plan: by slicing the stored whole model.tflite (milliseconds, no
TensorFlow) when the partitioner kept one, else by converting each stage from the Keras model (seconds)."""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..errors import DnnpipeError
from ..manifest import Manifest, read_manifest


@dataclass(frozen=True)
class Cut:
    manifest: Manifest
    seconds: float
    method: str  # "slice" or "convert"


class Recutter:
    """One per serve run: the Keras model (for the fallback) is loaded once, on the first conversion."""

    def __init__(self, folder: Path, keras_model: Optional[Path], echo: Callable[[str], None]):
        self.folder, self.keras_model_path, self.echo = folder, keras_model, echo
        self._model: Any = None

    def cut(self, stages: Sequence[Sequence[int]], source: str) -> Cut:
        started = time.perf_counter()
        slicer = _slicer()
        if slicer is not None and getattr(read_manifest(self.folder), "whole_model", None) is not None:
            try:
                manifest = slicer(self.folder, stages, source)
                return Cut(manifest, time.perf_counter() - started, "slice")
            except DnnpipeError as e:  # e.g. a stage ending inside a fused group: no tensor to cut at
                if self.keras_model_path is None:
                    raise
                self.echo(f"cannot slice ({e}); converting each stage instead")
        if self.keras_model_path is None:
            raise DnnpipeError(f"{self.folder}: no whole model.tflite to slice a new plan from, and no --keras-model "
                               f"to convert it from")
        from ..partition.partitioner import load_keras_model, partition_keras_model

        if self._model is None:
            self._model = load_keras_model(self.keras_model_path)
        manifest, _ = partition_keras_model(self._model, [list(s) for s in stages], self.folder,
                                            read_manifest(self.folder).model_name, source, verify_chain=False,
                                            echo=self.echo)
        return Cut(manifest, time.perf_counter() - started, "convert")


def _slicer() -> Optional[Callable[..., Manifest]]:
    """dnnpipe.slicing's re-slice and write, when that package is installed (it is being merged)."""
    try:
        slicing = importlib.import_module("dnnpipe.slicing.slicer")
    except ImportError:
        return None
    from ..manifest import write_manifest

    def reslice(folder: Path, stages: Sequence[Sequence[int]], source: str) -> Manifest:
        manifest = slicing.reslice(folder, stages, source)
        write_manifest(manifest, folder)
        return manifest

    return reslice

