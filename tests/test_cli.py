"""The command line: every listed command exists and runs its own --help."""

from __future__ import annotations

import os
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


def test_a_command_run_in_process_puts_back_what_it_set_for_its_process(tmp_path, monkeypatch):
    """MLflow's retry variables and the registry retry budget hold while a command runs; a
    caller of `main` in its own process (a notebook, a test, the demo) goes on as before."""
    from pipeline.cli import main
    from pipeline.registry import reach

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_DISABLE_TELEMETRY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "7")
    budget = reach.retry_budget()
    (tmp_path / "x.csv").write_text("ts,a\n1,1.0\n")
    missing = ["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "x.csv")]
    missing += ["--out", str(tmp_path / "out.csv")]
    assert main(["--registry-retry-s", "3", "score", *missing]) == 2
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert "MLFLOW_DISABLE_TELEMETRY" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "7"
    assert reach.retry_budget() == budget != 3.0


def test_the_broker_command_fails_naming_a_broker_that_exited_by_itself(tmp_path):
    """`aewatch broker` whose Kafka process dies says so on one line and exits non-zero, instead
    of ending as if it had been stopped."""
    import re
    import signal

    command = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "broker", "--data-dir", str(tmp_path / "k")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert command.stdout.readline().startswith("KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:")
        started = (tmp_path / "k" / "broker.log").exists()
        # ready: its Kafka process runs, the only process named after the data folder
        out = subprocess.run(["pgrep", "-f", str(tmp_path / "k")], capture_output=True, text=True)
        pid = next((int(p) for p in out.stdout.split() if int(p) != command.pid), None)
        assert started and pid is not None
        os.kill(pid, signal.SIGKILL)
        assert command.wait(timeout=20) == 1
        last = command.stderr.read().strip().splitlines()[-1]  # (after the ready line)
        assert re.search(r"Kafka broker exited by itself \(exit code -?\d+\); last log", last)
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
