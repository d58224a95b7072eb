"""`python -m dnnpipe`: every command registered by module name and loaded only when chosen."""


import pytest

from dnnpipe.__main__ import build_parser
from dnnpipe.cli import SUBCOMMANDS
from helpers import run_python
from test_closure import NOT_ON_A_BOARD

DEVICE_MODULES = 25  # `stage` and `agent` load 24, runtime_engine.py 23


def loaded_by(*argv: str) -> list[str]:
    """The dnnpipe, TensorFlow and Keras modules a fresh `python -m dnnpipe ARGV` has loaded when it exits."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['dnnpipe', *{list(argv)!r}]\n"
            "try:\n    runpy.run_module('dnnpipe', run_name='__main__', alter_sys=True)\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('dnnpipe', 'tensorflow', 'keras')))))")
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("\n")[-2].split()


@pytest.mark.parametrize("command", ["stage", "agent"])
def test_a_device_command_loads_the_device_side_alone(command):
    loaded = loaded_by(command, "--help")
    assert f"dnnpipe.{SUBCOMMANDS[command].module}" in loaded
    assert len([m for m in loaded if m.startswith("dnnpipe")]) <= DEVICE_MODULES, loaded
    workstation = tuple(m for m in NOT_ON_A_BOARD if m != "dnnpipe.cli")  # the registry itself is lean
    assert not [m for m in loaded if m.startswith(workstation)]


def test_the_command_list_loads_no_command():
    loaded = loaded_by("--help")
    assert not [m for m in loaded if m.endswith(".command")]


def test_every_registered_command_exists_and_parses_its_help(capsys):
    for name in SUBCOMMANDS:
        parser = build_parser([name, "--help"])
        with pytest.raises(SystemExit) as exit:
            parser.parse_args([name, "--help"])
        assert exit.value.code == 0
        assert f"python -m dnnpipe {name}" in capsys.readouterr().out


def test_an_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser(["stag"]).parse_args(["stag"])
    assert exit.value.code == 2
    assert "invalid choice: 'stag'" in capsys.readouterr().err
