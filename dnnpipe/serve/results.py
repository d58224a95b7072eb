"""OUT: one HDF5 dataset per model output, one row per input in input order, and how many rows are stored.

A row is counted only when it is durable and checkable, so `stored` and `complete` never overstate, whatever
stops serve (a full disk, an I/O error, Ctrl-C, SIGKILL, a power cut):

1. every dataset is contiguous and allocated when OUT is made (under a temporary name, renamed in once whole),
   and a dataset `dnnpipe_row_crc32` holds a CRC-32 of each row (its index, then its bytes in every output,
   in the order of the model's outputs);
2. rows are written in batches straight to their place in the file (`os.pwrite` at the dataset's offset,
   after `posix_fallocate` reserved the bytes, so a full disk fails before a byte is written), with their
   checksums, then fsync'd;
3. only then does the attribute `stored` (every row below it is intact) move on, by an in-place HDF5 update
   and another fsync; `complete` turns True only when every row is stored.

HDF5 itself never writes data and never grows the file after it is made, so a failed write cannot leave it
half-updated, and every h5py call runs on the store's own thread (one batch is written there while the next
gathers, so the caller waits for the disk only when the disk is slower than the results). The first failure
ends the store with one line (StorageError): no retry, nothing counted that is not on disk. `--resume` opens
OUT and counts the longest prefix of rows whose checksums verify (they may reach past `stored`: a crash between
steps 2 and 3), or refuses with one line when OUT is not a results file of this run.
"""

from __future__ import annotations

import os
import re
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import numpy as np

from ..errors import DnnpipeError, StorageError
from ..manifest import TensorSpec
from ..runtime.dataio import to_real

FLUSH_SECONDS = 0.2  # how long a result may wait in memory before it is written
FLUSH_ROWS = 64  # results written to the file in one go (one write per output, one fsync), at least
BACKLOG_ROWS = 16 * FLUSH_ROWS  # results waiting while a batch is written before the caller waits for the disk
CHECKSUMS = "dnnpipe_row_crc32"  # the dataset of per-row checksums
VERIFY_BYTES = 16 << 20  # rows read at a time when a resume verifies OUT
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
LIBVER = ("v108", "v108")  # checksummed metadata, and no open-for-write flag that a crash would leave set
_T = TypeVar("_T")


@dataclass(frozen=True)
class Column:
    """One dataset of OUT: where its rows are in the file and how a row is laid out."""

    name: str
    dtype: np.dtype
    row_shape: tuple[int, ...]
    offset: int  # of row 0 in the file (0 when the dataset is empty)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize


def row_checksum(index: int, rows: Sequence[np.ndarray]) -> int:
    """The CRC-32 of row `index`: its index (8 bytes, little-endian), then each output's row as stored."""
    crc = zlib.crc32(index.to_bytes(8, "little"))
    for row in rows:
        crc = zlib.crc32(np.ascontiguousarray(row).tobytes(), crc)
    return crc


def file_dtype(spec: TensorSpec) -> np.dtype:
    """How an output is stored: real numbers for int8 ends, else its own type; little-endian always."""
    return np.dtype("float32" if spec.quantization else spec.dtype).newbyteorder("<")


class ResultStore:
    """OUT, written from any thread (the calls run on the store's own), durable before it is counted."""

    def __init__(self, path: Path, specs: Sequence[TensorSpec], total: int, resume: bool,
                 echo: Optional[Callable[[str], None]] = None):
        self.path, self.specs, self.total = path, list(specs), total
        self.echo = echo or (lambda _: None)
        names = [s.name for s in self.specs]
        if CHECKSUMS in names or len(set(names)) != len(names):
            raise DnnpipeError(f"{path}: the model's outputs {names} cannot be stored as one dataset each "
                               f"(a repeated name, or {CHECKSUMS!r})")
        self.stored = 0  # rows 0..stored-1 are durable and intact; never more
        self.error: Optional[StorageError] = None  # the failure that ended the store
        self._file: Any = None  # the h5py.File, touched only on the store's thread
        self._fd = -1
        self._columns: list[Column] = []  # the checksums, then the outputs
        self._pending: list[tuple[int, list[np.ndarray]]] = []
        self._durable_above: set[int] = set()  # durable rows above `stored` (none while rows come in order)
        self._lock = threading.Lock()  # guards _pending
        self._submitting = threading.RLock()  # one batch handed over at a time
        self._inflight: Optional[Future[int]] = None  # the batch being written
        self._flushed = time.monotonic()
        self._closed = False
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="results")
        try:
            self.stored = self._run(self._open, resume and path.is_file())
        except BaseException:
            self._thread.shutdown()
            raise

    # --- what the controller calls -----------------------------------------------------------

    def write(self, index: int, tensors: Sequence[np.ndarray], stored: Optional[int] = None) -> None:
        """Row `index` (a copy: the caller reuses its buffers). `stored` (the caller's count) is not trusted:
        the store counts what it has made durable itself. Raises StorageError once a write has failed."""
        self.check()
        if not 0 <= index < self.total:
            raise ValueError(f"row {index} outside OUT's {self.total} rows")
        row = [np.array(to_real(s, t)[0], dtype=c.dtype) for s, t, c in zip(self.specs, tensors, self._columns[1:])]
        if [r.shape for r in row] != [c.row_shape for c in self._columns[1:]]:
            raise ValueError(f"row {index}: shapes {[r.shape for r in row]}, OUT holds "
                             f"{[c.row_shape for c in self._columns[1:]]}")
        with self._lock:
            self._pending.append((index, row))
            waiting = len(self._pending)
        if waiting >= FLUSH_ROWS or time.monotonic() - self._flushed > FLUSH_SECONDS:
            self._submit(wait=waiting >= BACKLOG_ROWS)

    def flush(self) -> None:
        """Make every row written so far durable, then count it."""
        self.check()
        with self._submitting:
            self._submit()
            inflight, self._inflight = self._inflight, None
            if inflight is not None:
                inflight.result()

    def _submit(self, wait: bool = True) -> None:
        """Hand the waiting rows to the store's thread once the batch before them is written (one batch in
        flight: while it is written the next one gathers, as large as the disk's pace asks). The caller waits
        for the disk only with `wait`: a flush, or a backlog."""
        with self._submitting:
            inflight = self._inflight
            if inflight is not None and not inflight.done() and not wait:
                return
            self._inflight = None
            if inflight is not None:
                inflight.result()  # raises that batch's StorageError
            with self._lock:
                pending, self._pending = self._pending, []
            self._flushed = time.monotonic()
            if pending:
                self._inflight = self._thread.submit(self._store, pending)

    def check(self) -> None:
        """Raise the failure that ended the store, if one did (a storage fault is never retried)."""
        if self.error is not None:
            raise self.error
        if self._closed:
            raise DnnpipeError(f"{self.path}: the result store is closed")

    def close(self) -> None:
        """Store what waits, mark `complete` when every row is stored, and close. Raises the failure that
        ended the store, if one did, so no caller takes a run whose results did not all reach OUT for done."""
        if self._closed:
            return
        try:
            if self.error is None:
                self.flush()
                self._run(self._finish)
        finally:
            self._closed = True
            self._run(self._release)
            self._thread.shutdown()
        if self.error is not None:
            raise self.error

    # --- the store's thread ------------------------------------------------------------------

    def _run(self, body: Callable[..., _T], *args: Any) -> _T:
        return self._thread.submit(body, *args).result()

    def _open(self, resume: bool) -> int:
        return self._reopen() if resume else self._create()

    def _create(self) -> int:
        """OUT made under a temporary name and renamed into place once whole: a crash while it is made leaves
        no OUT (a resume then starts anew), never a half-made one."""
        import h5py

        path = self.path
        making = path.with_name(f".{path.name}.making")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # all metadata in one block ahead of the data, so the data region is one run of rows per dataset
            meta = -(-(2048 + 1024 * (len(self.specs) + 1)) // 4096) * 4096
            self._file = f = h5py.File(making, "w", libver=LIBVER, meta_block_size=meta)
            f.attrs.update({"num_inputs": np.int64(self.total), "stored": np.int64(0), "complete": False})
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # its place is fixed now: rows go straight there
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # the file stays sparse until rows are written
            for name, dtype, row_shape in self._wanted():
                f.create_dataset(name, shape=(self.total, *row_shape), dtype=dtype, dcpl=dcpl)
            f.flush()
            self._columns = self._layout()
            self._fd = os.open(making, os.O_RDWR)
            os.fsync(self._fd)
            os.replace(making, path)
            _sync_folder(path.parent)
        except Exception as e:  # noqa: BLE001 - h5py raises OSError, RuntimeError, ValueError: all are storage faults
            self._release()
            _remove(making)
            raise StorageError(f"{path}: cannot make the results file: {_cause(e)}") from None
        return 0

    def _reopen(self) -> int:
        """OUT as a crash left it: refuse it, or count the longest prefix of rows that verify."""
        import h5py

        path, refuse = self.path, lambda why: StorageError(f"{path}: cannot resume: {why} "
                                                           f"(run without --resume to start it again)")
        try:
            self._file, padded_from = _open_padded(path)
        except OSError as e:
            raise refuse(f"not a readable results file ({_cause(e)})") from None
        try:
            f = self._file
            held = int(f.attrs.get("num_inputs", -1))
            if held != self.total or "stored" not in f.attrs:
                raise StorageError(f"{path}: cannot resume: it was made for {held} inputs, this run has "
                                   f"{self.total} (resume with the same --num-inputs and model)")
            for name, dtype, row_shape in self._wanted():
                d = f.get(name)
                if not isinstance(d, h5py.Dataset) or d.shape != (self.total, *row_shape) or d.dtype != dtype:
                    raise StorageError(f"{path}: cannot resume: no dataset {name!r} of {self.total} x "
                                       f"{row_shape} {dtype}" + (" (a file of an older serve: it has no "
                                                                 "row checksums)" if name == CHECKSUMS else ""))
                if d.chunks is not None or (d.id.get_offset() is None and d.size):
                    raise refuse(f"dataset {name!r} is not stored in one piece")
            self._columns = self._layout()
            intact = self._verify()
            counted = int(f.attrs["stored"])
            if padded_from is not None:
                self.echo(f"serve: {path} was cut short at byte {padded_from}: zero-filled to its recorded size")
            if intact < counted:
                self.echo(f"serve: {path}: {counted} rows were counted, {intact} are intact (checksums): "
                          f"rows from {intact} on are computed again")
            f.attrs.modify("stored", np.int64(intact))
            f.attrs.modify("complete", intact >= self.total)
            f.flush()
            self._fd = os.open(path, os.O_RDWR)
            os.fsync(self._fd)
            return intact
        except Exception as e:  # noqa: BLE001 - whatever h5py or the disk raised: one line, OUT left as it was
            self._release()
            if padded_from is not None:
                os.truncate(path, padded_from)
            if isinstance(e, DnnpipeError):
                raise
            raise refuse(_cause(e)) from None

    def _wanted(self) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        """The checksums, then the outputs (made in this order: a cut file loses the last output's rows)."""
        return [(CHECKSUMS, np.dtype("<u4"), ()), *((s.name, file_dtype(s), tuple(s.shape[1:])) for s in self.specs)]

    def _layout(self) -> list[Column]:
        f = self._file
        return [Column(name, dtype, shape, f[name].id.get_offset() or 0) for name, dtype, shape in self._wanted()]

    def _verify(self) -> int:
        """The number of leading rows whose checksums match (read through HDF5, as a user reads them)."""
        f, outputs = self._file, self._columns[1:]
        step = max(1, VERIFY_BYTES // max(1, sum(c.row_bytes for c in self._columns)))
        for first in range(0, self.total, step):
            last = min(self.total, first + step)
            sums = f[CHECKSUMS][first:last]
            blocks = [f[c.name][first:last] for c in outputs]
            for i in range(last - first):
                if row_checksum(first + i, [b[i] for b in blocks]) != int(sums[i]):
                    return first + i
        return self.total

    def _store(self, pending: list[tuple[int, list[np.ndarray]]]) -> int:
        """Rows and their checksums to disk, fsync, then the count: one attribute, in place, fsync again."""
        try:
            pending.sort(key=lambda p: p[0])
            start = 0
            for end in range(1, len(pending) + 1):
                if end == len(pending) or pending[end][0] != pending[end - 1][0] + 1:
                    self._write_run(pending[start][0], [row for _, row in pending[start:end]])
                    start = end
            os.fdatasync(self._fd)
            self._durable_above.update(index for index, _ in pending)
            stored = self.stored
            while stored in self._durable_above:
                self._durable_above.remove(stored)
                stored += 1
            if stored != self.stored:
                self._file.attrs.modify("stored", np.int64(stored))
                self._file.flush()
                os.fdatasync(self._fd)
                self.stored = stored
        except Exception as e:  # noqa: BLE001 - OSError from the disk, or whatever h5py raised: one line
            self.error = StorageError(f"{self.path}: cannot store results: {_cause(e)} ({self.stored} of "
                                      f"{self.total} stored; --resume continues from there)")
            raise self.error from None
        return self.stored

    def _write_run(self, first: int, rows: list[list[np.ndarray]]) -> None:
        sums = np.array([row_checksum(first + i, row) for i, row in enumerate(rows)], dtype="<u4")
        for k, column in enumerate(self._columns):
            data = sums if k == 0 else np.stack([row[k - 1] for row in rows])
            _write_at(self._fd, column.offset + first * column.row_bytes, data.tobytes())

    def _finish(self) -> None:
        try:
            if self.stored >= self.total:
                self._file.attrs.modify("complete", True)
                self._file.flush()
                os.fdatasync(self._fd)
        except Exception as e:  # noqa: BLE001 - as in _store
            self.error = StorageError(f"{self.path}: cannot mark the results complete: {_cause(e)}")
            raise self.error from None

    def _release(self) -> None:
        """Close the file and its descriptor, whatever state they are in."""
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except Exception:  # noqa: BLE001 - closing after a failure that was already reported
                pass
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_at(fd: int, offset: int, data: bytes) -> None:
    """All of `data` at `offset`, the space reserved first (a full disk fails here, before a byte is written)."""
    if hasattr(os, "posix_fallocate") and data:
        os.posix_fallocate(fd, offset, len(data))
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _open_padded(path: Path) -> tuple[Any, Optional[int]]:
    """h5py.File(path, "r+"), and the size the file had if it was padded. A file cut short (an interrupted
    copy) is first zero-filled back to the size its HDF5 header records, so the rows that survived can be
    verified; the rows lost fail their checksums. If it still cannot be opened, the file is cut back to its
    size and the open's error raised."""
    import h5py

    with open(path, "rb") as head:
        if head.read(len(HDF5_SIGNATURE)) != HDF5_SIGNATURE:  # HDF5 would make an empty file a new one
            raise OSError(0, "no HDF5 signature at its start")
    try:
        return h5py.File(path, "r+"), None
    except OSError as e:
        cut = re.search(r"truncated file: eof = (\d+), .*stored_eof = (\d+)", str(e))
        if cut is None:
            raise
        size, recorded = int(cut.group(1)), int(cut.group(2))
        os.truncate(path, recorded)
        try:
            file = h5py.File(path, "r+")
        except OSError:
            os.truncate(path, size)
            raise e from None
        return file, size


def _cause(e: BaseException) -> str:
    """An exception as a short clause on one line: the OS's words when there are some."""
    text = " ".join(str(e).split())
    words = re.search(r"error message = '([^']*)'", text)
    if words:  # h5py's: the HDF5 call that failed, then the OS's words
        call = re.sub(r"^\[Errno \d+\] ", "", text).split(" (")[0]
        return f"{call}: {words.group(1)}"
    if isinstance(e, OSError) and e.strerror:
        return " ".join(e.strerror.split())
    return text or type(e).__name__


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (where the file system allows it: the rename happened either way)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
