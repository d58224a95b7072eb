"""OUT: one HDF5 dataset per model output, one row per input in input order, and how many rows are stored.

Rows are stored in input order (the ledger stores a prefix), so one attribute, `stored`, says which rows
hold results; `serve --resume` continues from there. `complete` turns True only when every row is stored.
Results are written in batches; `stored` counts only rows on disk, so a crash loses at most a batch, which a
resumed run computes again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DnnpipeError
from ..manifest import TensorSpec
from ..runtime.dataio import to_real

FLUSH_SECONDS = 0.2  # how long a result may wait in memory before it is written
FLUSH_ROWS = 64  # results written to the file in one go (one HDF5 call per output, not one per row)


class ResultStore:
    def __init__(self, path: Path, specs: Sequence[TensorSpec], total: int, resume: bool):
        import h5py

        self.path, self.specs, self.total = path, list(specs), total
        try:
            if resume and path.is_file():
                self.file = h5py.File(path, "r+")
                self._check_resumable()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.file = h5py.File(path, "w")
                for spec in self.specs:
                    self.file.create_dataset(spec.name, shape=(total, *spec.shape[1:]),
                                             dtype="float32" if spec.quantization else spec.dtype,
                                             chunks=(1, *spec.shape[1:]))
                self.file.attrs.update({"num_inputs": total, "stored": 0, "complete": False})
        except OSError as e:
            raise DnnpipeError(f"{path}: cannot write results ({e})") from None
        self.stored = self._stored_after = int(self.file.attrs["stored"])
        self._pending: list[tuple[int, list[np.ndarray]]] = []
        self._flushed = time.monotonic()

    def _check_resumable(self) -> None:
        f = self.file
        held = int(f.attrs.get("num_inputs", -1))
        if held != self.total or "stored" not in f.attrs:
            f.close()
            raise DnnpipeError(f"{self.path}: cannot resume: it was made for {held} inputs, this run has "
                               f"{self.total} (resume with the same --num-inputs and model)")
        for spec in self.specs:
            if spec.name not in f or f[spec.name].shape != (self.total, *spec.shape[1:]):
                f.close()
                raise DnnpipeError(f"{self.path}: cannot resume: no dataset {spec.name!r} of "
                                   f"{self.total} x {spec.shape[1:]}")

    def write(self, index: int, tensors: Sequence[np.ndarray], stored: int) -> None:
        """Row `index` (a copy: the caller reuses its buffers); `stored` rows (a prefix) now hold results."""
        self._pending.append((index, [np.array(to_real(s, t)[0]) for s, t in zip(self.specs, tensors)]))
        self._stored_after = stored
        if len(self._pending) >= FLUSH_ROWS or time.monotonic() - self._flushed > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write what waits, in runs of consecutive rows, then record how many rows hold results."""
        pending, self._pending = self._pending, []
        run_start = 0
        for i in range(1, len(pending) + 1):
            if i == len(pending) or pending[i][0] != pending[i - 1][0] + 1:
                first, rows = pending[run_start][0], pending[run_start:i]
                for k, spec in enumerate(self.specs):
                    self.file[spec.name][first:first + len(rows)] = np.stack([row[k] for _, row in rows])
                run_start = i
        self.stored = self._stored_after
        self.file.attrs["stored"] = self.stored
        self.file.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        if self.file:
            self.flush()
            self.file.attrs["complete"] = self.stored >= self.total
            self.file.close()
