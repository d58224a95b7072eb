"""serve's result store (dnnpipe.serve.results) against real faults: a file damaged or cut at any byte, a write
that fails at any point (the kernel's own ENOSPC, injected by strace), SIGKILL of the writing process, a real
tmpfs that fills up. Whatever happens, `stored` never counts a row that is not intact, a resume counts exactly
the intact rows and continues, and a storage fault is one line.

Run as a script, this file is the writing process the fault tests kill: `test_results.py OUT TOTAL ROWS EVERY`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dnnpipe.errors import DnnpipeError, StorageError
from dnnpipe.manifest import TensorSpec
from dnnpipe.serve.results import CHECKSUMS, ResultStore

# two outputs: a real one, and an int8 one the store dequantizes (what the pipeline's int8 ends deliver)
SPECS = [TensorSpec("scores:0", "scores", (1, 6), "float32"),
         TensorSpec("boxes", "boxes", (1, 2, 3), "int8", quantization=(0.5, 3))]
TOTAL = 40
HERE = Path(__file__).resolve()
WRITER_ENV = {**os.environ, "PYTHONPATH": str(HERE.parents[1])}  # the writer imports this tree's dnnpipe


def wire_row(i: int) -> list[np.ndarray]:
    """Row i as the last stage sends it."""
    return [(np.arange(6, dtype=np.float32) + i * 0.25).reshape(1, 6),
            ((np.arange(6) + i) % 200 - 100).astype(np.int8).reshape(1, 2, 3)]


def stored_row(i: int) -> list[np.ndarray]:
    """Row i as OUT must hold it."""
    scores, boxes = wire_row(i)
    return [scores[0], ((boxes[0].astype(np.float32) - 3) * 0.5).astype(np.float32)]


def checksum(i: int, rows: list[np.ndarray]) -> int:
    """The documented row checksum: CRC-32 of the index (8 bytes, little-endian), then each output's row."""
    crc = zlib.crc32(i.to_bytes(8, "little"))
    for row in rows:
        crc = zlib.crc32(np.ascontiguousarray(row, dtype=row.dtype.newbyteorder("<")).tobytes(), crc)
    return crc


def intact_rows(path: Path, total: int) -> int:
    """The test's own count of the leading rows that hold exactly what was written, with their checksums."""
    with h5py.File(path, "r") as f:
        sums = f[CHECKSUMS][:]
        data = [f[s.name][:] for s in SPECS]
    for i in range(total):
        expected = stored_row(i)
        if any(not np.array_equal(d[i], e) for d, e in zip(data, expected)) or int(sums[i]) != checksum(i, expected):
            return i
    return total


def counted(path: Path) -> tuple[int, bool]:
    with h5py.File(path, "r") as f:
        return int(f.attrs["stored"]), bool(f.attrs["complete"])


def write_rows(store: ResultStore, rows: range) -> None:
    for i in rows:
        store.write(i, wire_row(i))


def assert_one_line(error: BaseException, path: Path, *fragments: str) -> None:
    text = str(error)
    assert "\n" not in text and text.startswith(str(path)), text
    for fragment in fragments:
        assert fragment in text, text


def finish_and_check(path: Path, total: int = TOTAL) -> None:
    """Resume, write every row not counted, close: OUT must hold every row exactly, and say so."""
    store = ResultStore(path, SPECS, total, resume=True)
    write_rows(store, range(store.stored, total))
    store.close()
    assert intact_rows(path, total) == total and counted(path) == (total, True)


# --- the store on a healthy disk --------------------------------------------------------------


def test_rows_are_stored_in_input_order_and_complete_only_when_all_are(tmp_path):
    out = tmp_path / "sub" / "out.h5"
    store = ResultStore(out, SPECS, TOTAL, resume=False)
    write_rows(store, range(25))
    store.close()
    assert counted(out) == (25, False) and intact_rows(out, TOTAL) == 25
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["boxes"][3], stored_row(3)[1])
        assert f["scores:0"].dtype == np.float32 and f["boxes"].dtype == np.float32
    finish_and_check(out)


def test_only_a_prefix_is_counted_and_the_callers_count_is_not_trusted(tmp_path):
    out = tmp_path / "out.h5"
    store = ResultStore(out, SPECS, TOTAL, resume=False)
    for i in (0, 1, 3, 4):
        store.write(i, wire_row(i), TOTAL)  # the caller claims everything is stored
    store.flush()
    assert store.stored == 2 and counted(out) == (2, False)
    store.write(2, wire_row(2))
    store.flush()
    assert store.stored == 5 and counted(out) == (5, False)
    store.close()


def test_a_resume_counts_rows_written_after_the_last_count(tmp_path):
    """A crash between a batch's fsync and its count: the rows verify, so a resume counts them."""
    out = tmp_path / "out.h5"
    store = ResultStore(out, SPECS, TOTAL, resume=False)
    write_rows(store, range(10))
    store.close()
    with h5py.File(out, "r+") as f:
        f.attrs.modify("stored", 4)  # the count as it was before the last batch's fsync
    store = ResultStore(out, SPECS, TOTAL, resume=True)
    assert store.stored == 10
    store.close()
    assert counted(out) == (10, False)


def test_resume_refuses_what_it_cannot_verify_in_one_line(tmp_path):
    out = tmp_path / "out.h5"
    out.write_bytes(b"not an HDF5 file at all")
    with pytest.raises(StorageError) as e:
        ResultStore(out, SPECS, TOTAL, resume=True)
    assert_one_line(e.value, out, "cannot resume: not a readable results file", "run without --resume")
    assert out.read_bytes() == b"not an HDF5 file at all"
    with h5py.File(out, "w") as f:  # what the store wrote before row checksums
        f.attrs.update({"num_inputs": TOTAL, "stored": 5, "complete": False})
        for s in SPECS:
            f.create_dataset(s.name, shape=(TOTAL, *s.shape[1:]), dtype="float32", chunks=(1, *s.shape[1:]))
    with pytest.raises(DnnpipeError) as e:
        ResultStore(out, SPECS, TOTAL, resume=True)
    assert_one_line(e.value, out, "cannot resume", "no row checksums")
    with pytest.raises(DnnpipeError) as e:
        ResultStore(out, SPECS, TOTAL + 1, resume=True)
    assert_one_line(e.value, out, f"it was made for {TOTAL} inputs, this run has {TOTAL + 1}")


def test_a_file_that_cannot_be_opened_for_writing_is_one_line_and_left_alone(tmp_path):
    out = tmp_path / "out.h5"
    out.mkdir()  # a folder where OUT should be
    with pytest.raises(StorageError) as e:
        ResultStore(out, SPECS, TOTAL, resume=False)
    assert_one_line(e.value, out, "cannot make the results file")
    assert out.is_dir()


def test_an_output_named_like_the_checksums_is_refused(tmp_path):
    with pytest.raises(DnnpipeError, match="cannot be stored as one dataset each"):
        ResultStore(tmp_path / "out.h5", [TensorSpec(CHECKSUMS, "x", (1, 2), "float32")], 3, resume=False)


# --- damage at any byte: what a resume counts is exactly what is intact ------------------------


def layout(path: Path) -> list[tuple[int, int, int]]:
    """(offset, bytes per row, rows) of every dataset: the data region of the file."""
    with h5py.File(path, "r") as f:
        return [(f[n].id.get_offset(), f[n].dtype.itemsize * int(np.prod(f[n].shape[1:], dtype=np.int64)),
                 f[n].shape[0]) for n in (CHECKSUMS, *(s.name for s in SPECS))]


def first_damaged_row(regions: list[tuple[int, int, int]], changed: np.ndarray) -> tuple[int, bool]:
    """The first row with a changed byte, and whether a byte outside the data region (metadata) changed."""
    first, outside = TOTAL, changed.copy()
    for offset, row_bytes, rows in regions:
        hit = np.flatnonzero(changed[offset:offset + row_bytes * rows])
        if hit.size:
            first = min(first, int(hit[0]) // row_bytes)
        outside[offset:offset + row_bytes * rows] = False
    return first, bool(outside.any())


@st.composite
def damage(draw, size: int) -> tuple[str, int, bytes]:
    """A file cut at a byte (an interrupted copy), or a run of bytes overwritten (a torn write, bit rot)."""
    if draw(st.booleans()):
        return "cut", draw(st.integers(0, size - 1)), b""
    at = draw(st.integers(0, size - 1))
    fill = draw(st.binary(min_size=1, max_size=64) | st.integers(1, 4096).map(lambda n: bytes(n)))
    return "overwrite", at, fill[:size - at]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(written=st.integers(0, TOTAL), data=st.data())
def test_resume_counts_exactly_the_intact_rows_of_a_damaged_file(tmp_path, written, data):
    with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
        out = Path(folder) / "out.h5"
        store = ResultStore(out, SPECS, TOTAL, resume=False)
        write_rows(store, range(written))
        store.close()
        regions = layout(out)
        assert all(offset >= regions[0][0] for offset, _, _ in regions)  # metadata first, then the data
        before = out.read_bytes()
        kind, at, fill = data.draw(damage(len(before)))
        after = before[:at] if kind == "cut" else before[:at] + fill + before[at + len(fill):]
        out.write_bytes(after)
        seen = np.frombuffer(after.ljust(len(before), b"\0"), np.uint8)
        first, metadata = first_damaged_row(regions, seen != np.frombuffer(before, np.uint8))
        expected = min(written, first)
        try:
            store = ResultStore(out, SPECS, TOTAL, resume=True)
        except StorageError as e:  # only when what locates the rows is gone
            assert metadata, f"refused a file whose metadata is intact: {e}"
            assert_one_line(e, out, "cannot resume")
            assert out.read_bytes() == after  # a refusal leaves the file as it found it
            return
        assert store.stored == expected, (kind, at, len(fill))
        store.close()
        assert counted(out) == (expected, expected == TOTAL) and intact_rows(out, TOTAL) >= expected
        finish_and_check(out)


def test_a_file_cut_inside_its_data_resumes_from_the_rows_before_the_cut(tmp_path):
    out = tmp_path / "out.h5"
    store = ResultStore(out, SPECS, TOTAL, resume=False)
    write_rows(store, range(TOTAL))
    store.close()
    offset, row_bytes, _ = layout(out)[-1]  # the last dataset: cut in the middle of its row 30
    os.truncate(out, offset + 30 * row_bytes + 5)
    lines: list[str] = []
    store = ResultStore(out, SPECS, TOTAL, resume=True, echo=lines.append)
    assert store.stored == 30
    assert any("was cut short" in line for line in lines) and any("40 rows were counted, 30 are intact" in line
                                                                   for line in lines)
    store.close()
    finish_and_check(out)


# --- a process that writes the store, faulted from outside -------------------------------------


def writer(path: str, total: str, rows: str, every: str) -> int:
    """The process the fault tests kill: rows (resuming from what OUT holds), a flush every `every` rows,
    `stored N` after each; a storage fault as the CLI shows it, one line and status 1."""
    try:
        store = ResultStore(Path(path), SPECS, int(total), resume=True)
        for i in range(store.stored, int(rows)):
            store.write(i, wire_row(i))
            if (i + 1) % int(every) == 0:
                store.flush()
                print(f"stored {store.stored}", flush=True)
        store.close()
        print(f"stored {store.stored}", flush=True)
    except DnnpipeError as e:
        print(f"writer: error: {e}", file=sys.stderr)
        return 1
    return 0


def writer_command(out: Path, rows: int, every: int, total: int = TOTAL) -> list[str]:
    return [sys.executable, str(HERE), str(out), str(total), str(rows), str(every)]


def check_after_fault(out: Path, last_count: int, total: int = TOTAL) -> None:
    """Never overstated, nothing counted lost, and a resume that counts exactly the intact rows and finishes."""
    if not out.exists():
        assert last_count == 0  # the fault came while OUT was made: it was removed
        return
    intact = intact_rows(out, total)
    written, complete = counted(out)
    assert last_count <= written <= intact and (not complete or written == total)
    store = ResultStore(out, SPECS, total, resume=True)
    assert store.stored == intact
    store.close()
    finish_and_check(out, total)


def strace_inject() -> Optional[str]:
    """Why syscall faults cannot be injected here, or None when they can."""
    if shutil.which("strace") is None:
        return "strace is not installed (apt-get install strace)"
    probe = subprocess.run(["strace", "-qq", "-o", "/dev/null", "-e", "trace=none", "true"], capture_output=True)
    return None if probe.returncode == 0 else f"strace cannot trace here: {probe.stderr.decode().strip()}"


@pytest.mark.skipif(strace_inject() is not None, reason=str(strace_inject()))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(syscall=st.sampled_from(["pwrite64", "fallocate", "fdatasync"]), when=st.integers(1, 40),
       fault=st.sampled_from(["error=ENOSPC", "error=EIO", "signal=SIGKILL"]))
def test_a_fault_at_any_write_never_overstates_and_resumes_exactly(tmp_path, syscall, when, fault):
    """The kernel fails (or the process dies at) the `when`-th write, allocation or sync of the process, HDF5's
    own writes included: one line, never a row counted that is not intact, and a resume that finishes."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
        out = Path(folder) / "out.h5"
        run = subprocess.run(["strace", "-qq", "-f", "-o", "/dev/null", "-e", f"trace={syscall}", "-e",
                              f"inject={syscall}:{fault}:when={when}", *writer_command(out, TOTAL, 4)],
                             capture_output=True, text=True, timeout=120, env=WRITER_ENV)
        counts = [int(line.split()[1]) for line in run.stdout.splitlines()]
        assert "Traceback" not in run.stderr, run.stderr
        if run.returncode == 1:
            lines = run.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"writer: error: {out}: cannot "), run.stderr
            assert ("No space left on device" if "ENOSPC" in fault else "Input/output error") in lines[0]
        else:
            assert run.returncode in (0, -signal.SIGKILL), run.stderr
        check_after_fault(out, counts[-1] if counts else 0)


def test_sigkill_of_the_writing_process_then_resume(tmp_path):
    """Killed after it said `stored N` a few times (at whatever point of a batch that lands): nothing counted
    is lost, nothing counted is not intact."""
    total = 3000
    for kill_after in (1, 3, 9):
        out = tmp_path / f"out{kill_after}.h5"
        process = subprocess.Popen(writer_command(out, total, 7, total), stdout=subprocess.PIPE, text=True,
                                   env=WRITER_ENV)
        assert process.stdout is not None
        counts = [int(process.stdout.readline().split()[1]) for _ in range(kill_after)]
        process.kill()
        process.wait(30)
        process.stdout.close()
        check_after_fault(out, counts[-1], total)


# --- a real full disk -------------------------------------------------------------------------


class Tmpfs:
    """A real tmpfs of `size` bytes (root only), unmounted on exit."""

    def __init__(self, where: Path, size: int):
        self.where, self.size = where, size

    def __enter__(self) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        self.where.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.where)],
                                 capture_output=True, text=True)
        if mounted.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        return self.where

    def __exit__(self, *exc: object) -> None:
        if subprocess.run(["umount", str(self.where)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(self.where)], check=True)  # busy: detached all the same


def test_a_full_disk_stops_the_store_with_one_line_and_the_resume_continues(tmp_path):
    total = 4000  # 4000 x 40 bytes: more than the 64 KiB disk holds
    with Tmpfs(tmp_path / "disk", 64 << 10) as disk:
        out = disk / "out.h5"
        store = ResultStore(out, SPECS, total, resume=False)
        with pytest.raises(StorageError) as e:
            write_rows(store, range(total))
        assert_one_line(e.value, out, "cannot store results: No space left on device",
                        f"({store.stored} of {total} stored; --resume continues from there)")
        with pytest.raises(StorageError):  # it stays failed: no retry
            store.write(store.stored, wire_row(store.stored))
        with pytest.raises(StorageError):
            store.close()
        stored = store.stored
        assert 0 < stored < total and counted(out) == (stored, False) and intact_rows(out, total) == stored
        again = ResultStore(out, SPECS, total, resume=True)  # on the full disk: it verifies, allocates nothing
        assert again.stored == stored
        with pytest.raises(StorageError, match="No space left on device"):  # what space is left, it fills
            write_rows(again, range(stored, total))
        with pytest.raises(StorageError):
            again.close()
        stored = again.stored
        assert counted(out) == (stored, False) and intact_rows(out, total) == stored
        roomy = tmp_path / "out.h5"
        shutil.copy(out, roomy)
    store = ResultStore(roomy, SPECS, total, resume=True)
    assert store.stored == stored
    store.close()
    finish_and_check(roomy, total)


def test_a_disk_too_small_to_make_the_file_is_one_line_and_nothing_is_left(tmp_path):
    with Tmpfs(tmp_path / "disk", 4 << 10) as disk:
        filler = disk / "filler"
        filler.write_bytes(b"x" * (4 << 10))
        with pytest.raises(StorageError) as e:
            ResultStore(disk / "out.h5", SPECS, TOTAL, resume=False)
        assert_one_line(e.value, disk / "out.h5", "cannot make the results file")
        assert sorted(disk.iterdir()) == [filler]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from serve_setup import make_served

    return make_served(tmp_path_factory.mktemp("served"), [1.0, 1.0])


@pytest.mark.slow
def test_serve_on_a_full_disk_stops_with_one_line_and_resumes_exactly(served, tmp_path):
    """A real serve run over real stage processes: the first failed write ends it at once (no retry as a
    pipeline fault, no traceback, no stage left), and `--resume` from a copy on a roomy disk finishes it."""
    from helpers import assert_clean_error, run_script
    from test_serve import assert_no_orphans

    registry = served.registry([1, 2], tmp_path / "registry.json")
    total = 3000
    with Tmpfs(tmp_path / "disk", 64 << 10) as disk:
        out = disk / "out.h5"
        failed = run_script("dnnpipe", *served.args(registry, out, "--num-inputs", str(total)), timeout=300)
        assert_clean_error(failed, f"{out}: cannot store results: No space left on device")
        assert "pipeline failed" not in failed.stdout, failed.stdout
        assert_no_orphans(served.root)
        stored, complete = counted(out)
        assert 0 < stored < total and not complete
        roomy = tmp_path / "out.h5"
        shutil.copy(out, roomy)
    resumed = run_script("dnnpipe", *served.args(registry, roomy, "--num-inputs", str(total), "--resume"),
                         timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed: {stored} of {total} results already in" in resumed.stdout
    served.check(roomy, total)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.7, 1.9])
def test_serve_killed_with_sigkill_never_overstates_and_resumes_exactly(served, tmp_path, delay):
    """SIGKILL of serve at some moment after its first result: `stored` rows all equal the model's outputs,
    `complete` is False, and `--resume` stores the rest, every row once."""
    import time

    from helpers import ROOT, run_script

    total = 1500
    out = tmp_path / "out.h5"
    args = served.args(served.registry([1, 2], tmp_path / "registry.json"), out, "--num-inputs", str(total),
                       "--fps", "400")
    serve = subprocess.Popen([sys.executable, "-m", "dnnpipe", *args], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**WRITER_ENV, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert serve.stdout is not None
    for line in serve.stdout:
        if "first result" in line:
            break
    time.sleep(delay)
    serve.kill()
    serve.wait(30)
    serve.stdout.close()
    stored, complete = counted(out)
    assert stored < total and not complete
    name, expected = next(iter(served.expected.items()))
    with h5py.File(out) as f:
        rows = len(expected)
        np.testing.assert_allclose(f[name][:stored], expected[np.arange(stored) % rows], rtol=1e-4, atol=1e-4)
    # new ports: whether the killed run's stages are gone yet is another matter (they stop on their own)
    registry = served.registry([1, 2], tmp_path / "registry2.json")
    resumed = run_script("dnnpipe", *served.args(registry, out, "--num-inputs", str(total), "--resume"),
                         timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{total} of {total} results stored" in resumed.stdout
    served.check(out, total)


if __name__ == "__main__":
    sys.exit(writer(*sys.argv[1:]))
