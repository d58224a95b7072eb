"""The pipeline's ends: inputs read from HDF5 by the first stage, results written by the last."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from ..errors import DnnpipeError
from ..manifest import TensorSpec

# What every --data-path takes (the help texts say it with these words).
INPUTS_HELP = ("HDF5 inputs, one inference per row: dataset 'images' for a one-input model, else one dataset per "
               "model input named as the input (manifest.json's inputs[].name); int8 data as it is for an int8 model, "
               "real numbers are quantized")
RESULTS_HELP = "HDF5 results: one dataset per model output (named as in manifest.json's outputs), one row per input"


def input_datasets(path: Path, specs: Sequence[TensorSpec]):
    """Open the HDF5 file; 'images' feeds a one-input model, otherwise one dataset per input name."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except (OSError, FileNotFoundError) as e:
        raise DnnpipeError(f"{path}: cannot open input data ({e})") from None
    names = ["images"] if len(specs) == 1 and "images" in f else [spec.name for spec in specs]
    datasets: list = []
    for name, spec in zip(names, specs):
        if name not in f:
            have = ", ".join(f) or "nothing"
            f.close()
            raise DnnpipeError(f"{path}: no dataset {name!r} for input {spec.name!r} (have: {have})")
        data = f[name]
        if tuple(data.shape[1:]) != spec.shape[1:] or data.shape[0] == 0:
            f.close()
            raise DnnpipeError(f"{path}: dataset {name!r} holds rows of shape {tuple(data.shape[1:])} x "
                               f"{data.shape[0]}, input {spec.name!r} needs rows of shape {spec.shape[1:]}")
        try:
            check_wire_type(spec, data.dtype, f"{path}: dataset {name!r}")
        except DnnpipeError:
            f.close()
            raise
        if datasets and data.shape[0] != datasets[0].shape[0]:
            rows, first = datasets[0].shape[0], names[0]
            f.close()
            raise DnnpipeError(f"{path}: dataset {name!r} has {data.shape[0]} rows, dataset {first!r} has {rows}: "
                               f"one row per inference in each")
        datasets.append(data)
    return f, datasets


def check_wire_type(spec: TensorSpec, dtype: np.dtype, where: str) -> None:
    """Data the first stage can take for this input: an int8 input takes int8 data as it is (already quantized)
    or real numbers (quantized with the input's scale); any other integer type would be quantized twice or
    reinterpreted, so it is refused. A float input takes any real or integer numbers."""
    kind = np.dtype(dtype).kind
    if spec.quantization is not None:
        fits = np.dtype(dtype) == np.dtype(spec.dtype) or kind == "f"
        wanted = f"{spec.dtype} (already quantized) or real numbers (float)"
    else:
        fits = kind in "fiub"
        wanted = "numbers"
    if not fits:
        raise DnnpipeError(f"{where} holds {np.dtype(dtype)} data; input {spec.name!r} takes {wanted}")


def to_wire(spec: TensorSpec, data: np.ndarray, where: Optional[str] = None) -> np.ndarray:
    """A model input as the first stage takes it: data of the input's own integer type as it is, real numbers
    quantized when the pipeline's ends are int8 (values the int8 type cannot hold are refused, never clipped)."""
    where = where or f"the data for input {spec.name!r}"
    data = np.asarray(data)
    check_wire_type(spec, data.dtype, where)
    if spec.quantization is None or data.dtype == np.dtype(spec.dtype):
        return np.asarray(data, dtype=spec.dtype).reshape(spec.shape)
    return quantize(spec, data, where).reshape(spec.shape)


def quantize(spec: TensorSpec, data: np.ndarray, where: str) -> np.ndarray:
    """Real numbers as a quantized input's integers, any shape; a value its type cannot hold is refused (never
    clipped) in one line naming `where`. The service checks requests with it before they are queued."""
    assert spec.quantization is not None
    scale, zero_point = spec.quantization
    info = np.iinfo(spec.dtype)
    quantized = np.round(np.asarray(data).astype(np.float64) / scale + zero_point)
    inside = (quantized >= info.min) & (quantized <= info.max)  # NaN fails too
    if not np.all(inside):
        bad = np.asarray(data)[~inside].flat[0]
        low, high = (info.min - zero_point) * scale, (info.max - zero_point) * scale
        raise DnnpipeError(f"{where} holds the value {bad:g}, outside what input {spec.name!r} ({spec.dtype}, "
                           f"scale {scale:g}, zero point {zero_point}) can hold: {low:g} to {high:g}")
    return quantized.astype(spec.dtype)


def to_real(spec: TensorSpec, wire: np.ndarray) -> np.ndarray:
    """A model output as the user reads it: dequantized when the pipeline's ends are int8."""
    if spec.quantization is None:
        return wire
    scale, zero_point = spec.quantization
    return ((wire.astype(np.float32) - zero_point) * scale).astype(np.float32)


BLOCK_BYTES = 16 << 20  # input rows read from the file at once (one HDF5 call per block, not one per inference)
BLOCK_ROWS = 256  # results kept before they are written (at most BLOCK_BYTES of them)
FLUSH_SECONDS = 1.0  # and never kept longer than this: a process killed outright loses at most this much


def read_inputs(path: Path, specs: Sequence[TensorSpec], count: Optional[int]) -> Iterator[list[np.ndarray]]:
    """One list of batch-1 arrays per inference, cycling through the rows when count exceeds them.

    Rows are read and converted a block at a time: an HDF5 read per row cost the first stage ~0.5 ms of CPU
    per inference (issue 27), which a slow board pays several times over."""
    f, datasets = input_datasets(path, specs)
    with f:
        rows = datasets[0].shape[0]
        block = max(1, min(rows, BLOCK_BYTES // max(1, sum(_row_bytes(data, spec) for data, spec in
                                                           zip(datasets, specs)))))
        total = rows if count is None else count
        done = 0
        while done < total:
            start = done % rows
            n = min(block, rows - start, total - done)
            columns = [_wire_rows(path, data, spec, start, n) for data, spec in zip(datasets, specs)]
            for r in range(n):
                yield [column[r] for column in columns]
            done += n


def _row_bytes(data, spec: TensorSpec) -> int:
    """What one row costs while a block is read and converted: the file's own type, and quantizing works in
    float64 with a few temporaries of the block's size."""
    elements = spec.nbytes // max(1, np.dtype(spec.dtype).itemsize)
    working = 4 * 8 if spec.quantization is not None and data.dtype != np.dtype(spec.dtype) else 0
    return elements * max(data.dtype.itemsize, np.dtype(spec.dtype).itemsize, working)


def _wire_rows(path: Path, data, spec: TensorSpec, start: int, n: int) -> list[np.ndarray]:
    """Rows start..start+n-1 of one dataset as batch-1 wire arrays; a bad value is named by its row."""
    name = data.name.lstrip("/")
    block = np.asarray(data[start:start + n])
    try:
        check_wire_type(spec, block.dtype, f"{path}: dataset {name!r}")
        same = spec.quantization is None or block.dtype == np.dtype(spec.dtype)
        wire = np.asarray(block, dtype=spec.dtype) if same else quantize(spec, block, f"{path}: dataset {name!r}")
    except DnnpipeError:  # name the row, as reading a row at a time did
        for r in range(n):
            to_wire(spec, block[r], f"{path}: dataset {name!r} row {start + r}")
        raise
    wire = wire.reshape(n, *spec.shape)
    return list(wire)


class ResultWriter:
    """Writes each model output as one HDF5 dataset, one row per inference, rows in input order (as real
    numbers: an int8 pipeline's outputs are dequantized).

    Rows are kept and written a block at a time (one HDF5 call per run of consecutive rows, not one per inference):
    a write per row cost the last stage 0.076 ms of CPU a result on this host, 0.006 in blocks (issue 27). The
    frame whose write flushes a block carries the block's write in its timing. The file's `complete` attribute
    stays False until end-of-stream, so a file left by a failed or interrupted run says it is partial; a close
    after a failure writes the rows kept.
    """

    def __init__(self, path: Optional[Path], specs: Sequence[TensorSpec]):
        self.specs, self.file, self.rows = list(specs), None, 0
        self._kept: dict[int, list[np.ndarray]] = {}  # sequence -> its rows, not written yet
        self._flushed = time.monotonic()
        if path is None:
            return
        import h5py

        making = path.with_name(f".{path.name}.making")
        try:  # made whole under another name, then renamed: a stop at any moment never leaves a half-made file
            path.parent.mkdir(parents=True, exist_ok=True)
            with h5py.File(making, "w") as made:
                made.attrs["complete"] = False
                for spec in self.specs:
                    made.create_dataset(spec.name, shape=(0, *spec.shape[1:]),
                                        dtype="float32" if spec.quantization else spec.dtype,
                                        maxshape=(None, *spec.shape[1:]), chunks=(1, *spec.shape[1:]))
            os.replace(making, path)
            self.file = h5py.File(path, "r+")
        except OSError as e:
            making.unlink(missing_ok=True)
            raise DnnpipeError(f"{path}: cannot write results ({e})") from None
        self.datasets = [self.file[spec.name] for spec in self.specs]
        stored = sum(max(1, spec.nbytes // np.dtype(spec.dtype).itemsize * dataset.dtype.itemsize)
                     for spec, dataset in zip(self.specs, self.datasets))
        self._block = max(1, min(BLOCK_ROWS, BLOCK_BYTES // stored))

    def write(self, sequence: int, tensors: Sequence[np.ndarray]) -> None:
        if self.file is None:
            return
        # the stage's buffers are reused for the next frame: keep a copy (to_real makes one for an int8 output)
        self._kept[sequence] = [to_real(spec, tensor)[0] if spec.quantization else tensor[0].copy()
                                for tensor, spec in zip(tensors, self.specs)]
        self.rows = max(self.rows, sequence + 1)
        if len(self._kept) >= self._block or time.monotonic() - self._flushed >= FLUSH_SECONDS:
            self._flush()

    def _flush(self) -> None:
        """The rows kept, each run of consecutive sequences in one write per output."""
        for dataset in self.datasets:
            if dataset.shape[0] < self.rows:
                dataset.resize(max(self.rows, 2 * dataset.shape[0]), axis=0)
        for first, end in consecutive_runs(sorted(self._kept)):
            for k, dataset in enumerate(self.datasets):
                dataset[first:end] = np.stack([self._kept[sequence][k] for sequence in range(first, end)])
        self._kept.clear()
        self._flushed = time.monotonic()

    def close(self, complete: bool = False) -> None:
        if self.file is None:
            return
        try:
            self._flush()
            for dataset in self.datasets:
                dataset.resize(self.rows, axis=0)
            self.file.attrs["complete"] = complete
        finally:  # a failed write still closes the file (it then says it is partial)
            self.file.close()
            self.file = None


def consecutive_runs(sequences: Sequence[int]) -> list[tuple[int, int]]:
    """Increasing sequences as [first, end) runs of consecutive numbers: [0, 1, 2, 5, 6, 9] -> (0, 3), (5, 7),
    (9, 10) (pure)."""
    runs = []
    for _, group in itertools.groupby(enumerate(sequences), key=lambda pair: pair[1] - pair[0]):
        members = [sequence for _, sequence in group]
        runs.append((members[0], members[-1] + 1))
    return runs
