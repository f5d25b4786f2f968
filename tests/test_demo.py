"""`aewatch demo` end to end, reduced in size, against the real broker."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from pipeline.cli import main
from pipeline.tools.synthetic import ANOMALY_KINDS

pytestmark = pytest.mark.kafka


def test_the_demo_detects_every_injected_kind_and_writes_its_report(
    kafka_bootstrap, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "demo"
    args = ["demo", "--dir", str(root), "--keys", "6", "--history", "2000", "--stream", "800"]
    assert main([*args, "--epochs", "10", "--rate", "1000"]) == 0
    summary = json.loads((root / "summary.json").read_text())
    kinds = {a["kind"] for a in summary["anomalies"] if a["detected"]}
    assert kinds == set(ANOMALY_KINDS)  # a stuck sensor and a tripled frequency included
    assert summary["detected"] == summary["injected"] == 6
    assert summary["false_alarms"] <= 2
    assert summary["latency_ms"]["events"] > 0 and summary["latency_ms"]["p99"] < 5000
    assert (root / "report.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "promotion gates" in out and "OPENED" in out and "RESOLVED" in out
    assert "6/6 injected anomalies detected" in out
    # the operations loop: every episode judged, the live precision they give, a recalibration
    loop = summary["feedback"]
    assert loop["judged"] == summary["episodes"]
    real = summary["episodes"] - summary["false_alarms"]
    assert loop["live_precision"] == pytest.approx(real / summary["episodes"])
    assert loop["still_raised"]["true_positive"] == real  # no confirmed alarm is lost
    assert loop["threshold_after"] >= loop["threshold_before"]  # verdicts only raise it
    assert "6. operator feedback" in out and "live precision" in out

    # a second run, as a user would start it: a new process, an emptied folder, new topics
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap)
    again = [sys.executable, "-m", "pipeline.cli", *args, "--epochs", "3", "--rate", "2000"]
    done = subprocess.run(again, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: not every kind caught in 3 epochs
    assert json.loads((root / "summary.json").read_text())["readings"] == 6 * 800


def test_the_image_demo_flags_the_other_digits(kafka_bootstrap, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "images"
    levels = {name: logging.getLogger(name).level for name in ("pipeline", "training")}
    assert main(["demo", "--images", "--dir", str(root)]) == 0
    # the demo's quieter logging ends with it: later work in this process logs as before
    assert {name: logging.getLogger(name).level for name in levels} == levels
    assert not any(f for h in logging.getLogger().handlers for f in h.filters)
    summary = json.loads((root / "summary.json").read_text())
    assert summary["images"] == 150
    assert summary["detected"] >= 0.8 * summary["anomalous_images"]
    assert summary["false_alarms"] <= 0.1 * (summary["images"] - summary["anomalous_images"])
    assert "other digits raised an event" in capsys.readouterr().out
