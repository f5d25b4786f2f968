"""An unreachable tracking server is a clear one-line error within the retry budget: every command
that needs MLflow says "MLflow at URI is unreachable: reason", exits 2 without a traceback, and
never reports the outage as a missing model, version or alias."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import RegistryError, RegistryUnreachable
from pipeline.registry import reach
from pipeline.registry.client import alias_version, load_model
from pipeline.tools.local_broker import free_port
from tests.helpers import write_series_csv
from training.tracking import Registry, tracking_run

BUDGET_S = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_series_csv(tmp_path_factory.mktemp("data") / "s.csv", n_keys=1, n=300)


def aewatch(args: list[str], uri: str, cwd: Path, budget: float | None = BUDGET_S):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
    if budget is not None:
        env["AEWATCH_REGISTRY_RETRY_S"] = str(budget)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=180,
    )
    return done, time.monotonic() - started


COMMANDS = {
    "train --register": lambda d, o: (
        ["train", "--data", str(d), "--time-col", "ts"]
        + [
            "--key-col",
            "machine",
            "--window",
            "8",
            "--epochs",
            "1",
            "--min-steps",
            "0",
            "--out",
            str(o / "det"),
        ]
        + ["--register", "pump", "--no-progress"]
    ),
    "score": lambda d, o: (
        ["score", "--model", "models:/pump@champion", "--data", str(d)]
        + ["--time-col", "ts", "--key-col", "machine", "--out", str(o / "scores.csv")]
    ),
    "promote": lambda d, o: ["promote", "pump"],
    "promote --rollback": lambda d, o: ["promote", "pump", "--rollback"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unreachable_tracking_server_is_one_line_within_the_budget(command, data, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    done, seconds = aewatch(COMMANDS[command](data, tmp_path), uri, tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"MLflow at {uri} is unreachable" in lines[-1], lines[-5:]
    assert sum("unreachable" in line for line in lines) == 1, lines
    assert "no @challenger" not in done.stderr and "not found" not in done.stderr.lower()
    assert not (tmp_path / "det").exists(), "nothing trained before the registry was reached"
    print(f"{command}: error after {seconds:.1f} s (interpreter and imports included)")


def test_a_bad_retry_budget_is_refused_naming_the_setting(tmp_path):
    bad, _ = aewatch(["promote", "pump"], "http://127.0.0.1:1", tmp_path, budget=-1)
    assert bad.returncode == 2 and "registry_retry_s" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("budget", [0.0, 3.0])
def test_the_retry_budget_bounds_the_time_to_the_error(budget):
    uri = f"http://127.0.0.1:{free_port()}"
    reach.set_retry_budget(budget)
    try:
        for attempt in (
            lambda: load_model("models:/pump@champion", tracking_uri=uri),
            lambda: Registry(uri).version("pump", "challenger"),
            lambda: tracking_run(uri, "e", None, {}).__enter__(),
        ):
            started = time.monotonic()
            with pytest.raises(RegistryUnreachable, match="connection refused"):
                attempt()
            seconds = time.monotonic() - started
            assert budget <= seconds < budget + 3, seconds
    finally:
        reach.set_retry_budget(reach.DEFAULT_RETRY_BUDGET_S)


def test_a_network_error_is_never_a_missing_alias():
    uri = f"http://127.0.0.1:{free_port()}"
    reach.set_retry_budget(0)
    with pytest.raises(RegistryUnreachable, match=f"MLflow at {uri} is unreachable") as raised:
        alias_version("pump", "champion", tracking_uri=uri)
    assert isinstance(raised.value, RegistryError)
    reach.set_retry_budget(reach.DEFAULT_RETRY_BUDGET_S)


def test_a_network_error_after_the_probe_is_unreachable_too():
    """The server went away between the probe and the request: MLflow's error, once its own
    retries are spent, is still reported as unreachable, not as a missing alias."""
    import requests

    uri = f"http://127.0.0.1:{free_port()}"
    refused = requests.ConnectionError(
        "HTTPConnectionPool: Max retries exceeded (Connection refused)"
    )
    error = reach.unreachable_error(uri, RuntimeError("API request failed").with_traceback(None))
    assert error is None
    wrapped = RuntimeError("API request to /api/2.0/mlflow failed")
    wrapped.__cause__ = refused
    assert (
        str(reach.unreachable_error(uri, wrapped))
        == f"MLflow at {uri} is unreachable: connection refused"
    )


_BEFORE: dict = {}


def test_a_command_run_in_process_sets_the_retries_while_it_runs(tmp_path, monkeypatch):
    """The command's budget reaches its MLflow calls, and only those: it is put back when the
    command returns (test_cli)."""
    from pipeline.cli import main

    _BEFORE.update(
        retries=os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"), budget=reach.retry_budget()
    )
    seen = {}
    probe = reach.probe

    def watched(uri, budget_s=None):
        seen.update(budget=reach.retry_budget(), retries=os.environ.get(RETRIES))
        return probe(uri, budget_s)

    from pipeline.registry import client

    monkeypatch.setattr(client, "probe", watched)  # what loading models:/NAME@ALIAS asks first
    uri = f"http://127.0.0.1:{free_port()}"
    argv = ["--registry-retry-s", "0", "score", "--model", "models:/pump@champion"]
    argv += [
        "--tracking-uri",
        uri,
        "--data",
        str(tmp_path / "x.csv"),
        "--out",
        str(tmp_path / "y.csv"),
    ]
    (tmp_path / "x.csv").write_text("ts,a\n1,1.0\n")
    assert main(argv) == 2
    assert seen == {"budget": 0.0, "retries": "0"}
    assert reach.retry_budget() == _BEFORE["budget"]


RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"


def test_the_next_test_starts_with_the_sessions_retries():
    """The command of the test before this one does not reach into this one (tests/conftest.py)."""
    assert _BEFORE, "runs after the test above"
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") == _BEFORE["retries"]
    assert reach.retry_budget() == _BEFORE["budget"]
