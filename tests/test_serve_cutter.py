"""serve/cutter.py: sub-models cut in a process of their own (a real one) are the bytes serve's own cut makes; what
cannot be cut is said; a process that dies or stops answering is an error, never a hang; close leaves nothing."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import pytest

from dnnpipe.errors import DnnpipeError
from dnnpipe.manifest import read_manifest
from dnnpipe.runtime.priority import LOWEST_PRIORITY
from dnnpipe.serve.controller import Controller
from dnnpipe.serve.cutter import CUT_SECONDS, Cutter, CuttingProcessFailed, CutWorker
from serve_setup import Served, make_served


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    return make_served(tmp_path_factory.mktemp("cutter"), [1.0, 1.0])


@pytest.fixture
def folder(served: Served):
    return served.parts / served.name


@pytest.fixture
def workers(tmp_path) -> Iterator[Callable[..., CutWorker]]:
    """CutWorkers writing below tmp_path/cuts, each closed after the test (closing twice is fine)."""
    made: list[CutWorker] = []

    def make(folder: Path, timeout: float = CUT_SECONDS) -> CutWorker:
        made.append(CutWorker(folder, tmp_path / "cuts", timeout))
        return made[-1]

    yield make
    for worker in made:
        worker.close()


@pytest.fixture
def worker(workers, folder) -> CutWorker:
    return workers(folder)


def units_of(folder) -> int:
    whole = read_manifest(folder).whole_model
    assert whole is not None
    return max(whole.cuts)


def test_the_cutting_process_makes_the_sub_model_serve_would(worker, folder):
    last = units_of(folder)
    for units in ((1, 2), (3, last), (1, last)):
        cut = worker.cut(units)
        expected = Cutter(folder).cut(units)
        assert isinstance(cut.payload, Path) and cut.payload.read_bytes() == expected
        assert (cut.size, cut.sha256) == (len(expected), hashlib.sha256(expected).hexdigest())
        assert cut.cpu_s > 0
        assert worker.cut(units) == replace(cut, cpu_s=0.0)  # cut once: the file is kept until close
    assert not list(worker.out.glob("*.part"))


def test_the_cutting_process_runs_at_the_lowest_priority(workers, folder):
    """Background work: on a busy host the stream's processes (serve's, the agents') take a core first."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    worker = workers(folder)
    worker.cut((1, 2))  # (the process lowers itself before it reads its first request)
    assert worker._process is not None
    assert os.getpriority(os.PRIO_PROCESS, worker._process.pid) == LOWEST_PRIORITY
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # serve's own stays as it was


def test_what_cannot_be_cut_is_said_and_the_process_goes_on(worker, folder):
    last = units_of(folder)
    with pytest.raises(DnnpipeError, match=f"units 2-{last + 3}: the model has no cut after unit {last + 3}"):
        worker.cut((2, last + 3))
    assert worker.broken is None
    assert worker.cut((1, 2)).size > 0


def test_a_dead_cutting_process_is_an_error_at_once_and_after(worker):
    worker.cut((1, 2))
    worker._process.kill()
    worker._process.wait()
    with pytest.raises(CuttingProcessFailed, match=r"the cutting process ended \(exit status -9\)"):
        worker.cut((1, 3))
    with pytest.raises(DnnpipeError, match="the cutting process ended") as raised:
        worker.cut((2, 3))  # not asked again
    assert not isinstance(raised.value, CuttingProcessFailed)  # (failed once: said once)
    assert worker.cut((1, 2)).size > 0  # what it cut before is still there


def test_a_cutting_process_that_does_not_answer_is_killed_after_the_timeout(workers, folder):
    worker = workers(folder, timeout=0.5)
    os.kill(worker._process.pid, signal.SIGSTOP)
    with pytest.raises(DnnpipeError, match="did not answer within 0.5 s"):
        worker.cut((1, 2))
    assert worker._process.wait(10) == -signal.SIGKILL


def test_a_cutting_process_that_dies_says_its_last_words(worker):
    worker.cut((1, 2))
    os.kill(worker._process.pid, signal.SIGINT)  # a traceback on its stderr
    with pytest.raises(CuttingProcessFailed, match=r"ended \(exit status -2: KeyboardInterrupt\)"):
        worker.cut((1, 3))


def test_a_cut_it_cannot_write_fails_the_process_and_is_said(worker):
    for part in worker.out.iterdir():
        part.unlink()
    worker.out.rmdir()  # (as a full disk: the file cannot be written)
    with pytest.raises(CuttingProcessFailed, match="the cutting process cannot cut: FileNotFoundError"):
        worker.cut((1, 2))
    assert worker._process.wait(10) == 1


def test_close_fails_what_is_asked_after_it_as_serve_closing_not_as_a_failure(worker):
    worker.close()
    with pytest.raises(DnnpipeError, match="serve is closing") as raised:
        worker.cut((1, 2))
    assert not isinstance(raised.value, CuttingProcessFailed) and worker.broken is None


def test_close_leaves_no_process_and_no_files(worker, tmp_path):
    path = worker.cut((1, 2)).payload
    worker.close()
    assert worker._process.poll() is not None
    assert isinstance(path, Path) and path.parent == worker.out
    assert not worker.out.exists() and not list((tmp_path / "cuts").iterdir())


def test_serve_cuts_in_its_own_process_once_the_cutting_process_failed(worker, folder):
    """In the background the file comes from the cutting process; once it failed (said once) serve cuts the same
    bytes itself; a switch's critical path never asks the process."""
    said: list[str] = []
    fleet = SimpleNamespace(closed=threading.Event())
    shell = SimpleNamespace(cut_worker=worker, cutter=Cutter(folder), echo=said.append, fleet=fleet)
    sub_model = Controller._sub_model  # (on a stand-in for the controller: only what it uses)
    assert sub_model(shell, (1, 2), background=True).payload == worker.cut((1, 2)).payload  # type: ignore[arg-type]
    assert sub_model(shell, (1, 3), background=False).payload == Cutter(folder).cut((1, 3))  # type: ignore[arg-type]
    worker._process.kill()
    worker._process.wait()
    for units in ((2, 3), (2, 4)):
        here = sub_model(shell, units, background=True)  # type: ignore[arg-type]
        assert here.payload == Cutter(folder).cut(units) and here.cpu_s > 0
        assert (here.size, here.sha256) == (len(here.payload), hashlib.sha256(here.payload).hexdigest())
    assert len(said) == 1 and "the cutting process ended" in said[0] and "serve's own process" in said[0]
    fleet.closed.set()  # serve closing: nothing is cut any more, in either process
    with pytest.raises(DnnpipeError, match="serve is closing"):
        sub_model(shell, (3, 4), background=True)  # type: ignore[arg-type]


def test_a_cutting_process_that_cannot_read_the_model_says_why(workers, tmp_path):
    worker = workers(tmp_path / "no_model")
    with pytest.raises(DnnpipeError, match="the cutting process cannot cut: .*no_model"):
        worker.cut((1, 2))
    assert worker.broken is not None and worker._process.wait(10) == 1
