"""Operator verdicts move the threshold (`aewatch recalibrate --feedback`), against the real
broker and a real MLflow server: up past refuted alarms and below every confirmed one, from a
topic or a file alike; never below the calibrated FPR bound unless asked, and then said. And
`aewatch evaluate --feedback` labels the data by the verdicts."""

from __future__ import annotations

import json
import uuid

import numpy as np
import orjson
import pytest

from pipeline.events import ModelIdentity
from pipeline.kafka_io import open_client
from pipeline.kafka_io.settings import KafkaConnection
from pipeline.quality.cli import send_feedback
from pipeline.quality.feedback import Feedback
from tests.helpers import labelled_series_csv, register_result, train_series_detector
from tests.kafka_support import ensure_topics, produce
from tests.test_quality import T0, _opened


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return labelled_series_csv(tmp_path_factory.mktemp("data") / "series.csv")


@pytest.fixture(scope="module")
def good(tmp_path_factory, data):
    return train_series_detector(data, tmp_path_factory.mktemp("good") / "det")


def _judged(model: ModelIdentity, peaks: dict[str, list[float]]):
    """Alarm events with these peak scores, and a verdict on each."""
    events, verdicts = [], []
    for verdict, values in peaks.items():
        for i, peak in enumerate(values):
            event, episode = _opened(model, f"{verdict}-{i}", T0 + len(events) * 60_000)
            event["data"]["peak_score"] = peak
            events.append(event)
            verdicts.append(Feedback(verdict, "op", T0 + 3_600_000, episode_id=episode))
    return events, verdicts


def served_method(mlflow_server, name, version) -> str:
    from pipeline.registry.client import load_model

    detector, _ = load_model(f"models:/{name}/{version}", tracking_uri=mlflow_server)
    return detector.threshold.method


def _recalibrate(mlflow_server, name, data, *feedback_flags, allow=False) -> dict:
    from pipeline.cli import main

    argv = ["recalibrate", "--model", f"models:/{name}@challenger", "--data", str(data)]
    argv += ["--key-col", "machine", "--label-col", "label", "--target-fpr", "0.01"]
    argv += ["--tracking-uri", mlflow_server, "--json", *feedback_flags]
    if allow:
        argv.append("--allow-below-calibration")
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.mark.kafka
@pytest.mark.mlflow_server
def test_verdicts_move_the_threshold_up_and_never_below_the_calibrated_bound_unasked(
    kafka_bootstrap, mlflow_server, good, data, tmp_path
):
    from pipeline.registry.client import load_model

    name = f"recal-{uuid.uuid4().hex[:6]}"
    version = register_result(mlflow_server, good, name)
    t0 = good.detector.threshold.value
    model = ModelIdentity(name, version)
    tag = uuid.uuid4().hex[:6]
    kafka = open_client(KafkaConnection(kafka_bootstrap))

    def topics_with(peaks):
        alarms, feedback = f"recal-alarms-{tag}-{len(peaks['false_positive'])}", f"recal-fb-{tag}"
        feedback += f"-{len(peaks['false_positive'])}"
        ensure_topics(kafka_bootstrap, {alarms: {}})
        events, verdicts = _judged(model, peaks)
        produce(kafka_bootstrap, alarms, [(b"k", orjson.dumps(e)) for e in events])
        send_feedback(kafka, feedback, verdicts)
        flags = ["--feedback", feedback, "--alarm-topic", alarms]
        return flags + ["--bootstrap-servers", kafka_bootstrap], events, verdicts

    # refuted alarms below every confirmed one: the threshold goes up, halfway between
    up = {"false_positive": [30 * t0, 40 * t0], "true_positive": [100 * t0, 120 * t0]}
    flags, events, verdicts = topics_with(up)
    raised = _recalibrate(mlflow_server, name, data, *flags)
    assert raised["threshold"] == pytest.approx(70 * t0)
    assert raised["method"] == served_method(mlflow_server, name, raised["version"])
    assert raised["method"].endswith("+feedback")  # (the summary said "quantile")
    assert raised["threshold"] > raised["feedback"]["calibrated_threshold"]
    assert raised["feedback"]["removed_refuted"] == 2
    assert raised["feedback"]["removed_confirmed"] == 0
    served, _ = load_model(f"models:/{name}/{raised['version']}", tracking_uri=mlflow_server)
    assert served.threshold.value == pytest.approx(70 * t0)
    # the same verdicts from a file of alarm events and feedback records
    lines = [orjson.dumps(e) for e in events] + [orjson.dumps(v.to_json()) for v in verdicts]
    (tmp_path / "verdicts.jsonl").write_bytes(b"\n".join(lines))
    from_file = _recalibrate(
        mlflow_server, name, data, "--feedback", str(tmp_path / "verdicts.jsonl")
    )
    assert from_file["threshold"] == pytest.approx(raised["threshold"])

    # verdicts that would put it below the calibrated bound: kept there, unless allowed
    down = {"false_positive": [0.01 * t0], "true_positive": [0.02 * t0]}
    flags, _, _ = topics_with(down)
    kept = _recalibrate(mlflow_server, name, data, *flags)
    calibrated = kept["feedback"]["calibrated_threshold"]
    assert kept["threshold"] == calibrated
    assert "below the threshold calibrated for the target FPR" in kept["feedback"]["note"]
    lowered = _recalibrate(mlflow_server, name, data, *flags, allow=True)
    assert lowered["threshold"] == pytest.approx(0.015 * t0)
    assert lowered["threshold"] < calibrated
    assert "BELOW the calibrated FPR bound" in lowered["feedback"]["note"]


def _segments(labels, times, keys):
    """(key, first ms, last ms) of each run of label 1 per key."""
    out = []
    for key in sorted(set(keys)):
        mask = keys == key
        lab, ts = labels[mask], times[mask]
        edges = np.flatnonzero(np.diff(np.r_[0, lab, 0]))
        out += [
            (key, int(ts[a]), int(ts[b - 1])) for a, b in zip(edges[::2], edges[1::2], strict=True)
        ]
    return out


@pytest.mark.parametrize("form", ["csv", "semicolons", "pq"])
def test_evaluate_on_the_verdicts_equals_evaluate_on_the_labels_they_give(
    good, data, tmp_path, monkeypatch, form
):
    """The verdicts label the readings their confirmed alarms cover. The rows' times were read
    through pandas' datetime unit (microseconds under pandas 3: no reading fell in an alarm's
    epoch-ms span, and every metric read as if nothing was anomalous), and the data only as a
    comma CSV or a `.parquet` file (a `.pq` file raised UnicodeDecodeError, a `;` file lacked
    its columns)."""
    import tempfile

    import pandas as pd

    from pipeline.cli import main
    from pipeline.events import iso_ms

    frame = pd.read_csv(data)
    epoch = pd.Timestamp(0, tz="UTC")
    times = ((pd.to_datetime(frame["ts"], utc=True) - epoch) // pd.Timedelta(1, "ms")).to_numpy()
    if form == "semicolons":
        data = tmp_path / "series.txt"
        frame.to_csv(data, sep=";", index=False)
    elif form == "pq":
        data = tmp_path / "series.pq"
        frame.to_parquet(data, index=False)
    keys = frame["machine"].astype(str).to_numpy()
    real = _segments(frame["label"].to_numpy(), times, keys)
    assert real, "the labelled data has no anomaly"
    model, lines = ModelIdentity("m", "1"), []
    for i, (key, start, end) in enumerate(real):
        # confirmed alarms cover the real anomalies; a refuted one on normal readings
        for verdict, (a, b) in (("true_positive", (start, end)), ("false_positive", (0, 0))):
            if verdict == "false_positive":
                normal = times[(keys == key) & (frame["label"].to_numpy() == 0)]
                a = b = int(normal[len(normal) // 2])
            event, episode = _opened(model, key, a)
            event["data"]["key"], event["subject"] = key, key
            event["data"]["episode_id"] = episode = f"{episode}-{verdict}-{i}"
            resolved = {**event, "id": f"{event['id']}-r", "type": "aewatch.alarm.resolved"}
            resolved["data"] = {**event["data"], "state": "resolved", "end": iso_ms(b)}
            verdict_record = Feedback(verdict, "op", b + 1000, episode_id=episode)
            lines += [orjson.dumps(event), orjson.dumps(resolved)]
            lines.append(orjson.dumps(verdict_record.to_json()))
    (tmp_path / "verdicts.jsonl").write_bytes(b"\n".join(lines))
    common = ["evaluate", "--model", str(good.artifact_dir), "--data", str(data)]
    common += ["--key-col", "machine", "--json"]
    import contextlib
    import io

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    results = []
    for extra in (["--label-col", "label"], ["--feedback", str(tmp_path / "verdicts.jsonl")]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main([*common, *extra]) == 0
        results.append(json.loads(out.getvalue().strip().splitlines()[-1]))
    by_labels, by_verdicts = results
    assert by_verdicts["auroc"] == pytest.approx(by_labels["auroc"])
    assert by_verdicts == by_labels
    assert list(scratch.iterdir()) == []  # the labelled copy went with the command
