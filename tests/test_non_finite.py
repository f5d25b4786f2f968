"""Values a float32 model cannot hold (NaN, infinity, beyond float32) are reported, never scored
as normal: batch scoring and training refuse them naming the column and row (the worker
dead-letters the same reading as `non_finite`, see `test_fuzz.py`'s `huge` records), the pyfunc's
rows are refused likewise, and a score that is not finite is decided anomalous."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.batch import score_readings
from pipeline.detector import Scaler
from pipeline.errors import DataError
from tests.helpers import labelled_series_csv, train_series_detector
from tests.worker_support import FLEET_MODEL
from training.data.for_detector import DataSource
from training.data.series import load_series
from training.scoring import ScoreSettings, score_file
from training.sources import ModelSource


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    data = labelled_series_csv(root / "series.csv")
    return train_series_detector(data, root / "det"), data


def _with_value(data, tmp_path, value: float, row: int = 100):
    frame = pd.read_csv(data)
    frame.loc[row, "s2"] = value
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("value", [1e300, -1e39, float("inf")])
def test_batch_scoring_refuses_an_out_of_range_reading_naming_column_and_row(
    trained, tmp_path, value
):
    result, data = trained
    path = _with_value(data, tmp_path, value)
    source = DataSource(str(path), time_col="ts", key_col="machine", label_col="label")
    settings = ScoreSettings(ModelSource(str(result.artifact_dir)), source, str(tmp_path / "o.csv"))
    with pytest.raises(DataError, match=r"column 's2'.*data row 101"):
        score_file(settings)
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.parametrize("value", [1e300, float("nan")])
def test_training_on_an_out_of_range_value_names_the_column_and_row(trained, tmp_path, value):
    _, data = trained
    path = _with_value(data, tmp_path, value, row=41)
    with pytest.raises(DataError, match=r"column 's2'.*data row 42"):
        load_series(path, time_col="ts", key_col="machine", label_col="label")


def test_the_scaler_names_where_a_non_finite_value_is():
    samples = np.zeros((10, 3))
    samples[7, 2] = np.inf
    with pytest.raises(DataError, match=r"feature 2.*sample 7"):
        Scaler.fit("standard", samples)


def test_pyfunc_rows_with_an_out_of_range_value_are_refused(trained):
    result, data = trained
    rows = pd.read_csv(data).head(40).rename(columns={"machine": "key"})
    rows.loc[20, "s1"] = 1e300
    with pytest.raises(DataError, match=r"row 21: feature 's1'"):  # rows counted from 1
        score_readings(result.detector, rows)


def test_pyfunc_rows_without_a_key_or_with_true_false_are_refused_as_the_worker_refuses(trained):
    result, data = trained
    rows = pd.read_csv(data).head(40).rename(columns={"machine": "key"})
    rows.loc[20:, "key"] = None  # were scored as no key at all: their scores all null
    with pytest.raises(DataError, match=r"^input row 21: no key"):
        score_readings(result.detector, rows)
    flagged = pd.read_csv(data).head(40).rename(columns={"machine": "key"})
    flagged["s1"] = flagged["s1"] > 0  # were read as 1.0 and 0.0
    with pytest.raises(DataError, match="feature 's1' holds true/false"):
        score_readings(result.detector, flagged)


def test_a_score_that_is_not_finite_is_never_normal(trained):
    detector = trained[0].detector
    scores = np.array([0.0, np.nan, np.inf, detector.threshold.value * 2])
    assert detector.is_anomaly(scores).tolist() == [False, True, True, True]
    p = detector.threshold.p_values(scores)
    assert p[1] == p.min() and p[2] == p.min()


def _huge(data, tmp_path):
    """One key's first 200 readings, the 101st holding 3e38 (within float32's range), as a file."""
    frame = pd.read_csv(data)
    frame = frame[frame["machine"] == frame["machine"].iloc[0]].head(200).reset_index(drop=True)
    frame.loc[100, "s2"] = 3e38
    frame.to_csv(tmp_path / "huge.csv", index=False)
    return frame, tmp_path / "huge.csv"


def _stream(detector, model, frame) -> list[dict]:
    """The events of an in-memory worker (every window's, and alarms) over `frame`'s readings."""
    import orjson

    from pipeline.worker.loop import Worker
    from pipeline.worker.state import MemoryStateStore
    from tests.worker_support import FakeSink, FakeSource, Record, settings

    features = [c for c in frame.columns if c.startswith("s")]
    records = []
    for i, row in enumerate(frame.itertuples(index=False)):
        ts = int(pd.Timestamp(row.ts).value // 1_000_000)
        reading = {"key": row.machine, "ts": ts, "values": {f: getattr(row, f) for f in features}}
        records.append(Record("readings", 0, i, row.machine.encode(), orjson.dumps(reading)))
    source, sink = FakeSource({("readings", 0): records}), FakeSink()
    config = settings(events="both", emit_all=True)
    worker = Worker(config, detector, model, sink, MemoryStateStore())
    worker.attach(source)
    worker.on_assigned(set(source.records))
    worker.run()
    return [orjson.loads(value) for topic, _, value, _ in sink.sent if topic == "events"]


def test_a_reading_far_beyond_normal_scores_finite_and_anomalous_in_batch_and_stream(
    trained, tmp_path
):
    """3e38 is within float32's range, so both `score` and the worker take it; its scaled value
    overflowed the model's arithmetic into NaN scores, which `score` decided anomalous and the
    worker normal (no alarm), and whose events failed their schema (`null` scores). Scaled values
    are held within SCALED_LIMIT: the windows holding it score finite, far above the threshold,
    alike in batch and stream, and every event is valid."""
    from jsonschema import Draft202012Validator

    from pipeline.events import ALARM_SCHEMA, EVENT_SCHEMA, event_schema

    result, data = trained
    frame, path = _huge(data, tmp_path)
    source = ModelSource(str(result.artifact_dir))
    detector, ref = source.load()
    columns = DataSource(str(path), time_col="ts", key_col="machine", label_col="label")
    score_file(ScoreSettings(source, columns, str(tmp_path / "o.csv")))
    batch = pd.read_csv(tmp_path / "o.csv")
    holding = batch[batch["window_end"] >= frame["ts"].iloc[100]].head(4)  # stride 2, window 8
    assert np.isfinite(batch["score"]).all() and holding["is_anomaly"].all()
    assert (holding["score"] > 10 * detector.threshold.value).all()

    events = _stream(detector, ref.identity(), frame)  # the identity `score` gave: same ids
    schemas = {
        kind: Draft202012Validator(event_schema(name))
        for kind, name in (("anomaly", EVENT_SCHEMA), ("alarm", ALARM_SCHEMA))
    }
    kinds = [event["type"].split(".")[1] for event in events]
    assert set(kinds) == {"anomaly", "alarm"}
    pairs = zip(kinds, events, strict=True)
    errors = [e.message for kind, event in pairs for e in schemas[kind].iter_errors(event)]
    assert errors == []
    streamed = {e["id"]: e["data"] for e in events if e["type"] == "aewatch.anomaly.v1"}
    for row in holding.itertuples():
        event = streamed[row.event_id]
        assert event["is_anomaly"] and event["score"] == pytest.approx(row.score, rel=1e-6)
    assert any(e["type"] == "aewatch.alarm.opened" for e in events)


def test_a_window_whose_score_is_not_finite_is_anomalous_in_the_stream_as_in_batch(
    trained, tmp_path, monkeypatch
):
    """With nothing holding scaled values (as before SCALED_LIMIT), the windows holding 3e38
    score NaN: `Detector.is_anomaly` calls them anomalous, the worker called them normal."""
    from pipeline.detector import load_detector, traced

    result, data = trained
    monkeypatch.setattr(traced, "SCALED_LIMIT", float("inf"))
    detector = load_detector(result.artifact_dir)  # traced afresh, without the limit
    frame, _ = _huge(data, tmp_path)
    events = _stream(detector, FLEET_MODEL, frame)
    windows = [e["data"] for e in events if e["type"] == "aewatch.anomaly.v1"]
    not_finite = [w for w in windows if w["score"] is None]
    assert len(not_finite) == 4 and all(w["is_anomaly"] for w in not_finite)
