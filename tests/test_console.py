"""What every command shares: an error or an interrupt is one line and an exit status."""

from __future__ import annotations

import argparse

from dnnpipe import console
from dnnpipe.__main__ import main
from dnnpipe.cli import SUBCOMMANDS, Subcommand
from dnnpipe.errors import DnnpipeError


def test_an_interrupted_command_says_so_and_exits_130(capsys):
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    assert console.run_command(interrupted, argparse.Namespace(), "test") == 130
    assert capsys.readouterr().err == "test: interrupted\n"


def test_a_user_error_is_one_line(capsys):
    def failing(args: argparse.Namespace) -> int:
        raise DnnpipeError("config.json: N: expected a whole number, got 'x'")

    assert console.run_command(failing, argparse.Namespace(), "test") == 1
    assert capsys.readouterr().err == "test: error: config.json: N: expected a whole number, got 'x'\n"


class Loading(Subcommand):
    def load(self):
        raise KeyboardInterrupt  # as if Ctrl-C came while the command's module imports TensorFlow


def test_an_interrupt_while_a_command_loads_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(SUBCOMMANDS, "demo", Loading(**vars(SUBCOMMANDS["demo"])))
    assert main(["demo", "--help"]) == 130
    assert capsys.readouterr().err == "dnnpipe demo: interrupted\n"
