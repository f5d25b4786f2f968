"""The adaptive stage in the worker: its state travels in the state topic across a restart over
the real broker, it starts again when a new model version is loaded, and alarming on it is a
setting."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import orjson
import pandas as pd
import pytest
from jsonschema import Draft202012Validator

from pipeline.errors import ConfigError
from pipeline.events import ModelIdentity, event_schema
from pipeline.worker.loop import Worker
from pipeline.worker.state import MemoryStateStore, decode_state
from tests.kafka_support import consume, produce, run_worker, stream_items, worker_settings
from tests.kafka_support import names as topic_names
from tests.worker_support import FLEET_MODEL as MODEL
from tests.worker_support import (
    FakeSink,
    FakeSource,
    fleet,
    partitioned,
    run_in_memory,
    settings,
    train_fleet_detector,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_fleet_detector(tmp_path_factory.mktemp("fleet"))


def drifting_fleet(seed: int = 5, readings_per_key: int = 2500):
    """The fleet's future with a spike and a level shift, and a slow drift of every sensor of
    every key over the second half (normal behaviour that moves)."""
    stream = fleet(seed=seed, readings_per_key=readings_per_key, anomalies=("spike", "level_shift"))
    step = (stream.ts_ms - stream.ts_ms.min()) / (stream.ts_ms.max() - stream.ts_ms.min())
    ramp = np.clip(2.0 * (step - 0.5), 0.0, None)[:, None]
    stream.values[:] = stream.values + (ramp * 1.5).astype(np.float32)
    return stream


def _surprise_by_id(events) -> dict:
    return {e["id"]: e["data"]["surprise"] for e in events if "surprise" in e["data"]}


class _SwapAfter:
    """A model follower that hands over `detector` as version 2 after `turns` turns."""

    def __init__(self, detector, turns: int) -> None:
        self.detector, self.turns, self.sample = detector, turns, None

    def take(self):
        self.turns -= 1
        if self.turns:
            return None
        return self.detector, SimpleNamespace(identity=lambda: ModelIdentity("fleet", "2", "c"))


def test_a_new_model_version_starts_every_key_again(trained):
    stream = fleet(seed=3, anomalies=())
    source = FakeSource(partitioned(stream, "readings", 2), chunk=500)
    sink, state = FakeSink(), MemoryStateStore()
    follower = _SwapAfter(trained.detector, 6)
    worker = Worker(
        settings(emit_all=True, adaptive_warmup=50),
        trained.detector,
        MODEL,
        sink,
        state,
        follower=follower,
    )
    worker.attach(source)
    worker.on_assigned(set(source.records))
    worker.run()
    events = [orjson.loads(v) for v in sink.values("events")]
    validator = Draft202012Validator(event_schema())
    for event in events[:50]:
        validator.validate(event)
    for key in sorted(set(stream.keys.tolist())):
        mine = [e["data"] for e in events if e["subject"] == key]
        versions = [d["model"]["version"] for d in mine]
        swap = versions.index("2")
        assert swap > 60 and versions[swap:] == ["2"] * (len(mine) - swap)
        assert mine[swap - 1]["surprise"] > 0  # v1 had warmed up
        after = [d["surprise"] for d in mine[swap:]]
        assert after[:50] == [0.0] * 50 and all(s > 0 for s in after[50:])
        assert [d["likelihood"] for d in mine[swap : swap + 50]] == [0.5] * 50
    saved = [decode_state(v) for v in state.records.values()]
    assert {s["adaptive"]["v"] for s in saved} == {"fleet/2"}


def test_alarming_on_the_adaptive_stage_is_a_setting(trained):
    stream = drifting_fleet(readings_per_key=1500)
    records = partitioned(stream, "readings", 2)
    raw = _run(trained.detector, records)
    adaptive = _run(trained.detector, records, alarm_on="adaptive", adaptive_range=0)
    assert all(e["data"]["is_anomaly"] == (e["data"]["surprise"] >= 5.0) for e in adaptive)
    # with the range check (the default) a window beyond its key's range is anomalous too
    ranged = _run(trained.detector, records, alarm_on="adaptive")
    assert all(e["data"]["is_anomaly"] for e in ranged if e["data"]["surprise"] >= 5.0)
    assert any(e["data"]["is_anomaly"] and e["data"]["surprise"] < 5.0 for e in ranged)
    assert all(
        e["data"]["is_anomaly"] == (e["data"]["score"] > e["data"]["threshold"]) for e in raw
    )
    assert [e["id"] for e in raw] == [e["id"] for e in adaptive]
    assert _surprise_by_id(raw) == _surprise_by_id(adaptive)
    off = _run(trained.detector, records, adaptive_stage="off")
    assert not any("surprise" in e["data"] for e in off)
    with pytest.raises(ConfigError, match="alarm_on"):
        settings(alarm_on="adaptive", adaptive_stage="off")
    with pytest.raises(ConfigError, match="adaptive_rearm"):
        settings(adaptive_rearm=1.5)


def test_the_range_check_takes_its_extremes_in_the_scoring_pass(trained, monkeypatch):
    """Each window's extremes (the range check's input) are taken by the scoring pass, on the
    scoring thread, not by the loop's thread, and decide the same windows as when the loop
    takes them."""
    import threading

    import pipeline.worker.loop as loop_module
    import pipeline.worker.scorer as scorer_module
    from pipeline.detector import Detector
    from pipeline.detector.adaptive_stage import window_extremes

    passes: list[tuple[str, int]] = []
    on_loop: list[str] = []
    score = Detector.score

    def watched_score(self, raw, **options):
        passes.append((threading.current_thread().name, options.get("extremes", 0)))
        return score(self, raw, **options)

    def watched(windows):
        on_loop.append(threading.current_thread().name)
        return window_extremes(windows)

    monkeypatch.setattr(Detector, "score", watched_score)
    monkeypatch.setattr(loop_module, "window_extremes", watched)
    records = partitioned(drifting_fleet(readings_per_key=1500), "readings", 2)
    features = len(trained.detector.input.features)
    in_pass = _run(trained.detector, records, alarm_on="adaptive")
    assert passes and all(name.startswith("aewatch-score") for name, _ in passes)
    assert {asked for _, asked in passes} == {features}
    assert not on_loop

    passes.clear()  # the loop's thread takes them when the scorer is asked for none
    built = scorer_module.BatchScorer.__init__
    monkeypatch.setattr(
        scorer_module.BatchScorer,
        "__init__",
        lambda self, *args, **kwargs: built(self, *args, **{**kwargs, "extremes": 0}),
    )
    by_loop = _run(trained.detector, records, alarm_on="adaptive")
    assert {asked for _, asked in passes} == {0}
    assert on_loop and not any(name.startswith("aewatch-score") for name in on_loop)
    assert [e["id"] for e in in_pass] == [e["id"] for e in by_loop]
    assert [e["data"]["is_anomaly"] for e in in_pass] == [e["data"]["is_anomaly"] for e in by_loop]
    assert any(e["data"]["is_anomaly"] and e["data"]["surprise"] < 5.0 for e in in_pass)


def _run(detector, records, **overrides) -> list[dict]:
    _, sink, _ = run_in_memory(detector, FakeSource(records, chunk=400), emit_all=True, **overrides)
    return [orjson.loads(v) for v in sink.values("events")]


@pytest.mark.kafka
def test_adaptive_state_survives_a_restart_over_the_broker(kafka_bootstrap, create_topic, trained):
    stream = drifting_fleet()
    items = stream_items(stream)
    half = len(items) // 2

    whole = topic_names("adaptive-whole")
    create_topic(whole["input"], partitions=3)
    produce(kafka_bootstrap, whole["input"], items)
    run_worker(worker_settings(kafka_bootstrap, whole, trained.artifact_dir, emit_all=True))
    expected = _surprise_by_id(
        orjson.loads(r.value) for r in consume(kafka_bootstrap, whole["output"])
    )

    split = topic_names("adaptive-split")
    create_topic(split["input"], partitions=3)
    produce(kafka_bootstrap, split["input"], items[:half])
    run_worker(worker_settings(kafka_bootstrap, split, trained.artifact_dir, emit_all=True))
    first = _surprise_by_id(
        orjson.loads(r.value) for r in consume(kafka_bootstrap, split["output"])
    )
    produce(kafka_bootstrap, split["input"], items[half:])
    _, stats = run_worker(
        worker_settings(kafka_bootstrap, split, trained.artifact_dir, emit_all=True)
    )
    assert stats.windows_scored > 0
    both = _surprise_by_id(orjson.loads(r.value) for r in consume(kafka_bootstrap, split["output"]))
    second = {i: s for i, s in both.items() if i not in first}
    assert set(both) == set(expected) and len(second) > 1000
    # a stage that forgot its keys at the restart would report 0 (warm-up) for their first
    # windows after it; with the state restored every window reports what one run reports
    assert sum(s > 0 for s in second.values()) == sum(expected[i] > 0 for i in second)
    assert both == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.kafka
def test_the_worker_and_score_stream_agree_on_a_drifting_file(
    kafka_bootstrap, create_topic, trained, tmp_path, capsys
):
    from pipeline.cli import main

    names = topic_names("adaptive-parity")
    create_topic(names["input"], partitions=3)
    stream = drifting_fleet(seed=7)
    produce(kafka_bootstrap, names["input"], stream_items(stream))
    settings = worker_settings(
        kafka_bootstrap,
        names,
        trained.artifact_dir,
        emit_all=True,
        alarm_on="adaptive",
        adaptive_range=0.05,
    )
    run_worker(settings)
    events = {}
    for record in consume(kafka_bootstrap, names["output"]):
        event = orjson.loads(record.value)
        events[event["id"]] = event["data"]

    frame = pd.DataFrame(stream.values, columns=list(stream.features))
    frame.insert(0, "label", stream.labels)
    frame.insert(0, "key", stream.keys)
    frame.insert(0, "ts", pd.to_datetime(stream.ts_ms, unit="ms"))
    frame.to_csv(tmp_path / "drift.csv", index=False)
    common = ["--model", str(trained.artifact_dir), "--data", str(tmp_path / "drift.csv")]
    common += ["--key-col", "key", "--stream", "--alarm-on", "adaptive", "--adaptive-range", "0.05"]
    out = tmp_path / "replayed.parquet"
    assert main(["score", *common, "--out", str(out)]) == 0
    scored = pd.read_parquet(out).set_index("event_id")
    assert set(scored.index) == set(events)
    worker = pd.DataFrame.from_dict(events, orient="index").loc[scored.index]
    np.testing.assert_allclose(scored["surprise"], worker["surprise"], rtol=1e-6, atol=1e-9)
    assert (scored["detection"] == worker["detection"]).all()
    assert (scored["is_anomaly"] == worker["is_anomaly"]).all()
    assert scored["detection"].sum() >= 2 and (scored["surprise"] > 5).any()
    # and windows beyond their key's range: anomalous at a surprise below the threshold
    assert (scored["is_anomaly"] & (scored["surprise"] < 5)).any()

    capsys.readouterr()
    assert main(["evaluate", *common, "--label-col", "label", "--json"]) == 0
    result = orjson.loads(capsys.readouterr().out)
    assert result["decided_by"] == "adaptive" and result["threshold"] < 5.0
