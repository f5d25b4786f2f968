"""Held-out false-positive rates far above their target: the rule, train's warning and tags,
and the promotion gate that refuses them unless told otherwise."""

from __future__ import annotations

import json
import logging
import uuid

import numpy as np
import pytest

from pipeline.registry.client import TAG_PREFIX
from tests.fleet_support import fleet_frame, machine, train_on
from tests.helpers import register_result
from training.fpr_check import check_fpr
from training.promote import PromotionReport, _gates, apply_promotion, compare


def test_the_rule_counts_overlapping_windows_as_fewer_trials():
    assert check_fpr(187, 909, 0.01, 32, 1).far_above  # 20.6 % at a 1 % target
    assert not check_fpr(27, 909, 0.01, 32, 1).far_above  # 3 % on overlapping windows: noise
    assert check_fpr(27, 909, 0.01, 32, 32).far_above  # 3 % on independent windows: real
    assert check_fpr(27, 909, 0.01, 32, 1).n_eff == 909 // 32


def test_the_promotion_gate_uses_the_same_rule():
    check = check_fpr(27, 909, 0.01, 32, 1)  # the exact interval on 909 windows starts at 2 %
    figures = {
        "target_fpr": 0.01,
        "fpr": check.rate,
        "fpr_effective_low": check.low,
        "fpr_effective_n": check.n_eff,
    }
    report = PromotionReport("m", "2", None, {"challenger": figures})
    assert all(g.passed for g in _gates(report, 0.01, 0.01))
    far = check_fpr(187, 909, 0.01, 32, 1)
    figures.update(fpr=far.rate, fpr_effective_low=far.low, fpr_effective_n=far.n_eff)
    (gate,) = _gates(report, 0.01, 0.01)
    assert not gate.passed
    (gate,) = _gates(report, 0.01, 0.01, allow_high_fpr=True)
    assert gate.passed and gate.overridden


@pytest.fixture(scope="module")
def drifted(tmp_path_factory):
    """Trained on a machine whose last tenth (the test split) moved far from the rest."""
    values = machine(3, 3000, level=0.0)
    values[-300:, 1] += 6 * values[:, 1].std()
    frame = fleet_frame({"m": values}).drop(columns="machine")
    return train_on(frame, tmp_path_factory.mktemp("drift"), "drift", keyed=False, window=16)


def test_train_warns_and_records_the_check(drifted, tmp_path, caplog):
    from training.job import _check_fpr

    summary = drifted.summary()
    assert summary["fpr_check"]["far_above"], summary["fpr_estimate"]
    assert drifted.detector.info["calibration"]["fpr_check"]["far_above"]
    with caplog.at_level(logging.WARNING, logger="training.job"):
        _check_fpr(drifted.detector, drifted.fpr_estimate)
    assert any("far above the target" in r.getMessage() for r in caplog.records)
    quiet = train_on(fleet_frame({"m": machine(3, 3000, level=0.0)}), tmp_path, "q", keyed=False)
    assert quiet.summary()["fpr_check"]["far_above"] is False


def test_promote_refuses_a_far_above_version_unless_allowed(mlflow_server, drifted):
    from mlflow import MlflowClient

    name = f"fpr-{uuid.uuid4().hex[:8]}"
    version = register_result(mlflow_server, drifted, name)
    tags = MlflowClient(mlflow_server).get_model_version(name, version).tags
    assert json.loads(tags[TAG_PREFIX + "fpr_check"])["far_above"]
    report = compare(name, tracking_uri=mlflow_server)
    assert [g.name for g in report.gates if not g.passed] == ["false alarms"], report.table()
    assert not apply_promotion(report, tracking_uri=mlflow_server)
    allowed = compare(name, tracking_uri=mlflow_server, allow_high_fpr=True)
    assert allowed.passed
    assert apply_promotion(allowed, tracking_uri=mlflow_server)
    tags = MlflowClient(mlflow_server).get_model_version(name, version).tags
    assert "allow-high-fpr" in tags[TAG_PREFIX + "allow_high_fpr"]
    assert np.isfinite(allowed.figures["challenger"]["fpr_effective_low"])
