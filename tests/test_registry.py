"""Registry workflow against a real `mlflow server`: register, promote, resolve, gates, rollback,
recalibration, and serving the pyfunc over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests

from pipeline.errors import ArtifactError, RegistryError
from pipeline.registry.client import TAG_PREFIX, load_model
from pipeline.tools.local_broker import free_port
from tests.helpers import labelled_series_csv, register_result, train_series_detector
from training.data.for_detector import DataSource, load_for
from training.promote import apply_promotion, compare, rollback

pytestmark = pytest.mark.mlflow_server


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return labelled_series_csv(tmp_path_factory.mktemp("data") / "series.csv")


@pytest.fixture(scope="module")
def good(tmp_path_factory, data):
    return train_series_detector(data, tmp_path_factory.mktemp("good") / "det")


def _name() -> str:
    return f"det-{uuid.uuid4().hex[:8]}"


def _data_loader(data: Path):
    source = DataSource(str(data), time_col="ts", key_col="machine", label_col="label")
    return lambda detector: load_for(detector, source)


def test_register_promote_resolve_load_gives_identical_scores(mlflow_server, good, tmp_path):
    name = _name()
    version = register_result(mlflow_server, good, name)
    report = compare(name, tracking_uri=mlflow_server)
    assert report.champion is None and report.passed, report.table()
    assert apply_promotion(report, tracking_uri=mlflow_server)

    detector, ref = load_model(
        f"models:/{name}@champion", tracking_uri=mlflow_server, download_dir=tmp_path
    )
    assert (ref.name, ref.version, ref.alias) == (name, version, "champion")
    windows = good.data.raw("test")
    np.testing.assert_array_equal(
        detector.score(windows).scores, good.detector.score(windows).scores
    )
    assert detector.threshold == good.detector.threshold


def test_a_version_whose_weights_do_not_match_its_hash_is_refused(mlflow_server, good, tmp_path):
    from mlflow import MlflowClient

    name = _name()
    version = register_result(mlflow_server, good, name)
    MlflowClient(mlflow_server).set_model_version_tag(
        name, version, TAG_PREFIX + "weights_sha256", "f" * 64
    )
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_model(f"models:/{name}/{version}", tracking_uri=mlflow_server, download_dir=tmp_path)


def test_worse_challengers_are_not_promoted_and_rollback_restores(
    mlflow_server, good, data, tmp_path
):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    name = _name()
    first = register_result(mlflow_server, good, name)
    assert apply_promotion(compare(name, tracking_uri=mlflow_server), tracking_uri=mlflow_server)
    with pytest.raises(RegistryError, match="already @champion: nothing to promote"):
        compare(name, tracking_uri=mlflow_server)  # (it "promoted" v1 over v1, exit 0)

    # PCA keeping every dimension reconstructs anomalies perfectly: it cannot rank them.
    blind = train_series_detector(data, tmp_path / "blind", kind="pca", hidden=(), code_size=48)
    register_result(mlflow_server, blind, name)
    report = compare(name, tracking_uri=mlflow_server, load_data=_data_loader(data))
    assert not report.passed
    assert [g.name for g in report.gates if not g.passed] == ["AUROC"], report.table()
    assert not apply_promotion(report, tracking_uri=mlflow_server)
    assert client.get_model_version_by_alias(name, "champion").version == first
    decision = client.get_model_version(name, report.challenger).tags
    assert decision[TAG_PREFIX + "promotion_decision"].startswith("rejected")

    second_good = train_series_detector(data, tmp_path / "good2", code_size=10)
    second = register_result(mlflow_server, second_good, name)
    report = compare(name, tracking_uri=mlflow_server, load_data=_data_loader(data))
    assert report.passed, report.table()
    assert apply_promotion(report, tracking_uri=mlflow_server)
    assert client.get_model_version_by_alias(name, "champion").version == second

    assert rollback(name, tracking_uri=mlflow_server, dry_run=True) == (second, first)
    assert client.get_model_version_by_alias(name, "champion").version == second  # (it moved)
    assert rollback(name, tracking_uri=mlflow_server) == (second, first)
    assert client.get_model_version_by_alias(name, "champion").version == first
    # @challenger still names the version rolled back: promote does not undo the rollback
    with pytest.raises(RegistryError, match=f"v{second} was rolled back from @champion"):
        compare(name, tracking_uri=mlflow_server, load_data=_data_loader(data))
    assert client.get_model_version_by_alias(name, "champion").version == first


def test_recalibrate_registers_same_weights_with_a_new_threshold(
    mlflow_server, good, data, capsys, monkeypatch, tmp_path
):
    import tempfile

    from pipeline.cli import main

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    name = _name()
    version = register_result(mlflow_server, good, name)
    code = main(
        [
            "recalibrate",
            "--model",
            f"models:/{name}@challenger",
            "--data",
            str(data),
            "--key-col",
            "machine",
            "--label-col",
            "label",
            "--method",
            "quantile",
            "--target-fpr",
            "0.05",
            "--tracking-uri",
            mlflow_server,
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["from_version"] == version and out["version"] != version
    old, _ = load_model(f"models:/{name}/{version}", tracking_uri=mlflow_server)
    new, new_ref = load_model(f"models:/{name}@challenger", tracking_uri=mlflow_server)
    # the command's and the loads' downloads are gone with them
    assert sorted(p.name for p in scratch.iterdir() if p.name.startswith("aewatch-")) == []
    assert new_ref.version == out["version"]
    assert new.threshold.value < old.threshold.value  # 5% FPR target sits lower than 1%
    assert (
        new_ref.weights_sha256
        == load_model(f"models:/{name}/{version}", tracking_uri=mlflow_server)[1].weights_sha256
    )


def test_a_fresh_process_reads_the_registry_the_flag_names(mlflow_server, good, data, tmp_path):
    """`--tracking-uri` alone (no MLFLOW_TRACKING_URI, nothing set earlier in the process) is the
    registry a models:/ URI is resolved and downloaded from."""
    name = _name()
    register_result(mlflow_server, good, name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out = tmp_path / "scores.csv"
    argv = ["score", "--model", f"models:/{name}@challenger", "--tracking-uri", mlflow_server]
    argv += ["--data", str(data), "--key-col", "machine", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *argv],
        cwd=tmp_path,  # (no mlflow.db or mlruns of its own here)
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.is_file() and len(out.read_text().splitlines()) > 1


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(mlflow_server, good, tmp_path):
    name = _name()
    register_result(mlflow_server, good, name)
    # mlflow starts uvicorn by name: the environment's bin folder must be on PATH.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(
        os.environ, MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_DISABLE_TELEMETRY="true", PATH=path
    )
    proc, url = _serve(name, env, tmp_path)
    try:
        window = good.data.raw("test")[0]
        features = list(good.detector.input.features)
        rows = [
            dict(
                zip(features, map(float, row), strict=True),
                key="m0",
                ts=f"2026-01-01T00:00:{i:02d}",
            )
            for i, row in enumerate(window)
        ]
        answer = requests.post(f"{url}/invocations", json={"dataframe_records": rows}, timeout=30)
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        assert len(predictions) == len(rows)
        assert set(predictions[-1]) == {"score", "threshold", "p_value", "is_anomaly"}
        expected = good.detector.score(window[None]).scores[0]
        assert predictions[-1]["score"] == pytest.approx(expected, rel=1e-5)
        assert predictions[0]["score"] is None  # no window ends at the first reading
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)


def _serve(name: str, env: dict, tmp_path, attempts: int = 3):
    """`mlflow models serve` of the challenger, answering /ping: (process, url). A server that
    exits before it answers (another process took the free port first) is started again on
    another port; its log is the failure message after the last attempt."""
    log_path = tmp_path / "serve.log"
    for _ in range(attempts):
        port = free_port()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "models",
                    "serve",
                    "-m",
                    f"models:/{name}@challenger",
                    "--env-manager",
                    "local",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    return proc, url
            except requests.RequestException:
                time.sleep(0.5)
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
            break
    pytest.fail(f"mlflow models serve did not answer: {log_path.read_text()[-3000:]}")


def test_a_challenger_that_loses_to_its_pca_baseline_is_refused(mlflow_server, good):
    from mlflow import MlflowClient

    name = _name()
    version = register_result(mlflow_server, good, name)
    tags = MlflowClient(mlflow_server).get_model_version(name, version).tags
    trained, pca = (float(tags[TAG_PREFIX + k]) for k in ("test_auroc", "pca_test_auroc"))
    assert pca == pytest.approx(good.baseline.evaluation["auroc"], abs=1e-6)  # same split
    passed = compare(name, tracking_uri=mlflow_server)
    assert [g.passed for g in passed.gates if g.name == "PCA baseline"] == [trained >= pca]

    # the same version, had PCA ranked its test split better
    MlflowClient(mlflow_server).set_model_version_tag(
        name, version, TAG_PREFIX + "pca_test_auroc", f"{min(1.0, trained + 0.01):.6f}"
    )
    report = compare(name, tracking_uri=mlflow_server)
    assert not report.passed
    failed = [g for g in report.gates if not g.passed]
    assert [g.name for g in failed] == ["PCA baseline"], report.table()
    assert "PCA on the same windows ranks anomalies better" in failed[0].detail
    assert not apply_promotion(report, tracking_uri=mlflow_server)
    unguarded = compare(name, tracking_uri=mlflow_server, pca_gate=False)
    assert "PCA baseline" not in [g.name for g in unguarded.gates] and unguarded.passed
