"""Calendar inputs: `--calendar auto` adds the phase of the day when the training rows span two
days (of the week from fourteen), the artifact records it, and the worker, batch scoring and the
pyfunc make the same columns from the timestamps, so they give the same scores."""

from __future__ import annotations

import numpy as np
import orjson
import pandas as pd
import pytest

from pipeline.batch import score_readings
from pipeline.detector import load_detector
from pipeline.detector.calendar import auto_calendar, calendar_columns
from pipeline.errors import ConfigError, DataError
from pipeline.events import ModelIdentity
from pipeline.worker.loop import Worker
from pipeline.worker.state import MemoryStateStore
from tests.worker_support import FakeSink, FakeSource, Record, settings
from training.data.for_detector import ALL, DataSource, load_for

MODEL = ModelIdentity("daily", "1", None)
STEP_MS = 300_000  # 5 minutes


def _daily(days: float, seed: int = 0) -> pd.DataFrame:
    n = int(days * 288)
    rng = np.random.default_rng(seed)
    ts = 1_767_225_600_000 + np.arange(n, dtype=np.int64) * STEP_MS
    phase = 2 * np.pi * (ts % 86_400_000) / 86_400_000
    value = np.sin(phase) + 0.05 * rng.standard_normal(n)
    return pd.DataFrame({"ts": pd.to_datetime(ts, unit="ms"), "value": value})


def _train(tmp_path, days: float, calendar: str):
    from pipeline.detector import ModelConfig
    from training.fit import FitConfig
    from training.job import CalibrationSettings, TrainSettings, train

    _daily(days).to_csv(tmp_path / "daily.csv", index=False)
    return train(
        TrainSettings(
            data=str(tmp_path / "daily.csv"),
            time_col="ts",
            window=12,
            stride=2,
            calendar=calendar,
            out=str(tmp_path / f"detector-{calendar}-{days}"),
            model=ModelConfig(hidden=(16,), code_size=3),
            fit=FitConfig(
                epochs=3,
                min_steps=0,
                schedule="constant",
                patience_steps=0,
                batch_size=64,
                patience=2,
            ),
            calibration=CalibrationSettings(method="quantile", target_fpr=0.05),
            device="cpu",
        )
    )


def test_the_auto_rule_and_the_columns():
    assert auto_calendar(86_400_000) == () and auto_calendar(2 * 86_400_000) == ("tod",)
    assert auto_calendar(14 * 86_400_000) == ("tod", "dow")
    cols = calendar_columns(np.array([0, 21_600_000, 86_400_000]), ("tod",))
    np.testing.assert_allclose(cols, [[0, 1], [1, 0], [0, 1]], atol=1e-12)
    with pytest.raises(ConfigError, match="calendar"):
        from training.job import TrainSettings

        TrainSettings(data="x.csv", calendar="weekly")


def test_worker_batch_and_pyfunc_make_the_same_calendar_inputs(tmp_path):
    trained = _train(tmp_path, days=5, calendar="auto")
    detector = load_detector(trained.artifact_dir)
    assert detector.input.calendar == ("tod",)
    assert detector.input.features == ("value", "tod_sin", "tod_cos")
    assert detector.input.data_features == ("value",)
    short = _train(tmp_path, days=1.5, calendar="auto")  # too short for a daily phase
    assert load_detector(short.artifact_dir).input.calendar == ()

    frame = _daily(2, seed=1).assign(key="k")
    frame.to_csv(tmp_path / "next.csv", index=False)
    data = load_for(detector, DataSource(str(tmp_path / "next.csv"), key_col="key"))
    batch = data.score_table(detector, ALL, 3, MODEL)

    ts = frame["ts"].to_numpy().astype("datetime64[ms]").astype(np.int64)
    records = [
        Record(
            "readings", 0, i, b"k", orjson.dumps({"key": "k", "ts": int(t), "values": {"value": v}})
        )
        for i, (t, v) in enumerate(zip(ts.tolist(), frame["value"].tolist(), strict=True))
    ]
    sink = FakeSink()
    worker = Worker(settings(emit_all=True), detector, MODEL, sink, MemoryStateStore())
    source = FakeSource({("readings", 0): records}, chunk=100)
    worker.attach(source)
    worker.on_assigned(set(source.records))
    worker.run()
    events = {e["id"]: e["data"]["score"] for e in map(orjson.loads, sink.values("events"))}
    assert sink.values("dlq") == []
    expected = dict(zip(batch["event_id"], batch["score"], strict=True))
    assert events == pytest.approx(expected, rel=1e-6)

    rows = frame.assign(ts=frame["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S"))
    per_row = score_readings(detector, rows)
    scored = per_row["score"].dropna().astype(float).to_numpy()
    np.testing.assert_allclose(scored, batch["score"].to_numpy(), rtol=1e-6)


def test_the_pyfunc_reads_epoch_ms_times_as_the_worker_does(tmp_path):
    """The served model read a time column only as ISO-8601 text: epoch milliseconds, which
    `score` and the worker take, failed ("is not ISO8601 format"). A fractional millisecond is
    cut, as the worker cuts it."""
    detector = load_detector(_train(tmp_path, days=5, calendar="auto").artifact_dir)
    frame = _daily(1, seed=2)
    iso = score_readings(detector, frame.assign(ts=frame["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S")))
    ms = frame["ts"].to_numpy().astype("datetime64[ms]").astype(np.int64)
    assert iso["score"].notna().sum() > 100
    pd.testing.assert_frame_equal(score_readings(detector, frame.assign(ts=ms)), iso)
    pd.testing.assert_frame_equal(score_readings(detector, frame.assign(ts=ms + 0.7)), iso)
    seconds = ms.copy()
    seconds[30] //= 1000  # one time in epoch seconds: refused as the worker refuses that reading
    with pytest.raises(DataError, match=r"input row 31: .* epoch seconds\?"):
        score_readings(detector, frame.assign(ts=seconds))


def test_the_pyfunc_leaves_out_a_reading_that_repeats_its_time(tmp_path):
    """`score` and the worker keep a key's first reading of a time and leave the rest out; the
    pyfunc windowed the repeat too, and every later window ended a reading early."""
    detector = load_detector(_train(tmp_path, days=5, calendar="auto").artifact_dir)
    frame = _daily(1, seed=2)
    frame = frame.assign(ts=frame["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S"))
    repeated = pd.concat(
        [frame.iloc[:50], frame.iloc[49:50].assign(value=9.0), frame.iloc[50:]], ignore_index=True
    )
    got = score_readings(detector, repeated)
    assert got["score"].iloc[50] is None and not got["is_anomaly"].iloc[50]
    want = score_readings(detector, frame)
    pd.testing.assert_frame_equal(got.drop(index=50).reset_index(drop=True), want)
