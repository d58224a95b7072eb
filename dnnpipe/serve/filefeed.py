"""The file mode's Feed: inputs from an HDF5 file (DATA), results to OUT through the ResultStore, in input order."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import DnnpipeError
from ..manifest import TensorSpec
from ..runtime.dataio import input_datasets
from .results import ResultStore

CACHE_BYTES = 256 << 20  # DATA up to this size is read once: a row through HDF5 costs more than sending it


class FileFeed:
    """DATA's rows, cycled up to `total` inputs; OUT written by the ResultStore (resumed from its `stored`)."""

    def __init__(self, data_path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], output_path: Path,
                 total: Optional[int], resume: bool):
        self._file, datasets = input_datasets(data_path, inputs)
        try:
            self.rows = datasets[0].shape[0]
            size = sum(d.size * d.dtype.itemsize for d in datasets)
            self.data = [d[:] for d in datasets] if size <= CACHE_BYTES else list(datasets)
            self.total = total or self.rows
            # deliver() gets real values: the store must not dequantize them again
            specs = [replace(s, dtype="float32", quantization=None) if s.quantization else s for s in outputs]
            self.store = ResultStore(output_path, specs, self.total, resume)
        except BaseException:
            self._file.close()
            raise
        self.first_missing = self.store.stored  # every row below is stored
        self._above: set[int] = set()
        self.abandoned: dict[int, str] = {}

    @property
    def stored(self) -> int:
        return self.store.stored

    def wait_input(self, index: int, timeout: float) -> Optional[list[np.ndarray]]:
        if index >= self.total:
            return None
        row = index % self.rows
        return [np.asarray(d[row]) for d in self.data]

    def exhausted(self, index: int) -> bool:
        return index >= self.total

    def deliver(self, index: int, outputs: list[np.ndarray]) -> None:
        if index < self.first_missing or index in self._above:
            raise DnnpipeError(f"result {index} delivered twice")
        self._above.add(index)
        while self.first_missing in self._above:
            self._above.remove(self.first_missing)
            self.first_missing += 1
        self.store.write(index, outputs, self.first_missing)

    def abandon(self, index: int, reason: str) -> None:
        self.abandoned.setdefault(index, reason)

    def close(self) -> None:
        try:
            self.store.close()
        finally:
            self._file.close()
