"""The device side: what runtime_engine.py loads, and the files the deployer ships for it, computed from code."""

import shutil
import subprocess
import sys

from dnnpipe.deploy.closure import closure, device_files
from helpers import ROOT

NOT_ON_A_BOARD = ("dnnpipe.planner", "dnnpipe.partition", "dnnpipe.deploy", "dnnpipe.cli", "dnnpipe.demo",
                  "dnnpipe.profile", "dnnpipe.replan", "dnnpipe.examples", "dnnpipe.tfenv", "dnnpipe.testbed",
                  "dnnpipe.config", "dnnpipe.keygen", "tensorflow", "keras")


def test_the_closure_holds_the_runtime_and_nothing_of_the_workstation():
    modules = closure(ROOT)
    assert {"dnnpipe", "dnnpipe.runtime", "dnnpipe.runtime.stage", "dnnpipe.runtime.transport", "dnnpipe.protocol",
            "dnnpipe.manifest", "dnnpipe.interpreter", "dnnpipe.errors"} <= set(modules)
    assert not [m for m in modules if m.startswith(NOT_ON_A_BOARD)]
    assert all(ROOT.joinpath(f).is_file() for f in device_files(ROOT))


def test_the_closure_ships_no_workstation_launcher():
    """run-local starts every stage on one host (dnnpipe.testbed.local): a board runs one stage, never that."""
    shipped = {str(f): ROOT.joinpath(f).read_text() for f in device_files(ROOT)}
    assert not [f for f, text in shipped.items() if "def run_local" in text or "def free_ports" in text]


def test_a_board_with_only_the_shipped_files_runs_the_runtime(tmp_path):
    """Copy exactly what the deployer ships; a fresh interpreter there loads nothing else of the package."""
    for rel in [*device_files(ROOT), "runtime_engine.py"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    code = ("import sys, runpy\n"
            "sys.argv = ['runtime_engine.py', '--help']\n"
            "try:\n    runpy.run_path('runtime_engine.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "import dnnpipe, dnnpipe.runtime.stage\n"
            "print(dnnpipe.__file__)\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('dnnpipe', 'tensorflow', 'keras')))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    where, loaded = result.stdout.strip().splitlines()[-2:]
    assert where.startswith(str(tmp_path))  # the shipped copy, not the installed package
    assert set(loaded.split()) <= set(closure(ROOT))
    assert not [m for m in loaded.split() if m.startswith(NOT_ON_A_BOARD)]
