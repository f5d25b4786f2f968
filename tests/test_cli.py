"""The command line: every listed command exists and runs its own --help."""

from __future__ import annotations

import subprocess
import sys

from pipeline import __version__
from pipeline.cli import build_parser


def test_version_matches_package_metadata():
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"aewatch {__version__}"
    assert __version__ != "0.0.0+unknown"


def test_every_command_has_a_handler():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "broker" in sub.choices
    for name, command_parser in sub.choices.items():
        assert callable(command_parser.get_default("handler")), name


def test_no_command_prints_help_and_fails():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "broker" in out.stdout
