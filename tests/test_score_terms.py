"""The terms score: what the mean error misses, named in events, the same on every path."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orjson
import pandas as pd
import pytest

from pipeline.detector import load_detector, read_manifest, save_detector
from pipeline.detector.artifact import artifact_digest
from pipeline.detector.scoring import TERMS, ScoreStats
from pipeline.errors import ArtifactError, ConfigError
from pipeline.tools.synthetic import normal_series
from tests.helpers import anomalous_windows, edit_manifest, labelled_series_csv

WINDOW = 16


def _train(data: Path, out: Path, **overrides):
    from pipeline.detector import ModelConfig
    from training.fit import FitConfig
    from training.job import CalibrationSettings, TrainSettings, train

    settings = TrainSettings(
        data=str(data),
        time_col="ts",
        key_col="machine",
        label_col="label",
        window=WINDOW,
        stride=2,
        out=str(out),
        model=ModelConfig(hidden=(32,), code_size=8),
        fit=FitConfig(epochs=8, batch_size=64, patience=0),
        calibration=CalibrationSettings(method="quantile", target_fpr=0.01),
        device="cpu",
        **overrides,
    )
    return train(settings)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("terms")
    data = labelled_series_csv(root / "data.csv")
    return _train(data, root / "terms"), _train(data, root / "raw", score="raw"), data


@pytest.fixture(scope="module")
def fresh():
    """Normal readings of machine m0 after its training history: what no model saw."""
    return normal_series(6000, 6, seed=0)[3000:]


def test_series_default_to_terms_and_raw_stays_a_choice(trained):
    terms, raw, _ = trained
    assert terms.detector.score_mode == "terms" and terms.summary()["score"] == "terms"
    assert raw.detector.score_mode == "raw" and raw.detector.score_stats is None
    assert read_manifest(terms.artifact_dir)["format_version"] == 2
    assert read_manifest(raw.artifact_dir)["format_version"] == 1  # older readers keep reading


@pytest.mark.parametrize("kind, least", [("stuck", 0.9), ("frequency_change", 0.7)])
def test_stuck_and_frequency_windows_stand_out(trained, fresh, kind, least):
    detector = trained[0].detector
    broken = anomalous_windows(fresh, kind, WINDOW, 40, seed=3)
    caught = float(np.mean(detector.is_anomaly(detector.score(broken).scores)))
    assert caught >= least
    assert np.mean(detector.is_anomaly(detector.score(_normal_windows(fresh)).scores)) < 0.05


def _normal_windows(values: np.ndarray) -> np.ndarray:
    view = np.lib.stride_tricks.sliding_window_view(values, WINDOW, axis=0).transpose(0, 2, 1)
    return np.ascontiguousarray(view[::7])


def test_top_feature_and_term_name_the_stuck_sensor(trained, fresh):
    detector = trained[0].detector
    rng = np.random.default_rng(5)
    for feature in range(fresh.shape[1]):
        start = int(rng.integers(0, len(fresh) - WINDOW))
        window = fresh[start : start + WINDOW].copy()
        window[:, feature] = np.median(fresh[:, feature])  # frozen inside its normal range
        scored = detector.score(window[None])
        assert detector.top_features(scored.per_feature, 1)[0] == [detector.input.features[feature]]
        assert detector.top_terms(scored, 1)[0][0] in ("variance", "roughness", "centroid")


def test_a_window_scores_the_same_in_any_micro_batch(trained, fresh):
    """The terms are functions of one window: bit for bit the same in any batch, given the
    reconstruction; through the model, as close as the model's own batched arithmetic."""
    import torch

    from pipeline.detector.scoring import terms_score, window_errors

    detector = trained[0].detector
    windows = np.lib.stride_tricks.sliding_window_view(fresh, WINDOW, axis=0).transpose(0, 2, 1)
    windows = np.ascontiguousarray(windows[:997])
    x = torch.from_numpy(detector.prepare(windows))
    with torch.inference_mode():
        errors = window_errors(detector.model, detector.config, x)
        whole = terms_score(x, errors, detector.score_stats)
        cuts = np.sort(np.random.default_rng(1).choice(np.arange(1, len(x)), 40, replace=False))
        bounds = list(zip(np.r_[0, cuts], np.r_[cuts, len(x)], strict=True))
        parts = [terms_score(x[a:b], errors[a:b], detector.score_stats) for a, b in bounds]
    for i, name in enumerate(("scores", "contributions", "terms")):
        assert torch.equal(torch.cat([p[i] for p in parts]), whole[i]), name
    one = detector.score(windows, batch_size=4096)
    split = [detector.score(windows[a:b], batch_size=7) for a, b in bounds]
    joined = np.concatenate([p.scores for p in split])
    np.testing.assert_allclose(joined, one.scores, rtol=1e-5)
    assert np.array_equal(np.concatenate([p.terms for p in split]), one.terms)


def test_the_statistics_travel_in_the_manifest_and_are_verified(trained, fresh, tmp_path):
    result = trained[0]
    loaded = load_detector(result.artifact_dir)
    windows = anomalous_windows(fresh, "stuck", WINDOW, 20, seed=9)
    assert np.array_equal(loaded.score(windows).scores, result.detector.score(windows).scores)
    manifest = json.loads((result.artifact_dir / "manifest.json").read_text())
    assert manifest["score"]["terms"] == list(TERMS)
    assert np.shape(manifest["score"]["upper"]) == (len(TERMS), 6)
    copy = tmp_path / "copy"
    save_detector(result.detector, copy)

    def scale(edited: dict) -> None:
        edited["score"]["upper"][0][0] *= 10  # a threshold would silently move

    edit_manifest(copy, scale)  # sealed again: the statistics' own SHA-256 tells
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_detector(copy)

    def negative(edited: dict) -> None:
        edited["score"]["upper"][0][0] = -1.0
        edited["score"]["sha256"] = ScoreStats.from_dict(manifest["score"]).digest()

    edit_manifest(copy, negative)
    with pytest.raises(ArtifactError):
        load_detector(copy)


def test_terms_are_refused_where_they_cannot_apply():
    from pipeline.detector import ModelConfig
    from training.job import TrainSettings

    with pytest.raises(ConfigError, match="score"):
        TrainSettings(data="digits", score="terms")
    with pytest.raises(ConfigError, match="score"):
        TrainSettings(data="x.csv", score="terms", model=ModelConfig(kind="vae", vae_score="elbo"))
    with pytest.raises(ConfigError, match="score_aggregation"):
        TrainSettings(data="x.csv", score_aggregation="median")


def test_score_evaluate_worker_and_pyfunc_agree(trained, tmp_path):
    """The same readings through `aewatch score`, `evaluate`, the worker's loop and the MLflow
    pyfunc give the same scores, decisions and named terms."""
    from sklearn.metrics import roc_auc_score

    from pipeline.cli import main as cli
    from pipeline.events import ModelIdentity
    from pipeline.registry.pyfunc import DetectorModel
    from pipeline.worker.loop import Worker
    from pipeline.worker.state import MemoryStateStore
    from tests.worker_support import FakeSink, FakeSource, Record, settings

    result, _, data = trained
    frame = pd.read_csv(data)
    frame = frame[frame["machine"] == "m1"].tail(400).reset_index(drop=True)
    csv = tmp_path / "m1.csv"
    frame.to_csv(csv, index=False)
    out = tmp_path / "scores.parquet"
    common = ["--model", str(result.artifact_dir), "--data", str(csv), "--key-col", "machine"]
    assert cli(["score", *common, "--out", str(out)]) == 0
    scored = pd.read_parquet(out)
    assert scored["top_terms"].str.split(",").str[0].isin(TERMS).all()
    assert scored["is_anomaly"].any() and not scored["is_anomaly"].all()

    from training.data.for_detector import DataSource
    from training.scoring import EvaluateSettings, evaluate_file
    from training.sources import ModelSource

    report = evaluate_file(
        EvaluateSettings(
            ModelSource(str(result.artifact_dir)),
            DataSource(str(csv), key_col="machine", label_col="label"),
        )
    )
    label_at = dict(zip(pd.to_datetime(frame["ts"]), frame["label"], strict=True))
    labels = [label_at[t] for t in pd.to_datetime(scored["window_end"])]
    assert report["auroc"] == pytest.approx(roc_auc_score(labels, scored["score"]))

    detector = load_detector(result.artifact_dir)
    model = DetectorModel()
    digest = artifact_digest(result.artifact_dir)
    model.load_context(
        SimpleNamespace(
            artifacts={"detector": str(result.artifact_dir)},
            model_config={"artifact_sha256": digest},
        )
    )
    rows = frame.drop(columns=["label"]).rename(columns={"machine": "key"})
    served = model.predict(None, rows).dropna(subset=["score"])
    assert np.array_equal(served["score"].to_numpy(), scored["score"].to_numpy())

    times = pd.to_datetime(frame["ts"]).astype("datetime64[ms]").astype(np.int64).to_numpy()
    records = [
        Record(
            "readings",
            0,
            i,
            b"m1",
            orjson.dumps(
                {
                    "key": "m1",
                    "ts": int(times[i]),
                    "values": {f: float(frame.loc[i, f]) for f in detector.input.features},
                }
            ),
        )
        for i in range(len(frame))
    ]
    sink = FakeSink()
    worker = Worker(
        settings(), detector, ModelIdentity("m", "1", "champion"), sink, MemoryStateStore()
    )
    source = FakeSource({("readings", 0): records}, chunk=37)
    worker.attach(source)
    worker.on_assigned(set(source.records))
    worker.run()
    events = [orjson.loads(v)["data"] for v in sink.values("events")]
    flagged = scored[scored["is_anomaly"]]
    ends = pd.to_datetime(flagged["window_end"]).astype("datetime64[ms]").astype(np.int64)
    expected = dict(zip(ends, flagged["score"], strict=True))
    streamed = {
        int(pd.Timestamp(e["window"]["end"]).value // 1_000_000): e["score"] for e in events
    }
    assert streamed == pytest.approx(expected, rel=1e-6)
    terms = dict(zip(ends, flagged["top_terms"].str.split(","), strict=True))
    for event in events:
        end = int(pd.Timestamp(event["window"]["end"]).value // 1_000_000)
        assert [f.get("term") for f in event["top_features"]] == terms[end]


def test_a_feature_constant_in_training_does_not_alarm_on_jitter_but_on_a_change(tmp_path, caplog):
    from tests.helpers import series_frame

    frame = series_frame(n_keys=2, n=1500, n_features=3, seed=4)
    frame["k"] = 3.0  # a set point that never moved in training
    frame["label"] = 0
    frame.to_csv(tmp_path / "train.csv", index=False)
    with caplog.at_level("WARNING"):
        result = _train(tmp_path / "train.csv", tmp_path / "det")
    detector = result.detector
    assert detector.score_stats is not None
    assert "k never moved within a training window" in caplog.text
    fresh = normal_series(2700, 3, seed=400)[1500:]  # machine m0 after its training history
    rng = np.random.default_rng(1)
    jitter = 3.0 + np.where(rng.random(len(fresh)) < 0.3, 1e-6, 0.0)  # float32-sized noise
    windows = np.lib.stride_tricks.sliding_window_view(
        np.column_stack([fresh, jitter]).astype(np.float32), WINDOW, axis=0
    ).transpose(0, 2, 1)[::4]
    calm = np.column_stack([fresh, np.full(len(fresh), 3.0)]).astype(np.float32)
    calm = np.lib.stride_tricks.sliding_window_view(calm, WINDOW, axis=0).transpose(0, 2, 1)[::4]
    jittered_rate = float(detector.is_anomaly(detector.score(windows).scores).mean())
    calm_rate = float(detector.is_anomaly(detector.score(calm).scores).mean())
    assert jittered_rate <= calm_rate + 0.02, (jittered_rate, calm_rate)
    moved = windows.copy()
    moved[:, :, 3] += np.sin(np.arange(WINDOW))[None, :].astype(np.float32)  # it starts to move
    assert detector.is_anomaly(detector.score(moved).scores).mean() > 0.9
