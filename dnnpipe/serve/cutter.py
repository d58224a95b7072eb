"""Sub-models of any stage, cut from the partition's whole model.tflite (no TensorFlow): in serve's own process for
what a switch waits for (Cutter), in a process of their own for everything cut in the background (CutWorker).

Why a process: cutting an EfficientNetV2B0 sub-model allocates and copies buffers of up to 24 MB, tens of ms each
with the interpreter lock held, and more where a busy host takes the core away meanwhile. In serve's process that
held up its stream (the inputs it sends, the results it reads): a join's background cuts stopped every result for
0.2-0.4 s on a 2-core host (the switch itself took 60 ms). A process of its own has no lock to hold up, and it runs
at the lowest CPU priority, so the stream's processes take a busy core first. The sub-models it cuts are files in
serve's work folder, written once and streamed to the agents a piece at a time.

    python -m dnnpipe.serve.cutter FOLDER OUT    (started by CutWorker: units in on stdin, one JSON line each;
                                                  a JSON line out for each: the file, its size and SHA-256, or why not)
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Optional

from ..errors import DnnpipeError
from ..manifest import MANIFEST_FILE, read_manifest
from ..runtime.priority import lower_this_process

CUT_SECONDS = 60.0  # the longest one background cut may take (EfficientNetV2B0's largest: 0.1-0.6 s here)
STOP_SECONDS = 2.0  # how long the cutting process gets to end on its own when serve closes
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding dnnpipe, for the cutting process
CLOSING = "serve is closing"
STDERR_FILE = "stderr.txt"  # what the cutting process wrote on stderr, in its folder (a traceback, if it died)

Units = tuple[int, int]


@dataclass(frozen=True)
class SubModel:
    """A sub-model to push: its bytes, or the file the CutWorker wrote (pushed a piece at a time); `cpu_s` is what
    cutting it cost just now (0 when it was cut before)."""

    payload: bytes | Path
    size: int
    sha256: str
    cpu_s: float = 0.0


class Cutter:
    """The whole model read once and kept parsed; `keep` also keeps what it cut (serve's critical path, where the
    same sub-model may be pushed again to another device)."""

    def __init__(self, folder: Path, keep: bool = True):
        from ..slicing.flatbuffer import op_graph, read_model
        from ..slicing.slicer import check_table

        manifest = read_manifest(folder)
        if manifest.whole_model is None:
            raise DnnpipeError(f"{folder / MANIFEST_FILE}: no whole model.tflite recorded (partition the model again)")
        self.whole = manifest.whole_model
        self.model = read_model(folder / self.whole.file)
        self.graph = op_graph(self.model)
        check_table(self.whole, self.graph, folder / MANIFEST_FILE)
        self.keep = keep
        self.cuts: dict[Units, bytes] = {}
        self.lock = threading.Lock()

    def cut(self, units: Units) -> bytes:
        from ..slicing.flatbuffer import cut_submodel

        with self.lock:
            found = self.cuts.get(units)
        if found is not None:
            return found
        inputs, outputs = self.whole.boundaries(units)
        # cut outside the lock: a loss's cut on the critical path never waits for a background thread's other
        # cut; two threads cutting the same units make the same bytes
        flatbuffer = cut_submodel(self.model, [(t.tensor, t.key) for t in inputs],  # type: ignore[misc]
                                  [(t.tensor, t.key) for t in outputs], self.graph)  # type: ignore[misc]
        if not self.keep:
            return flatbuffer
        with self.lock:
            return self.cuts.setdefault(units, flatbuffer)


class CuttingProcessFailed(DnnpipeError):
    """The cutting process failed (just now): serve cuts in its own process from now on."""


class CutWorker:
    """The cutting process, seen from serve: one cut at a time, each kept as a file until close."""

    def __init__(self, folder: Path, work: Path, timeout: float = CUT_SECONDS):
        """The files go to a folder of their own in `work` (another serve may share it), removed at close. The
        process has a session of its own: a terminal's Ctrl-C or a `kill -HUP` of serve's group is serve's."""
        work.mkdir(parents=True, exist_ok=True)
        self.out, self.timeout = Path(tempfile.mkdtemp(prefix="cuts.", dir=work)), timeout
        self._lock = threading.Lock()
        self._files: dict[Units, SubModel] = {}
        self._replies: queue.Queue[Optional[dict[str, Any]]] = queue.Queue()
        self.broken: Optional[str] = None
        self._closing = False
        self._stderr = (self.out / STDERR_FILE).open("wb")
        self._process: Optional[subprocess.Popen] = None
        try:
            self._process = subprocess.Popen([sys.executable, "-P", "-m", "dnnpipe.serve.cutter", str(folder),
                                              str(self.out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=self._stderr, env=_child_environment(), start_new_session=True)
        except OSError as e:
            self.broken = f"the cutting process did not start ({e.strerror or e})"
            return
        threading.Thread(target=_read_replies, args=(self._process.stdout, self._replies), daemon=True,
                         name="serve cutter replies").start()

    def cut(self, units: Units) -> SubModel:
        """The sub-model's file (cut now, or before). DnnpipeError when these units cannot be cut;
        CuttingProcessFailed once, when the process fails (gone, not answering within the timeout, an answer
        that cannot be read), and DnnpipeError with that reason after."""
        with self._lock:
            found = self._files.get(units)
            if found is not None:
                return replace(found, cpu_s=0.0)
            if self.broken is not None or self._closing:
                raise DnnpipeError(self.broken or CLOSING)
            reply = self._ask(units)
            if reply.get("fatal"):
                raise self._failed(f"the cutting process cannot cut: {reply.get('error')}")
            if not reply.get("ok"):
                raise DnnpipeError(str(reply.get("error")))  # (it names the units)
            try:
                path = self.out / str(reply["file"])
                found = SubModel(path, int(reply["size"]), str(reply["sha256"]), float(reply["cpu_s"]))
            except (KeyError, ValueError, TypeError):
                raise self._failed(f"the cutting process answered what serve cannot read: {reply!r:.80}") from None
            if path.parent != self.out or not path.is_file():
                raise self._failed(f"the cutting process named no file of its own folder ({reply['file']!r:.80})")
            self._files[units] = found
            return found

    def _ask(self, units: Units) -> dict[str, Any]:
        if self._process is None or self._process.stdin is None:
            raise self._failed("the cutting process is not running")
        try:
            self._process.stdin.write(json.dumps({"units": list(units)}).encode() + b"\n")
            self._process.stdin.flush()
            reply = self._replies.get(timeout=self.timeout)
        except (OSError, ValueError):
            reply = None
        except queue.Empty:
            self._process.kill()
            raise self._failed(f"the cutting process did not answer within {self.timeout:g} s") from None
        if reply is None and self._closing:
            raise DnnpipeError(CLOSING)  # (not a failure of the process)
        if reply is None:
            raise self._failed(f"the cutting process ended ({self._ending()})")
        return reply

    def _failed(self, why: str) -> CuttingProcessFailed:
        self.broken = why
        return CuttingProcessFailed(why)

    def _ending(self) -> str:
        """Its exit status and the last line it wrote on stderr (a traceback's last line says what it was)."""
        assert self._process is not None
        try:
            status = f"exit status {self._process.wait(STOP_SECONDS)}"
        except subprocess.TimeoutExpired:
            status = "still running, its output closed"
        self._stderr.flush()
        lines = (self.out / STDERR_FILE).read_bytes().decode(errors="replace").strip().splitlines()
        return f"{status}: {lines[-1][:200]}" if lines else status

    def close(self) -> None:
        """End the process (its stdin closed; killed if it does not end in STOP_SECONDS) and remove the files. A
        cut in flight or asked after this fails with CLOSING, which is no failure of the process."""
        self._closing = True
        process = self._process
        if process is not None:
            for pipe in (process.stdin, process.stdout):
                try:
                    if pipe is not None:
                        pipe.close()
                except OSError:
                    pass
            try:
                process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._stderr.close()
        shutil.rmtree(self.out, ignore_errors=True)


def _child_environment() -> dict[str, str]:
    """The package this serve runs from, first on the cutting process's path, unless the interpreter's own
    site-packages has it (then its default path does, and nothing goes ahead of the standard library)."""
    installed = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    if PACKAGE_ROOT in installed:
        return dict(os.environ)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT),
                                                                     os.environ.get("PYTHONPATH")])))


def _read_replies(stream: Optional[IO[bytes]], replies: queue.Queue) -> None:
    """One JSON object per line; None once the process's output ends (or says something that is not one)."""
    assert stream is not None
    try:
        for line in stream:
            reply = json.loads(line)
            if not isinstance(reply, dict):
                break
            replies.put(reply)
    except ValueError:
        pass
    finally:
        replies.put(None)


def cut_to_file(cutter: Cutter, units: Units, out: Path) -> dict[str, Any]:
    """One request of the cutting process: the sub-model written to OUT (whole, or not at all), or why not."""
    began = time.process_time()
    try:
        flatbuffer = cutter.cut(units)
    except DnnpipeError as e:
        return {"ok": False, "error": str(e)}
    name = f"units_{units[0]}_{units[1]}.tflite"
    part = out / f"{name}.part"
    part.write_bytes(flatbuffer)
    os.replace(part, out / name)
    digest = hashlib.sha256(flatbuffer).hexdigest()
    return {"ok": True, "file": name, "size": len(flatbuffer), "sha256": digest, "cpu_s": time.process_time() - began}


def main(argv: list[str]) -> int:
    """The cutting process: units in, files out, until stdin ends. What cannot be read is said on stdout."""
    lower_this_process()  # background work: the stream's processes take a busy core first
    folder, out = Path(argv[0]), Path(argv[1])
    try:
        cutter = Cutter(folder, keep=False)
    except Exception as e:  # noqa: BLE001 - said in reply to the first request, then this process ends
        sys.stdin.buffer.readline()
        sys.stdout.write(json.dumps({"ok": False, "fatal": True, "error": f"{type(e).__name__}: {e}"}) + "\n")
        return 1
    for line in sys.stdin.buffer:
        try:
            units = json.loads(line)["units"]
            first, last = int(units[0]), int(units[1])
        except (ValueError, KeyError, TypeError, IndexError):
            reply: dict[str, Any] = {"ok": False, "error": f"not a request: {line[:80]!r}"}
        else:
            try:
                reply = cut_to_file(cutter, (first, last), out)
            except Exception as e:  # noqa: BLE001 - (a full disk, no memory) said to serve, which cuts in its
                reply = {"ok": False, "fatal": True, "error": f"{type(e).__name__}: {e}"}  # own process then
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if reply.get("fatal"):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
